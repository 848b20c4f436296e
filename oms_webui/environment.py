"""What the WebUI tells the OMS runtime, read into plain values: its module folders, checkpoints, settings, console
and progress text, and its own words for where a user sets things. Imports the WebUI's ``modules`` (present in every
A1111-family WebUI and SD.Next) when a function runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from lib_oms import module_files
from lib_oms.options import AUTOMATIC
from lib_oms.runtime import Host, HostWords
from oms_webui.args import TITLE
from oms_webui.settings import DOWNLOAD_SETTING, setting

EXTENSION_DIR = Path(__file__).resolve().parents[1]
WORDS = HostWords(
    text_encoder_setting=f"Settings > {TITLE}",
    other_places=(f"the path in Settings > {TITLE}, the local Hugging Face cache {{hub_dir}} and the WebUI's "
                  ".safetensors checkpoints; with an SD 2.x checkpoint loaded its own encoder is used"),
    refresh="press the refresh button next to OMS module",
)


def log(message: str) -> None:
    print(f"[{TITLE}] {message}")


def module_dirs() -> list[Path]:
    """<models>/oms (survives reinstalling), --oms-models-dir, then the extension's own models/."""
    from modules import paths, shared

    dirs = [Path(paths.models_path) / "oms"]
    extra = getattr(shared.cmd_opts, "oms_models_dir", None)
    if extra:
        dirs.append(Path(extra))
    return dirs + [EXTENSION_DIR / "models"]


def module_entries() -> list:
    return module_files.find_modules([d for d in module_dirs() if d.is_dir()])


def module_choices() -> list[str]:
    return [AUTOMATIC] + [entry.name for entry in module_entries()]


def checkpoint_files() -> list[Path]:
    """The WebUI's checkpoints (an SD 2.x one holds the text encoder the released modules read prompts with)."""
    from modules import sd_models

    return [Path(info.filename) for info in sd_models.checkpoints_list.values()]


def download_refused() -> str | None:
    """Why missing files must not be downloaded, or None: downloading on first use is on by default."""
    from modules import shared

    if getattr(shared.cmd_opts, "oms_no_download", False):
        return "downloading is off (--oms-no-download)"
    if not setting("oms_auto_download"):
        return f"downloading is off ({DOWNLOAD_SETTING})"
    return None


def interrupted() -> bool:
    from modules import shared

    state = shared.state
    return bool(state.interrupted or state.skipped or getattr(state, "stopping_generation", False))


def show_progress(text: str) -> None:
    from modules import shared

    shared.state.textinfo = text  # the WebUI's progress text


def host() -> Host:
    """The WebUI as the runtime sees it now (folders and settings are read at every generation: they can change)."""
    return Host(WORDS, tuple(module_dirs()), text_encoder_path=setting("oms_text_encoder_path"),
                checkpoints=checkpoint_files, download_refused=download_refused(), progress=show_progress,
                should_stop=interrupted)


# How a WebUI lets a script change where sampling starts, judged by what it has (not by its name):
RNG_HOOK = "p.rng"  # the A1111 family: its ImageRNG (modules.rng) draws the start noise through p.rng
INIT_LATENT_HOOK = "p.init_latent"  # SD.Next: p.init_latent becomes the diffusers pipeline's latents=


def has_module(name: str) -> bool:
    """Whether the WebUI has the module ``name`` (imported already, or importable), without importing it."""
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def start_hook() -> str | None:
    """The hook this WebUI offers (RNG_HOOK or INIT_LATENT_HOOK), or None where it offers neither."""
    if has_module("modules.rng"):
        return RNG_HOOK
    if has_module("modules.processing_args"):
        return INIT_LATENT_HOOK
    return None


def cannot_run(hook: str | None) -> str | None:
    """Why One More Step cannot change the start in this WebUI as it runs now, or None when it can."""
    if hook is None:
        return (f"{TITLE} cannot run in this WebUI: it offers neither the A1111 family's p.rng nor SD.Next's "
                "p.init_latent, through which a script sets where sampling starts")
    from modules import shared

    if shared.opts.data.get("forge_model_mode") == "api":
        return (f"{TITLE} cannot run while Forge Neo is in API mode (Settings: forge_model_mode), which runs no "
                "script; switch it back to local mode to use it")
    return None
