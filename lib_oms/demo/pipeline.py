"""Generation in the demo world, without and with OMS, through the same calls the WebUI extension makes.

Per image: unit noise from the image's seed (as the WebUI draws it), then, with OMS, lib_oms.engine.oms_start
with SamplerStart.k_diffusion(σ₀) replaces that noise by the OMS-corrected one, and the Euler sampler starts from
x = σ₀·noise. The fresh noise z of the OMS SDE step comes from lib_oms.engine.seeded_z(seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import oms_start, seeded_unit_noise, seeded_z
from ..step import SamplerStart
from .denoiser import load_denoiser
from .sampler import DiscreteEpsDenoiser, sample_euler
from .text_encoder import DemoTextEncoder, load_text_encoder
from .world import LATENT_SHAPE, decode_latents

MODELS_DIR = Path(__file__).resolve().parents[2] / "models" / "demo"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
DENOISER_FILE = "base_denoiser.safetensors"
OMS_FOLDER = "oms_s_demo"


@dataclass
class DemoModels:
    """The shipped demo weights: text encoder, base denoiser (wrapped for k-diffusion) and the OMS module."""

    encoder: DemoTextEncoder
    denoiser: DiscreteEpsDenoiser
    oms: object | None  # lib_oms.module_files.OMSModule


def load_models(models_dir: str | Path = MODELS_DIR, with_oms: bool = True) -> DemoModels:
    """Load the demo's weights from ``models_dir`` (the OMS module with lib_oms.module_files.load_module, unchanged)."""
    from ..module_files import load_module

    models_dir = Path(models_dir)
    encoder = load_text_encoder(models_dir / TEXT_ENCODER_FILE)
    denoiser = DiscreteEpsDenoiser(load_denoiser(models_dir / DENOISER_FILE))
    return DemoModels(encoder, denoiser, load_module(models_dir / OMS_FOLDER) if with_oms else None)


def seed_noise(seeds: Sequence[int]) -> torch.Tensor:
    """The unit noise the sampler starts from, one tensor per seed (CPU generator seeded with the seed)."""
    return seeded_unit_noise(seeds, LATENT_SHAPE)


@torch.no_grad()
def generate(models: DemoModels, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20, cfg: float = 1.0,
             oms: bool = False, oms_prompts: Sequence[str] | None = None, oms_cfg: float = 1.0,
             chunk: int = 64) -> torch.Tensor:
    """Images [n, 3, 32, 32] in −1..1 for one prompt and one seed each, with or without the OMS step."""
    sigmas = models.denoiser.get_sigmas(steps)
    start = SamplerStart.k_diffusion(float(sigmas[0]))
    images = []
    for begin in range(0, len(prompts), chunk):
        batch_prompts = list(prompts[begin:begin + chunk])
        batch_seeds = list(seeds[begin:begin + chunk])
        noise = seed_noise(batch_seeds)
        if oms:
            oms_batch = list(oms_prompts[begin:begin + chunk]) if oms_prompts is not None else batch_prompts
            noise = oms_start(models.oms, models.encoder, noise, oms_batch, start=start, cfg=oms_cfg, solver="SDE",
                              z=seeded_z(batch_seeds, LATENT_SHAPE))
        cond = models.encoder.encode(batch_prompts)
        uncond = models.encoder.encode([""] * len(batch_prompts)) if cfg != 1.0 else None
        latents = sample_euler(models.denoiser, noise, sigmas, cond, uncond, cfg)
        images.append(decode_latents(latents).clamp(-1.0, 1.0))
    return torch.cat(images)
