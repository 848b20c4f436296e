"""Training the demo's base model: text-encoder embeddings and ε-prediction UNet together, SD-style.

Loss ‖ε − ε̂(√ᾱ_t·x0 + √(1 − ᾱ_t)·ε, t, c)‖² with t uniform over 0..999 and SD's schedule, so x_999 still holds
√ᾱ₉₉₉·x0 = 6.8 % of the image: the leak that makes sampling from pure noise drift to mid-brightness.
Every step draws fresh images from the world, so the model never sees the same image twice.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .denoiser import DemoDenoiser, sd_alphas_cumprod
from .text_encoder import DemoTextEncoder
from .world import draw_batch, encode_latents

CAPTION_DROPOUT = 0.1


def _learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def train_base(steps: int, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0,
               ema_decay: float = 0.995, device: str = "cpu", progress: bool = True,
               snapshot: Callable[[int, DemoTextEncoder, DemoDenoiser], None] | None = None, snapshot_every: int = 0
               ) -> tuple[DemoTextEncoder, DemoDenoiser, list[float]]:
    """Train a text encoder and a base denoiser from scratch; returns their EMA copies (eval mode) and the losses.

    ``snapshot(step, ema_encoder, ema_model)`` is called every ``snapshot_every`` steps, to look at a long run early.
    """
    torch.manual_seed(seed)
    sample = encode_latents(torch.from_numpy(draw_batch(2048, seed=seed + 77).images))
    moments = sample.pow(2).mean(dim=(0, 2, 3)).double().tolist()
    encoder, model = DemoTextEncoder().to(device), DemoDenoiser({"channel_second_moment": moments}).to(device)
    ema_encoder, ema_model = copy.deepcopy(encoder), copy.deepcopy(model)
    parameters = list(encoder.parameters()) + list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.999), weight_decay=0.01)
    alphas_cumprod = sd_alphas_cumprod().float().to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drop_rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(steps), desc="base denoiser", disable=not progress)
    for step in bar:
        batch = draw_batch(batch_size, seed=seed * 1_000_003 + step + 1)
        captions = ["" if drop_rng.random() < CAPTION_DROPOUT else text for text in batch.captions]
        x0 = encode_latents(torch.from_numpy(batch.images)).to(device)
        t = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        alpha_bar = alphas_cumprod[t][:, None, None, None]
        x_t = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
        loss = F.mse_loss(model(x_t, t.float(), encoder(encoder.tokenize(captions))), noise)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, learning_rate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            for ema, live in ((ema_encoder, encoder), (ema_model, model)):
                for ema_parameter, parameter in zip(ema.parameters(), live.parameters(), strict=True):
                    ema_parameter.lerp_(parameter, 1.0 - ema_decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0:
            snapshot(step + 1, ema_encoder, ema_model)
    return ema_encoder.eval().requires_grad_(False), ema_model.eval().requires_grad_(False), losses
