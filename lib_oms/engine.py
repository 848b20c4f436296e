"""The corrected start latent for a batch: text encoding, the OMS network call, the step and the hand-over."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .errors import TextEncoderError
from .options import check_cfg, solver_named
from .step import SamplerStart, ddim_step, guided_v, predicted_x0, sde_step, to_sampler_noise

# z is drawn from the image's seed shifted by this offset, so it never equals the seed's own start noise.
Z_SEED_OFFSET = 0x4F4D53  # "OMS"
SEED_RANGE = 2**64  # every torch generator takes a seed in [0, 2**64)
# Each solver's step (lib_oms.options.SOLVERS): x_T from x̂0, ᾱ₀ and its second input, z or the OMS input x_T'.
SOLVER_STEPS = {"SDE": sde_step, "DDIM": ddim_step}


def z_seed(seed: int) -> int:
    """The seed an image's fresh noise z is drawn from, the same rule in every host: its own seed + Z_SEED_OFFSET,
    wrapped into the range a generator takes (a host's seeds may reach 2**64 - 1)."""
    return (int(seed) + Z_SEED_OFFSET) % SEED_RANGE


def seeded_unit_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """One unit Gaussian tensor of ``shape`` per seed, each from a CPU generator seeded with that seed.

    Each image's noise depends on its own seed only, so a batch equals the same images made one by one.
    """
    draws = []
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(int(seed) % SEED_RANGE)
        draws.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(draws)


def seeded_z(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The fresh noise z of the SDE solver for images of these seeds, on a CPU generator (``z_seed``)."""
    return seeded_unit_noise([z_seed(seed) for seed in seeds], shape)


def _as_list(prompts: str | Sequence[str], batch_size: int, what: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * batch_size
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} {what} for a batch of {batch_size} images")
    return prompts


def own_precision(device: torch.device):
    """A context in which the OMS module and text encoder run in their weights' dtype on ``device``.

    The WebUI samples under its fp16 autocast: without this, an fp32 module (precision setting "fp32") would run
    its matmuls and convolutions in fp16, and the eager path would differ from the captured CUDA graphs.
    """
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # other backends' autocast cannot be on around torch 2.0's calls


@torch.no_grad()
def predict_v(module, encoder, x_T_prime: torch.Tensor, prompts: Sequence[str], negative_prompts: Sequence[str],
              cfg: float) -> torch.Tensor:
    """The guided OMS prediction v for unit noise ``x_T_prime``; at CFG 1 the unconditional pass is not computed.

    With CFG, the negative and the positive prompts are encoded in one call and run through the network together.
    """
    device, dtype = module.device, module.dtype
    x = x_T_prime.to(device, dtype)
    with own_precision(device):
        if cfg == 1.0:
            cond = encoder.encode(list(prompts)).to(device, dtype)
            return module.forward(x, cond).float()
        context = encoder.encode(list(negative_prompts) + list(prompts)).to(device, dtype)
        v_uncond, v_cond = module.forward(torch.cat([x, x]), context).float().chunk(2)
    return guided_v(v_uncond, v_cond, cfg)


def oms_start(module, encoder, noise: torch.Tensor, prompts: str | Sequence[str], *, start: SamplerStart,
              cfg: float = 1.0, negative_prompt: str | Sequence[str] = "", solver: str = "SDE",
              z: torch.Tensor | None = None) -> torch.Tensor:
    """The noise tensor to hand the sampler instead of ``noise`` so that it starts from the OMS-corrected latent.

    ``noise`` is the unit Gaussian the sampler would have used ([B, C, h, w]); it is the OMS input x_T'. ``prompts``
    holds one prompt per image (or one for all); ``z`` is the fresh unit noise of the SDE solver, one per image and
    derived from each image's seed by the caller. Returns a tensor of ``noise``'s shape, dtype and device.
    """
    cfg, solver = check_cfg(cfg), solver_named(solver)
    if noise.dim() != 4:
        raise ValueError(f"noise must be [batch, channels, height, width], got shape {tuple(noise.shape)}")
    batch, channels = noise.shape[:2]
    if channels != module.config["in_channels"]:
        raise ValueError(f"the OMS module {module.name} takes {module.config['in_channels']}-channel latents, "
                         f"this model's latents have {channels}")
    if encoder.kind != module.text_encoder:
        raise TextEncoderError(f"the OMS module {module.name} needs a {module.text_encoder} text encoder, "
                               f"got {encoder.kind}: choose the text encoder that matches the module")
    if encoder.width != module.text_width:
        raise TextEncoderError(f"the OMS module {module.name} reads {module.text_width}-wide text features but its "
                               f"{encoder.kind} text encoder gives {encoder.width}-wide ones: the module's files say "
                               "the wrong text encoder, or the text encoder file is another model's")
    if solver.draws_z and (z is None or z.shape != noise.shape):
        raise ValueError(f"the {solver.name} solver needs fresh noise z of shape {tuple(noise.shape)}")
    prompts = _as_list(prompts, batch, "prompts")
    negative_prompts = _as_list(negative_prompt, batch, "negative prompts")

    v = predict_v(module, encoder, noise, prompts, negative_prompts, cfg).to(noise.device)
    x0_hat = predicted_x0(v)
    second = z.to(noise.device, torch.float32) if solver.draws_z else noise.float()
    x_T = SOLVER_STEPS[solver.name](x0_hat, start.alpha_bar0, second)
    return to_sampler_noise(x_T, start).to(noise.dtype)
