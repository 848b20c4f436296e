"""Decisions the A1111-family glue makes, on plain values: where OMS applies and why not, the sampler's start
and offloading (what OMS reads as the prompt is read with the WebUI's own prompt parser, in
scripts/). Which module and text encoder to use is host-neutral: ``lib_oms.sources``.

No WebUI imports: ``scripts/`` reads the WebUI's objects into the plain values these functions take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lib_oms.step import SamplerStart, sigma_from_alpha_bar

# ---------------------------------------------------------------------------------------------------------------
# Where OMS applies

# The checkpoint families of the WebUI's model flags, and the OMS latent space each one lives in.
LATENT_SPACE_OF_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}
INPAINT_FILL_LATENT_NOISE = 2
INPAINT_FILL_LATENT_NOTHING = 3
ZERO_TERMINAL_SNR_SCHEDULE = "Zero Terminal SNR"
IMG2IMG_RULE = ("OMS applies to img2img only for inpainting with 'latent noise' or 'latent nothing' fill at "
                "denoising strength 1, where the masked area starts from pure noise")


@dataclass(frozen=True)
class Job:
    """What kind of sampling a generation does, read from the WebUI's processing object."""

    mode: str  # "txt2img" | "img2img"
    hires: bool = False  # txt2img with hires fix: a second, img2img-like pass follows
    firstpass_image: bool = False  # "hires fix on an existing image": there is no first pass
    refiner: bool = False  # the SDXL refiner takes over part of the way
    inpainting: bool = False  # img2img with a mask
    inpainting_fill: int = 1  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    denoising_strength: float = 0.75
    initial_noise_multiplier: float = 1.0
    extra_noise: float = 0.0
    noise_schedule: str = "Default"
    checkpoint_zero_terminal_snr: bool = False  # the checkpoint turns the schedule on itself (Forge Neo: a ztsnr key)


NO_REFINER = (None, "", "None", "none")  # what the WebUI's processing reads as "no refiner checkpoint"


def uses_refiner(checkpoint: str | None, switch_at: float | None) -> bool:
    """Whether the WebUI hands sampling to a refiner: a refiner checkpoint is named and the switch point is before
    the end (none given: the WebUI switches at the first step)."""
    return checkpoint not in NO_REFINER and (switch_at is None or switch_at < 1.0)


def model_skip_reason(family: str, latent_channels: int) -> str | None:
    """Why OMS cannot run on this checkpoint, or None. ``family`` is "sd1", "sd2", "sdxl", "sdxl-refiner",
    "sd3" or another name for models with other latent spaces (Flux, ...)."""
    if family == "sdxl-refiner":
        return "the SDXL refiner is the loaded checkpoint: it refines images and does not start from noise"
    if family not in LATENT_SPACE_OF_FAMILY:
        return (f"{family} checkpoints use another latent space: OMS modules exist for SD1.x/SD2.x and SDXL "
                "(train one for this latent space with the trainer)")
    if latent_channels != 4:
        return f"the checkpoint's latents have {latent_channels} channels, the SD1.x/SD2.x/SDXL latent space has 4"
    return None


def job_skip_reason(job: Job) -> str | None:
    """Why no sampling in this generation starts from pure noise, or None when the first pass does."""
    if job.noise_schedule == ZERO_TERMINAL_SNR_SCHEDULE:
        return "zero-terminal-SNR noise schedule: sampling already starts from pure noise, nothing to correct"
    if job.checkpoint_zero_terminal_snr:
        return ("the checkpoint turns on a zero-terminal-SNR schedule (its ztsnr key): sampling already starts from "
                "pure noise, nothing to correct")
    if job.mode == "txt2img":
        if job.firstpass_image:
            return "hires fix on an existing image has no first pass to correct"
        return None
    if not job.inpainting:
        return f"img2img starts from the input image; {IMG2IMG_RULE}"
    if job.inpainting_fill not in (INPAINT_FILL_LATENT_NOISE, INPAINT_FILL_LATENT_NOTHING):
        return f"inpainting keeps the input image under the mask with this fill; {IMG2IMG_RULE}"
    if job.denoising_strength < 1.0:
        return f"denoising strength {job.denoising_strength:g} keeps part of the input image; {IMG2IMG_RULE}"
    if job.initial_noise_multiplier != 1.0:
        return (f"the img2img noise multiplier is {job.initial_noise_multiplier:g}: the masked area does not "
                "start at the sampler's noise level (set it to 1)")
    if job.extra_noise > 0:
        return "extra noise for img2img is on: the start is more than the sampler's own noise (set it to 0)"
    return None


