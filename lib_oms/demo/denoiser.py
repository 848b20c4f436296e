"""The demo's base model: a small ε-prediction UNet trained with SD's noise schedule, and the SD schedule itself.

Like SD, the network sees the variance-preserving latent x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε and the timestep t, and
predicts ε; it reads the caption through cross-attention and a pooled-caption term added to the time embedding.
It works on the world's 48×8×8 latents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModuleFileError

TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012

DEFAULT_CONFIG = {"in_channels": 48, "channels": [48, 64, 96], "context_dim": 64, "heads": 4, "embedding_dim": 128,
                  "channel_second_moment": None}


def sd_alphas_cumprod(timesteps: int = TIMESTEPS) -> torch.Tensor:
    """ᾱ_t of SD's "scaled_linear" schedule: β_t linear in √β from 0.00085 to 0.012; ᾱ₉₉₉ = 0.0046601 (float64)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM/SD."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as a per-channel scale and shift in between; 1×1 skip if needed."""

    def __init__(self, channels_in: int, channels_out: int, embedding_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * channels_out)
        self.norm2 = nn.GroupNorm(8, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class CrossAttention(nn.Module):
    """Pixels attend to caption tokens (multi-head, pre-norm, residual)."""

    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        key, value = self.to_kv(context).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(split(self.to_q(tokens)), split(key), split(value))
        attended = self.to_out(attended.transpose(1, 2).reshape(batch, height * width, channels))
        return x + attended.transpose(1, 2).reshape(batch, channels, height, width)


class DemoDenoiser(nn.Module):
    """ε-prediction UNet: forward(x_t [B,48,8,8], t [B], context [B,L,D]) -> ε̂ [B,48,8,8].

    Three levels (8×8, 4×4, 2×2), two residual blocks each, cross-attention below 8×8. The network learns the
    residual over the per-channel linear (Wiener) estimate ε̂ = √(1 − ᾱ_t)·x_t / (ᾱ_t·m_c + 1 − ᾱ_t), m_c = E[x0_c²]
    of the data (config "channel_second_moment"; 1 if not given), as EDM's c_skip does: a small network then spends
    its training on what is not linear instead of learning to copy or shrink x_t.
    The spatial mean of each input channel (×√positions, so pure noise gives unit spread) joins the embedding: the
    leaked brightness is a global quantity, and this lets a small network read it as SD's large one does.
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        c = self.config
        channels, emb = list(c["channels"]), c["embedding_dim"]
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.context_proj = nn.Linear(c["context_dim"], emb)
        self.mean_proj = nn.Linear(c["in_channels"], emb)
        self.conv_in = nn.Conv2d(c["in_channels"], channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.down_attention = nn.ModuleList()
        skips, previous = [], channels[0]
        for level, width in enumerate(channels):
            for _ in range(2):
                self.down.append(ResBlock(previous, width, emb))
                self.down_attention.append(CrossAttention(width, c["context_dim"], c["heads"]) if level else None)
                previous = width
                skips.append(width)
        self.downsample = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in channels[:-1])
        self.mid = ResBlock(previous, previous, emb)
        self.mid_attention = CrossAttention(previous, c["context_dim"], c["heads"])
        self.up = nn.ModuleList()
        self.up_attention = nn.ModuleList()
        for level in reversed(range(len(channels))):
            width = channels[level]
            for _ in range(2):
                self.up.append(ResBlock(previous + skips.pop(), width, emb))
                self.up_attention.append(CrossAttention(width, c["context_dim"], c["heads"]) if level else None)
                previous = width
        self.upsample = nn.ModuleList(nn.Conv2d(channels[level + 1], channels[level + 1], 3, padding=1)
                                      for level in reversed(range(len(channels) - 1)))
        self.norm_out = nn.GroupNorm(8, previous)
        self.conv_out = nn.Conv2d(previous, c["in_channels"], 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().float(), persistent=False)
        moments = c["channel_second_moment"] or [1.0] * c["in_channels"]
        self.register_buffer("second_moment", torch.tensor(moments, dtype=torch.float32)[None, :, None, None],
                             persistent=False)

    def skip_scale(self, t: torch.Tensor) -> torch.Tensor:
        """√(1 − ᾱ_t)/(ᾱ_t·m_c + 1 − ᾱ_t) per channel at (fractional) timesteps t, ᾱ interpolated linearly."""
        t = t.float().clamp(0, len(self.alphas_cumprod) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        alpha_bar = torch.lerp(self.alphas_cumprod[low], self.alphas_cumprod[high], t - low.float())
        alpha_bar = alpha_bar[:, None, None, None]
        return (1.0 - alpha_bar).sqrt() / (alpha_bar * self.second_moment + 1.0 - alpha_bar)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        c = self.config
        positions = x.shape[-2] * x.shape[-1]
        embedding = self.time_mlp(timestep_embedding(t, c["embedding_dim"]))
        embedding = embedding + self.context_proj(context.mean(dim=1))
        embedding = embedding + self.mean_proj(x.mean(dim=(2, 3)) * positions**0.5)
        h = self.conv_in(x)
        skips, levels = [], len(c["channels"])
        for index, (block, attention) in enumerate(zip(self.down, self.down_attention, strict=True)):
            h = block(h, embedding)
            h = attention(h, context) if attention is not None else h
            skips.append(h)
            if index % 2 == 1 and index // 2 < levels - 1:
                h = self.downsample[index // 2](h)
        h = self.mid_attention(self.mid(h, embedding), context)
        for index, (block, attention) in enumerate(zip(self.up, self.up_attention, strict=True)):
            h = block(torch.cat([h, skips.pop()], dim=1), embedding)
            h = attention(h, context) if attention is not None else h
            if index % 2 == 1 and index // 2 < levels - 1:
                h = self.upsample[index // 2](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h))) + self.skip_scale(t) * x


def save_denoiser(model: DemoDenoiser, path: str | Path, *, fp16: bool = True) -> Path:
    """One .safetensors file (fp16 by default, to keep the shipped demo small); the config goes in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    state = {key: value.detach().to(dtype).contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"demo_denoiser_config": json.dumps(model.config)})
    return path


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> DemoDenoiser:
    """Read a file written by :func:`save_denoiser` into an fp32 model in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ModuleFileError(f"demo base denoiser not found: {path}; run `python -m lib_oms.demo.reproduce`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            config = json.loads((handle.metadata() or {})["demo_denoiser_config"])
        model = DemoDenoiser(config)
        model.load_state_dict({key: value.float() for key, value in load_file(str(path)).items()})
    except Exception as error:  # corrupt file, missing keys or metadata
        raise ModuleFileError(f"cannot read the demo base denoiser {path}: {error}; re-create it with "
                              "`python -m lib_oms.demo.reproduce`") from error
    return model.to(device).eval().requires_grad_(False)
