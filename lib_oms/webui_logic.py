"""Decisions the WebUI glue makes, on plain values: where OMS applies and why not, the sampler's start,
which module and text encoder to use, precision and offloading (what OMS reads as the prompt is read with the
WebUI's own prompt parser, in scripts/).

No WebUI imports: ``scripts/`` reads the WebUI's objects into the plain values these functions take.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModuleFileError, ModuleMissingError, TextEncoderError, TextEncoderMissingError
from .modules import file_version
from .step import SamplerStart, sigma_from_alpha_bar
from .text_encoders import OPENCLIP_VIT_H14, holds_text_tower
from .webui_args import AUTOMATIC

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
# The sampler's start (webui.md §2.1, §2.2, §2.7, §2.8)

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


def inpaint_noise(oms_noise: torch.Tensor, noise: torch.Tensor, init_latent: torch.Tensor, nmask: torch.Tensor,
                  sigma0: float) -> torch.Tensor:
    """The img2img noise that makes the masked area start exactly at the OMS latent.

    img2img starts from ``init + σ₀·noise``; inside the mask (nmask = 1) ``init`` is 0 ("latent nothing") or unit
    noise ("latent noise"). With ``oms_noise`` = x_VE/σ₀ (``to_sampler_noise`` of a k-diffusion start) the returned
    noise' = noise + nmask·(oms_noise − init/σ₀ − noise) gives init + σ₀·noise' = x_VE inside the mask and leaves
    the noise outside it unchanged (fractional soft-inpainting masks blend the two).
    """
    return noise + nmask * (oms_noise - init_latent / sigma0 - noise)


# ---------------------------------------------------------------------------------------------------------------
# Modules and text encoders

RELEASED_MODULES = {
    "sd": "h1t/oms_b_openclip_15_21 (SD1.5 / SD2.1 and their fine-tunes, LoRAs, LCM)",
    "sdxl": "h1t/oms_b_openclip_xl (SDXL and its fine-tunes, LoRAs)",
}


def named_module(name: str, entries: Sequence, searched: Sequence[Path]):
    """The module entry called ``name``; ModuleFileError saying where it was looked for when there is none."""
    for entry in entries:
        if entry.name == name:
            return entry
    where = ", ".join(str(path) for path in searched)
    raise ModuleFileError(f"OMS module {name!r} was not found in {where}: put it there and press the refresh button, "
                          "or choose 'Automatic'")


def choose_module(choice: str, entries: Sequence, latent_space: str, default_name: str,
                  latent_space_of: Callable[[object], str], searched: Sequence[Path]):
    """The module entry to use: the one named, or for "Automatic" the default set for this latent space, else the
    first found module of this latent space. Raises ModuleFileError (ModuleMissingError when "Automatic" finds no
    module of this latent space, which a download can fix) saying what to download and where."""
    if choice != AUTOMATIC:
        return named_module(choice, entries, searched)
    where = ", ".join(str(path) for path in searched)
    by_name = {entry.name: entry for entry in entries}
    if default_name and default_name in by_name and latent_space_of(by_name[default_name]) == latent_space:
        return by_name[default_name]
    for entry in entries:
        if latent_space_of(entry) == latent_space:
            return entry
    wanted = RELEASED_MODULES.get(latent_space, f"an OMS module trained for the {latent_space} latent space")
    raise ModuleMissingError(f"no OMS module for this checkpoint's latent space ({latent_space}) was found in {where}: "
                          f"download {wanted} into one of these folders (see models/README.md)")


@dataclass(frozen=True)
class EncoderSource:
    """Where the text encoder comes from: the loaded checkpoint's own weights, or a file or folder."""

    origin: str  # "checkpoint" | "file"
    path: Path | None = None

    def describe(self) -> str:
        return "the loaded checkpoint's text encoder" if self.origin == "checkpoint" else str(self.path)


OPENCLIP_H = "openclip-h"
SDXL_MIXCLIP = "sdxl-mixclip"
# Where the local Hugging Face cache keeps SD 2.x's text encoder: Stability AI's SD 2.x repositories (deleted from the
# hub in November 2025, still in older caches), the sd2-community mirrors, and LAION's OpenCLIP ViT-H/14 itself.
_HF_CACHE_GLOBS = (
    "models--stabilityai--stable-diffusion-2*/snapshots/*/text_encoder",
    "models--sd2-community--stable-diffusion-2*/snapshots/*/text_encoder",
    "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K/snapshots/*/open_clip_model.safetensors",
    "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K/snapshots/*/model.safetensors",
)


def unwrap_hijacked_keys(state_dict) -> dict:
    """Tensor names as in the checkpoint: the WebUI wraps text-encoder modules (embeddings, long prompts), which adds
    ".wrapped" to the names of a live model's state dict."""
    return {re.sub(r"(^|\.)wrapped\.", r"\1", name): tensor for name, tensor in state_dict.items()}