def untouched_passes(job: Job) -> list[str]:
    """The parts of an applied generation OMS leaves alone (said in the infotext, never silently)."""
    notes = []
    if job.mode == "txt2img" and job.hires:
        notes.append("hires fix second pass")
    if job.refiner:
        notes.append("refiner")
    return notes


# ---------------------------------------------------------------------------------------------------------------
# The sampler's start: k-diffusion samplers start at their first sigma, timestep samplers at their first timestep

K_DIFFUSION = "k-diffusion"
TIMESTEP = "timestep"
UNIPC_NAMES = {"unipc"}


def txt2img_start(kind: str, name: str, *, sigmas=None, timesteps=None, alphas_cumprod=None,
                  sgm_noise_multiplier: bool = False) -> SamplerStart:
    """Where a txt2img sampler starts, from what it reports.

    k-diffusion and LCM: σ₀ = the first sigma of the schedule in use (any scheduler, sigma-max setting);
    DDIM / DDIM CFG++ / PLMS: ᾱ at their first timestep ``timesteps[-1]``; UniPC: ᾱ at t = 999 (the last entry).
    """
    if kind == K_DIFFUSION:
        return SamplerStart.k_diffusion(float(sigmas[0]), sgm_noise_multiplier)
    if kind == TIMESTEP:
        index = len(alphas_cumprod) - 1 if name.lower() in UNIPC_NAMES else int(timesteps[-1])
        return SamplerStart.timestep(float(alphas_cumprod[index]))
    raise ValueError(f"unknown sampler kind {kind!r}")


def img2img_start(kind: str, *, steps: int, t_enc: int, sigmas=None, timesteps=None,
                  alphas_cumprod=None) -> SamplerStart:
    """The noise level at which img2img noises its init latent, as a k-diffusion start without the SGM multiplier.

    Both families start from ``init + σ·noise`` in k-diffusion units: k-diffusion with σ = ``sigmas[steps-t_enc-1]``,
    timestep samplers as √ᾱ·(init + σ·noise) with ᾱ at ``timesteps[t_enc]`` (σ = √((1 − ᾱ)/ᾱ)).
    """
    if kind == K_DIFFUSION:
        return SamplerStart.k_diffusion(float(sigmas[steps - t_enc - 1]))
    if kind == TIMESTEP:
        return SamplerStart.k_diffusion(sigma_from_alpha_bar(float(alphas_cumprod[int(timesteps[t_enc])])))
    raise ValueError(f"unknown sampler kind {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Memory: fp16 on the GPU, offloaded after the step in the WebUI's low-VRAM modes


def offload_after_use(keep_in_vram: bool, low_vram: bool, device_type: str) -> bool:
    """Move the module and text encoder back to the CPU after the step: always in low/med-VRAM mode."""
    return device_type != "cpu" and (low_vram or not keep_in_vram)


# The states of the Forge family's memory manager (backend.memory_management / ldm_patched's model_management,
# VRAMState) in which it keeps models off the GPU between uses: --always-low-vram / --lowvram, --always-no-vram.
MANAGER_LOW_VRAM_STATES = ("LOW_VRAM", "NO_VRAM")


def manager_low_vram(vram_state: str) -> bool:
    """Whether the WebUI's memory manager, in ``vram_state`` (a VRAMState name), wants models offloaded after use."""
    return vram_state in MANAGER_LOW_VRAM_STATES


def room_to_ask(bytes_to_move: int, inference_bytes: int) -> int:
    """Bytes to ask the memory manager to free before the module and text encoder go to the GPU: their weights not
    there yet, plus the working memory it keeps for one inference (minimum_inference_memory), as it asks itself
    before loading a model."""
    return int(bytes_to_move) + int(inference_bytes)


def unwrap_hijacked_keys(state_dict) -> dict:
    """Tensor names as in the checkpoint: the WebUI wraps text-encoder modules (embeddings, long prompts), which adds
    ".wrapped" to the names of a live model's state dict."""
    return {re.sub(r"(^|\.)wrapped\.", r"\1", name): tensor for name, tensor in state_dict.items()}
