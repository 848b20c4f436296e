"""A diffusers pipeline and its scheduler read into plain values for One More Step: which latent space it works in,
which text encoders it holds, where its scheduler starts and how it scales what it is given, and the noise it would
draw. Judged by what the objects offer, not by their class names or diffusers' version.

Facts of diffusers this rests on (0.27 to 0.42): a pipeline sets its scheduler's timesteps, then ``prepare_latents``
takes the given ``latents`` (else draws ``randn_tensor(shape, generator, device, dtype)``) and multiplies them by
``scheduler.init_noise_sigma``; the UNet's first input is ``scheduler.scale_model_input(x, timesteps[0])``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from lib_oms.catalog import OPENCLIP_H, SDXL_MIXCLIP
from lib_oms.engine import z_seed
from lib_oms.runtime import ModelText

# The VAE scaling factors of the two latent spaces the released modules serve.
LATENT_SPACE_OF_SCALING = {0.18215: "sd", 0.13025: "sdxl"}
OPENCLIP_H_WIDTH, OPENCLIP_H_BLOCKS = 1024, (23, 24)  # SD 2.x's text_encoder drops the unused last block


def latent_space(pipe) -> str:
    """"sd" or "sdxl" for the latent space the pipeline's VAE encodes to, or a sentence saying why OMS cannot serve
    it (another latent space, the SDXL refiner)."""
    vae = getattr(pipe, "vae", None)
    if vae is None or getattr(pipe, "unet", None) is None:
        return f"{type(pipe).__name__} has no VAE and UNet of Stable Diffusion's kind: OMS serves SD1.x/SD2.x and SDXL"
    config = vae.config
    channels = config.get("latent_channels", 4)
    if channels != 4:
        return f"the pipeline's latents have {channels} channels: OMS modules exist for SD1.x/SD2.x and SDXL (4)"
    if config.get("latents_mean") is not None:
        return ("the pipeline's VAE has latent statistics of its own (latents_mean, as Playground 2.5's): no released "
                "OMS module fits that latent space")
    space = next((name for factor, name in LATENT_SPACE_OF_SCALING.items()
                  if math.isclose(config.get("scaling_factor", 0.0), factor, rel_tol=1e-4)), None)
    if space is None:
        return (f"the pipeline's VAE scales latents by {config.get('scaling_factor')}, not as SD1.x/SD2.x (0.18215) "
                "or SDXL (0.13025): another latent space")
    if getattr(pipe, "config", {}).get("requires_aesthetics_score", False):
        return "the pipeline is the SDXL refiner's: it refines images and does not start from noise"
    return space


def _tower_width(encoder) -> int | None:
    config = getattr(encoder, "config", None)
    return getattr(config, "hidden_size", None) if config is not None else None


def model_text(pipe) -> ModelText | None:
    """The pipeline's own text encoders as an OMS module can read them: SD 2.x's OpenCLIP ViT-H/14, or SDXL's CLIP-L
    and OpenCLIP bigG; None for others (SD 1.x's CLIP-L)."""
    first, second = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
    identity = (getattr(pipe.config, "_name_or_path", ""), id(first), id(second))
    if first is not None and second is not None:
        return ModelText(frozenset([SDXL_MIXCLIP]), identity, lambda: {
            **{f"text_encoder.{name}": tensor for name, tensor in first.state_dict().items()},
            **{f"text_encoder_2.{name}": tensor for name, tensor in second.state_dict().items()}})
    if first is not None and _tower_width(first) == OPENCLIP_H_WIDTH and \
            getattr(first.config, "num_hidden_layers", 0) in OPENCLIP_H_BLOCKS:
        return ModelText(frozenset([OPENCLIP_H]), identity, first.state_dict)
    return None


@dataclass(frozen=True)
class SchedulerStart:
    """Where a scheduler starts, as it would for the pipeline's call: ᾱ at its first step, the scale its
    ``scale_model_input`` applies there (1 for VP schedulers; 1/√(1 + σ₀²) for Euler-type ones, whose x is
    x0 + σ·ε), and the ``init_noise_sigma`` the pipeline multiplies the given latents by."""

    alpha_bar0: float
    input_scale: float
    init_noise_sigma: float

    def latents(self, x_vp: torch.Tensor) -> torch.Tensor:
        """The ``latents=`` that make the UNet's first input the VP latent ``x_vp``."""
        return x_vp / (self.input_scale * self.init_noise_sigma)


def scheduler_start(scheduler, num_inference_steps: int | None, *, timesteps=None, sigmas=None) -> SchedulerStart | str:
    """The start of ``scheduler`` for a pipeline called with these steps (and custom ``timesteps`` / ``sigmas``, as
    the pipeline's ``retrieve_timesteps`` passes them), read from a fresh scheduler of the same config so the
    pipeline's own is left as it is; or a sentence saying why OMS cannot tell (no discrete VP schedule: flow matching,
    EDM; an input scaling it does not know)."""
    name = type(scheduler).__name__
    if getattr(scheduler, "alphas_cumprod", None) is None:
        return (f"the scheduler {name} has no discrete-time VP schedule (alphas_cumprod): flow matching, EDM or "
                "another; OMS needs Stable Diffusion's")
    fresh = type(scheduler).from_config(scheduler.config)
    custom = {key: value for key, value in (("timesteps", timesteps), ("sigmas", sigmas)) if value is not None}
    accepted = inspect.signature(fresh.set_timesteps).parameters
    for key in custom:
        if key not in accepted:
            return f"the scheduler {name} takes no custom {key}"
    if custom:
        fresh.set_timesteps(**custom)
    else:
        fresh.set_timesteps(num_inference_steps)
    t0 = fresh.timesteps[0]
    input_scale = float(fresh.scale_model_input(torch.ones(1), t0)[0])
    sigmas_of = getattr(fresh, "sigmas", None)
    if sigmas_of is not None and len(sigmas_of):
        sigma0 = float(sigmas_of[0])
        alpha_bar0 = 1.0 / (1.0 + sigma0**2)
        known = (1.0, math.sqrt(alpha_bar0))  # a VP state, or an Euler-type one (x0 + σ·ε) that divides by √(1 + σ²)
    else:
        alpha_bar0 = float(fresh.alphas_cumprod[int(t0)])
        known = (1.0,)
    if not any(math.isclose(input_scale, scale, rel_tol=1e-4) for scale in known):
        return (f"the scheduler {name} scales its first input by {input_scale:.6g}, which is neither a VP scheduler's "
                "1 nor an Euler-type one's 1/sqrt(1 + sigma^2): OMS cannot tell where it starts")
    return SchedulerStart(alpha_bar0, input_scale, float(fresh.init_noise_sigma))


def batch_size(prompt, num_images_per_prompt: int) -> int:
    """The pipeline's effective batch: one image per prompt (a string is one prompt), times the images per prompt."""
    prompts = 1 if isinstance(prompt, str) else len(prompt)
    return prompts * num_images_per_prompt


def latent_shape(pipe, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
    """The shape of the latents the pipeline draws (its default size when height / width are not given)."""
    factor = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size * factor
    return batch, pipe.vae.config.get("latent_channels", 4), (height or size) // factor, (width or size) // factor


def noise_dtype(pipe) -> torch.dtype:
    """The dtype the pipeline draws its latents in: that of its prompt embeddings (SDXL: its second text encoder's,
    SD: its text encoder's, else the UNet's)."""
    for name in ("text_encoder_2", "text_encoder", "unet"):
        model = getattr(pipe, name, None)
        if model is not None:
            return model.dtype
    return torch.float32


def z_generators(generator):
    """Generators for the SDE solver's z, each seeded with ``z_seed`` of the image's generator's seed (a list gives
    one per image, as the pipeline's own draw does); None when the pipeline draws from torch's global generator."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [z_generators(one) for one in generator]
    return torch.Generator(device=generator.device).manual_seed(z_seed(generator.initial_seed()))
