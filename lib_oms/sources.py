"""Where an OMS module and its text encoder come from, and in which precision they run, on plain values: each host
tells its folders, settings and its own words for them (``HostWords``); ``lib_oms.runtime`` asks these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .catalog import OPENCLIP_H, RELEASED_MODULES, SDXL_MIXCLIP
from .errors import ModuleFileError, ModuleMissingError, TextEncoderError, TextEncoderMissingError
from .module_files import file_version
from .options import AUTOMATIC
from .text_encoders import OPENCLIP_VIT_H14, holds_text_tower


@dataclass(frozen=True)
class HostWords:
    """A host's own words for the places its user acts on, in the messages that say what to do."""

    text_encoder_setting: str  # where the text encoder's file is set, e.g. "Settings > One More Step"
    other_places: str  # what else the host searches for the text encoder; "{hub_dir}" is filled in
    refresh: str  # what makes a module placed while the host runs appear, e.g. "press the refresh button"


# ---------------------------------------------------------------------------------------------------------------
# Modules and text encoders


def named_module(name: str, entries: Sequence, searched: Sequence[Path], words: HostWords):
    """The module entry called ``name``; ModuleFileError saying where it was looked for when there is none."""
    for entry in entries:
        if entry.name == name:
            return entry
    where = ", ".join(str(path) for path in searched)
    raise ModuleFileError(f"OMS module {name!r} was not found in {where}: put it there and {words.refresh}, "
                          f"or choose {AUTOMATIC!r}")


def choose_module(choice: str, entries: Sequence, latent_space: str, default_name: str,
                  latent_space_of: Callable[[object], str], searched: Sequence[Path], words: HostWords):
    """The module entry to use: the one named, or for "Automatic" the default set for this latent space, else the
    authors' released module for it when found, else the first found module of this latent space. Raises
    ModuleFileError (ModuleMissingError when "Automatic" finds no module of this latent space, which a download can
    fix) saying what to download and where."""
    if choice != AUTOMATIC:
        return named_module(choice, entries, searched, words)
    where = ", ".join(str(path) for path in searched)
    by_name = {entry.name: entry for entry in entries}
    released = RELEASED_MODULES.get(latent_space)
    for preferred in (default_name, released.folder if released else ""):
        if preferred and preferred in by_name and latent_space_of(by_name[preferred]) == latent_space:
            return by_name[preferred]
    for entry in entries:
        if latent_space_of(entry) == latent_space:
            return entry
    wanted = released.describe() if released else f"an OMS module trained for the {latent_space} latent space"
    raise ModuleMissingError(f"no OMS module for this checkpoint's latent space ({latent_space}) was found in {where}: "
                          f"download {wanted} into one of these folders (see models/README.md)")


@dataclass(frozen=True)
class EncoderSource:
    """Where the text encoder comes from: the loaded model's own weights, or a file or folder."""

    origin: str  # "model" | "file"
    path: Path | None = None

    def describe(self) -> str:
        return "the loaded model's own text encoder" if self.origin == "model" else str(self.path)

# Where the local Hugging Face cache keeps SD 2.x's text encoder: Stability AI's SD 2.x repositories (deleted from the
# hub in November 2025, still in older caches), the sd2-community mirrors, and LAION's OpenCLIP ViT-H/14 itself.
_HF_CACHE_GLOBS = (
    "models--stabilityai--stable-diffusion-2*/snapshots/*/text_encoder",
    "models--sd2-community--stable-diffusion-2*/snapshots/*/text_encoder",
    "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K/snapshots/*/open_clip_model.safetensors",
    "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K/snapshots/*/model.safetensors",
)


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


def placed_text_encoders(setting_path: str, module_dirs: Sequence[Path], words: HostWords | None = None) -> list[Path]:
    """Text encoders the user placed, in search order: the set path, then ``*text_encoder*`` in the module folders
    (``<models>/oms/text_encoder/`` first). A set path that does not exist raises: it is a typo to fix (``words`` say
    where it was set)."""
    found: list[Path] = []
    if setting_path.strip():
        path = Path(setting_path.strip()).expanduser()
        if not _usable(path):
            where = f" set in {words.text_encoder_setting}" if words else ""
            raise TextEncoderError(f"the OMS text encoder path{where} ({path}) is not a .safetensors file or a folder "
                                   "holding one: fix the path or clear it for the automatic search")
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


def resolve_text_encoder(kind: str, *, model_holds: Collection[str] = (), text_encoder_path: str = "",
                         module_dirs: Sequence[Path], hub_dir: Path, checkpoints: Sequence[Path] = (),
                         words: HostWords) -> EncoderSource:
    """The first available source of the text encoder ``kind``, or TextEncoderError.

    ``model_holds``: the kinds of text encoder the loaded model itself holds, as far as the host can read them (an
    SD 2.x checkpoint: OpenCLIP ViT-H/14; SDXL: its own CLIP-L + bigG); those are used first.
    openclip-h: else the file or folder set (``text_encoder_path``), one placed in a module folder, a local Hugging Face
    cache entry, an SD 2.x checkpoint among ``checkpoints``; none: TextEncoderMissingError (a download can fix it),
    whose message names the first module folder and then the host's ``words.other_places``.
    sdxl-mixclip: only from the loaded model.
    """
    if kind in model_holds:
        return EncoderSource("model")
    if kind == SDXL_MIXCLIP:
        raise TextEncoderError("this OMS module reads prompts with an SDXL checkpoint's own CLIP-L and OpenCLIP bigG "
                               "text encoders, which are not available here: use it with an SDXL checkpoint, or use "
                               "the released oms_b_openclip_xl, which reads OpenCLIP ViT-H/14")
    if kind != OPENCLIP_H:
        raise TextEncoderError(f"the OMS module needs a {kind!r} text encoder, which One More Step cannot "
                               f"provide: use a module made for {OPENCLIP_H} or {SDXL_MIXCLIP}")
    candidates = placed_text_encoders(text_encoder_path, module_dirs, words) + cached_text_encoders(hub_dir)
    if not candidates:  # the checkpoints' headers are read only when nothing else is there
        candidates = sd2_checkpoints(checkpoints)
    if candidates:
        return EncoderSource("file", candidates[0])
    first_dir = module_dirs[0] if module_dirs else Path("models/oms")
    raise TextEncoderMissingError(
        "the OMS module needs the OpenCLIP ViT-H/14 text encoder of SD 2.x and none was found (searched "
        f"{Path(first_dir) / 'text_encoder'}, {words.other_places.format(hub_dir=hub_dir)})")


# ---------------------------------------------------------------------------------------------------------------
# Precision

def module_dtype(precision: str, device_type: str, host_full_precision: bool) -> torch.dtype:
    """fp16 on a GPU unless the host runs its model in full precision or ``precision`` says fp32; fp32 on the CPU."""
    if device_type == "cpu" or precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    return torch.float32 if host_full_precision else torch.float16