def huggingface_hub_dir(environ: dict | None = None) -> Path:
    """The local Hugging Face hub cache: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub."""
    environ = os.environ if environ is None else environ
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(variable):
            return Path(environ[variable])
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _usable(path: Path) -> bool:
    """A .safetensors file, or a folder holding one (never a pickle: .bin/.ckpt are not loaded)."""
    if path.is_file():
        return path.suffix == ".safetensors"
    return path.is_dir() and any(path.glob("*.safetensors"))


def placed_text_encoders(setting_path: str, module_dirs: Sequence[Path]) -> list[Path]:
    """Text encoders the user placed, in search order: the setting's path, then ``*text_encoder*`` in the module
    folders (``<models>/oms/text_encoder/`` first). A set path that does not exist raises: it is a typo to fix."""
    found: list[Path] = []
    if setting_path.strip():
        path = Path(setting_path.strip()).expanduser()
        if not _usable(path):
            raise TextEncoderError(f"the OMS text encoder path set in Settings ({path}) is not a .safetensors file "
                                   "or a folder holding one: fix the path or clear it for the automatic search")
        found.append(path)
    for folder in module_dirs:
        named = sorted(Path(folder).glob("*text_encoder*"), key=lambda path: (path.name != "text_encoder", path.name))
        found += [path for path in named if _usable(path)]
    return found


def cached_text_encoders(hub_dir: Path) -> list[Path]:
    """SD 2.x text encoders already in the local Hugging Face cache (nothing is downloaded)."""
    return [path for pattern in _HF_CACHE_GLOBS for path in sorted(hub_dir.glob(pattern)) if _usable(path)]


_SD2_CHECKPOINT: dict[tuple[str, int, int], bool] = {}  # (path, mtime, size) -> holds OpenCLIP ViT-H/14


def sd2_checkpoints(checkpoints: Sequence[Path]) -> list[Path]:
    """The .safetensors checkpoints (the WebUI's list) that hold SD 2.x's OpenCLIP ViT-H/14 text encoder, judged from
    their headers once per file version; only their text tensors are read when one is used."""
    found = []
    for path in map(Path, checkpoints):
        if path.suffix != ".safetensors" or not path.is_file():
            continue
        key = file_version(path)
        if key not in _SD2_CHECKPOINT:
            _SD2_CHECKPOINT[key] = holds_text_tower(path, OPENCLIP_VIT_H14)
        if _SD2_CHECKPOINT[key]:
            found.append(path)
    return found


def resolve_text_encoder(kind: str, family: str, *, setting_path: str, module_dirs: Sequence[Path],
                         hub_dir: Path, checkpoints: Sequence[Path] = ()) -> EncoderSource:
    """The first available text encoder source for an encoder ``kind`` (decision 6), or TextEncoderError.

    openclip-h: the loaded SD2.x checkpoint's own encoder, a file/folder the user placed, a local HF cache entry, an
    SD 2.x checkpoint among ``checkpoints``; none: TextEncoderMissingError (a download can fix it).
    sdxl-mixclip: the loaded SDXL checkpoint's own CLIP-L + bigG.
    """
    if kind == SDXL_MIXCLIP:
        if family == "sdxl":
            return EncoderSource("checkpoint")
        raise TextEncoderError("this OMS module reads SDXL's own text encoders: load an SDXL checkpoint")
    if kind != OPENCLIP_H:
        raise TextEncoderError(f"the OMS module needs a {kind!r} text encoder, which the WebUI extension cannot "
                               f"provide: use a module made for {OPENCLIP_H} or {SDXL_MIXCLIP}")
    if family == "sd2":
        return EncoderSource("checkpoint")
    candidates = placed_text_encoders(setting_path, module_dirs) + cached_text_encoders(hub_dir)
    if not candidates:  # the checkpoints' headers are read only when nothing else is there
        candidates = sd2_checkpoints(checkpoints)
    if candidates:
        return EncoderSource("file", candidates[0])
    first_dir = module_dirs[0] if module_dirs else Path("models/oms")
    raise TextEncoderMissingError(
        "the OMS module needs the OpenCLIP ViT-H/14 text encoder of SD 2.x and none was found (searched "
        f"{Path(first_dir) / 'text_encoder'}, the path in Settings > One More Step, the local Hugging Face cache "
        f"{hub_dir} and the WebUI's .safetensors checkpoints); with an SD 2.x checkpoint loaded its own encoder is "
        "used")


# ---------------------------------------------------------------------------------------------------------------
# Precision and memory (decision 10)

PRECISIONS = ("Automatic", "fp16", "fp32")


def module_dtype(precision: str, device_type: str, webui_full_precision: bool) -> torch.dtype:
    """fp16 on a GPU unless the WebUI runs in full precision (--no-half) or the setting says fp32; fp32 on CPU."""
    if device_type == "cpu" or precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    return torch.float32 if webui_full_precision else torch.float16


def offload_after_use(keep_in_vram: bool, low_vram: bool, device_type: str) -> bool:
    """Move the module and text encoder back to the CPU after the step: always in low/med-VRAM mode."""
    return device_type != "cpu" and (low_vram or not keep_in_vram)
