"""One More Step for any host: the module and text encoder a generation needs (found, downloaded on first use,
loaded and kept), and for each batch the start noise turned into the corrected start.

A host's glue reads its own objects into the plain values below (where its files are, what its user chose, where its
sampler starts) and writes the result back (its infotext, its noise, its console); nothing here imports a host.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import download, module_files, text_encoders
from .catalog import OPENCLIP_H
from .engine import oms_start
from .errors import ModuleMissingError, TextEncoderMissingError
from .options import AUTOMATIC, CFG, LAYERS, SOLVER_NAMES, solver_named
from .sources import EncoderSource, HostWords, choose_module, huggingface_hub_dir, resolve_text_encoder
from .step import SamplerStart, inpaint_noise, skip_reason

__all__ = ["Choice", "Host", "HostWords", "Inpainting", "ModelText", "OMSRuntime", "Outcome", "Prepared",
           "corrected_start"]


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Host:
    """What a host tells the runtime about itself, in plain values."""

    words: HostWords
    module_dirs: tuple[Path, ...]  # searched in order; a missing module or text encoder is downloaded into the first
    text_encoder_path: str = ""  # a text encoder's file or folder the user set ("": search for one)
    checkpoints: Callable[[], Sequence[Path]] = tuple  # the host's checkpoints: an SD 2.x one holds the text encoder
    hub_dir: Path | None = None  # the local Hugging Face cache (None: where huggingface_hub keeps it)
    download_refused: str | None = None  # why missing files must not be downloaded (None: they are)
    progress: Callable[[str], None] | None = None  # a download's progress, in words
    counts: Callable[[int, int], None] | None = None  # a download's bytes done and in all, for a progress bar
    should_stop: Callable[[], bool] = _never  # the user stopped the generation: a download stops too


@dataclass(frozen=True)
class ModelText:
    """The loaded model's own text encoders, where the host can read them: used before any file (an SD 2.x model
    holds OpenCLIP ViT-H/14, an SDXL model CLIP-L + OpenCLIP bigG)."""

    kinds: frozenset[str]
    identity: tuple  # what tells these weights from another model's: an encoder read from them is kept per identity
    weights: Callable[[], object]  # their .safetensors file or state dict; asked only when an encoder is loaded


@dataclass(frozen=True)
class Choice:
    """What the user chose, and where the weights go."""

    module: str = AUTOMATIC  # a module's name, or Automatic: the module made for the model's latent space
    automatic_defaults: Mapping[str, str] = field(default_factory=dict)  # latent space -> the module Automatic takes
    # there when present (a host's setting)
    layer: str = LAYERS[0]
    device: torch.device = torch.device("cpu")  # where the weights are loaded
    dtype: torch.dtype = torch.float32
    move_kept: bool = True  # kept weights are moved to ``device``; False: the host places them itself
    cuda_graphs: bool = True  # off where weights move between devices for every generation


def module_label(name: str, short_hash: str) -> str:
    """"name [hash]": a module and the file that made an image (the first 10 hex digits of its SHA-256), as infotext
    and node text show it."""
    return f"{name} [{short_hash}]"


@dataclass(eq=False)
class Prepared:
    """A module and its text encoder, ready for ``corrected_start``."""

    name: str  # the module's name among the host's modules
    module: module_files.OMSModule
    encoder: text_encoders.PromptEmbeddingCache
    encoder_source: EncoderSource
    loaded: tuple[str, ...] = ()  # what was read from disk to prepare them, in words (nothing when all was kept)

    @property
    def label(self) -> str:
        return module_label(self.name, self.module.short_hash)

    def torch_models(self) -> list[torch.nn.Module]:
        """The torch modules holding their weights (what a host's memory manager counts or places)."""
        return [self.module.unet, *self.encoder.encoder.torch_models()]

    def to(self, device) -> Prepared:
        self.module.to(device)
        self.encoder.encoder.to(device)
        return self


def _release(value) -> None:
    """Frees a dropped module's or encoder's captured CUDA graphs now, even if it is still referenced elsewhere."""
    (value if isinstance(value, module_files.OMSModule) else value.encoder).release_graphs()


@dataclass(eq=False)
class _Kept:
    kind: str  # "module" | "encoder"
    signature: tuple  # its files' versions when loaded: a changed file is loaded again
    value: object
    companion: object = None


class OMSRuntime:
    """Finds, downloads, loads and keeps OMS modules and their text encoders for a host.

    One cache holds both, bounded per kind (an OMS-B module is 0.3 GB in fp16, OpenCLIP-H's text tower 0.7 GB, SDXL's
    two 1.6 GB). Nothing kept depends on the checkpoint in use, except an encoder read from the model itself, which
    is kept per model; a kept file that changed on disk is loaded again.
    """

    def __init__(self, *, modules_kept: int = 2, encoders_kept: int = 2):
        self._limits = {"module": modules_kept, "encoder": encoders_kept}
        self._kept: OrderedDict[tuple, _Kept] = OrderedDict()
        self._lock = threading.RLock()

    def prepare(self, choice: Choice, latent_space: str, host: Host, model_text: ModelText | None = None) -> Prepared:
        """The module and text encoder for a model of ``latent_space``. Everything that can fail for a reason the user
        can fix (a missing, unfit or corrupt file, a refused download) raises an OMSError saying what to do, before
        any weight of what would be unusable is read."""
        words, dirs = host.words, list(host.module_dirs)
        entry = _found_or_downloaded(
            lambda: choose_module(choice.module, module_files.find_modules([d for d in dirs if d.is_dir()]),
                                  latent_space, choice.automatic_defaults.get(latent_space, ""),
                                  lambda e: module_files.describe_module(e.path).latent_space, dirs, words),
            functools.partial(download.obtain_module, latent_space, dirs[0]), host)
        described = module_files.describe_module(entry.path)
        module_files.check_latent_space(described, latent_space)
        hub_dir = host.hub_dir or huggingface_hub_dir()
        source = _found_or_downloaded(
            lambda: resolve_text_encoder(described.text_encoder, model_holds=model_text.kinds if model_text else (),
                                         text_encoder_path=host.text_encoder_path, module_dirs=dirs, hub_dir=hub_dir,
                                         checkpoints=host.checkpoints(), words=words),
            functools.partial(download.obtain_text_encoder, dirs[0], setting=words.text_encoder_setting), host)
        loaded: list[str] = []
        with self._lock:
            module = self._module(entry.path, choice, loaded)
            encoder = self._encoder(described.text_encoder, source, model_text, choice, loaded)
        module.cuda_graphs = encoder.encoder.cuda_graphs = choice.cuda_graphs
        return Prepared(entry.name, module, encoder, source, tuple(loaded))

    def companion(self, model, make: Callable[[object], object]):
        """A host's object kept beside a kept module or encoder (``model``): made once by ``make(model)`` and dropped
        with it, as ComfyUI's ModelPatcher, which must be the only one to move those weights."""
        with self._lock:
            kept = next((kept for kept in self._kept.values() if kept.value is model), None)
            if kept is None:
                return make(model)
            if kept.companion is None:
                kept.companion = make(model)
            return kept.companion

    def _get(self, key: tuple, signature: tuple):
        kept = self._kept.get(key)
        if kept is not None and kept.signature == signature:
            self._kept.move_to_end(key)
            return kept.value
        if kept is not None:
            _release(self._kept.pop(key).value)
        return None

    def _keep(self, key: tuple, kind: str, signature: tuple, value) -> None:
        self._kept[key] = _Kept(kind, signature, value)
        while sum(kept.kind == kind for kept in self._kept.values()) > self._limits[kind]:
            oldest = next(k for k, kept in self._kept.items() if kept.kind == kind)
            _release(self._kept.pop(oldest).value)

    def _module(self, path: Path, choice: Choice, loaded: list[str]) -> module_files.OMSModule:
        key, signature = ("module", str(path.resolve()), choice.dtype), module_files.module_signature(path)
        module = self._get(key, signature)
        if module is None:
            module = module_files.load_module(path, choice.device, choice.dtype)
            self._keep(key, "module", signature, module)
            loaded.append(f"module {path} ({module.latent_space}, {module.text_encoder})")
        elif choice.move_kept:
            module.to(choice.device)
        return module

    def _encoder(self, kind: str, source: EncoderSource, model_text: ModelText | None, choice: Choice,
                 loaded: list[str]) -> text_encoders.PromptEmbeddingCache:
        from_model = source.origin == "model"
        layer = choice.layer if kind == OPENCLIP_H else LAYERS[0]  # SDXL's two encoders: penultimate, as released
        key = ("encoder", kind, source, model_text.identity if from_model else None, layer, choice.dtype)
        signature = () if from_model else module_files.module_signature(source.path)
        encoder = self._get(key, signature)
        if encoder is None:
            weights = model_text.weights() if from_model else source.path
            if kind == OPENCLIP_H:
                loaded_encoder = text_encoders.load_openclip_text_encoder(weights, layer=layer, device=choice.device,
                                                                          dtype=choice.dtype)
            else:
                loaded_encoder = text_encoders.load_mixclip_text_encoder(weights, device=choice.device,
                                                                         dtype=choice.dtype)
            encoder = text_encoders.PromptEmbeddingCache(loaded_encoder)
            self._keep(key, "encoder", signature, encoder)
            loaded.append(f"text encoder {source.describe()} ({kind}, {layer})")
        elif choice.move_kept:
            encoder.encoder.to(choice.device)
        return encoder


def _found_or_downloaded(find: Callable, obtain: Callable, host: Host):
    """``find()``; when it says a file is missing, ``obtain(missing, ...)`` downloads it (or raises why not: refused,
    offline, failed, each with how to place the files by hand), then ``find()`` again."""
    try:
        return find()
    except (ModuleMissingError, TextEncoderMissingError) as missing:
        obtain(missing, refused=host.download_refused, progress=host.progress, should_stop=host.should_stop,
               counts=host.counts)
        return find()


# ---------------------------------------------------------------------------------------------------------------
# One batch


@dataclass(frozen=True)
class Inpainting:
    """An inpainting whose masked area starts from pure noise: the sampler starts from ``init_latent +
    noise_scale·noise``, and only where ``mask`` is 1 does it start at the OMS latent (a fractional mask blends)."""

    init_latent: torch.Tensor
    mask: torch.Tensor
    noise_scale: float


@dataclass(frozen=True)
class Outcome:
    """What became of a batch's start: the noise to start from instead (None: leave it as it is), why OMS left it,
    and what to tell the user once (the host says them in its console; a skip also goes into its record)."""

    noise: torch.Tensor | None
    skipped: str | None = None
    notes: tuple[str, ...] = ()


def long_prompt_note(max_length: int, prompts: Sequence[str]) -> str | None:
    """What to say when a prompt is longer than the OMS text encoder reads, or None."""
    readable = max_length - 2  # the start and end tokens take two places
    if any(text_encoders.token_count(prompt) > readable for prompt in prompts):
        return (f"a prompt is longer than the {readable} tokens the OMS text encoder reads: OMS reads only its "
                "beginning. Put the words for light and colour first, or write them in the OMS prompt")
    return None


def corrected_start(prepared: Prepared, noise: torch.Tensor, start: SamplerStart | str, *, prompts: Sequence[str],
                    negative_prompt: str = "", cfg: float = CFG.default, solver: str = SOLVER_NAMES[0],
                    draw_z: Callable[[], torch.Tensor] | None = None, inpainting: Inpainting | None = None,
                    placed: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Outcome:
    """The start of one batch: ``noise`` is the unit noise the sampler would start from ([B, C, h, w], one prompt per
    image), ``start`` where and how it starts, or the host's reason why it does not start from pure noise.

    ``draw_z`` draws the SDE solver's fresh noise (each image's from ``lib_oms.engine.z_seed`` of its seed, with the
    host's own generator); it is called only by a solver that takes z. ``placed`` puts the module and encoder where the
    step runs for its duration (a host's memory manager); entered only when OMS applies.
    """
    reason = start if isinstance(start, str) else skip_reason(start)
    if reason:
        return Outcome(None, skipped=reason)
    note = long_prompt_note(prepared.encoder.max_length, [*prompts, negative_prompt])
    unit = noise.float()
    z = draw_z() if solver_named(solver).draws_z else None
    with placed():
        out = oms_start(prepared.module, prepared.encoder, unit, list(prompts), start=start, cfg=cfg,
                        negative_prompt=negative_prompt, solver=solver, z=z)
    if inpainting is not None:
        out = inpaint_noise(out, unit, inpainting.init_latent.float(), inpainting.mask.float(), inpainting.noise_scale)
    return Outcome(out.to(noise.dtype), notes=(note,) if note else ())

