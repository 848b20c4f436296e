"""OMS module files: load, save, discover, cache, hash, and which latent space a module belongs to.

Two layouts load: the released folder (``model_index.json``, ``oms_module/config.json``,
``oms_module/diffusion_pytorch_model[.fp16].safetensors``) and a lone ``.safetensors``. Every bad input raises
ModuleFileError naming the file and the remedy before any tensor is read (except NaN or infinite values, which only
the read tensors show, refused before the network is built); weights are read with safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .catalog import OPENCLIP_H, PICKLE_SUFFIXES, SDXL_MIXCLIP, TEXT_ENCODER_BY_WIDTH
from .cuda_graphs import GraphedCall
from .errors import LatentSpaceError, ModuleFileError
from .unet import OMSUNet, infer_unet_config, normalize_unet_config, parameter_shapes

WEIGHTS_STEM = "diffusion_pytorch_model"
COMPONENT = "oms_module"
UNET_CLASS = "UNet2DConditionWoCTModel"
DIFFUSERS_VERSION = "0.23.1"  # the released modules' _diffusers_version
# bytes per element of every safetensors dtype; OMS weights must be one of FLOAT_DTYPES
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100_000_000
# model_index.json components the official OMSPipeline loads, by our text-encoder id
TEXT_COMPONENTS = {
    OPENCLIP_H: {"oms_text_encoder": ["transformers", "CLIPTextModel"],
                   "oms_tokenizer": ["transformers", "CLIPTokenizer"]},
    SDXL_MIXCLIP: {"oms_text_encoder": ["diffusers_patch", "SDXLTextEncoder"],
                     "oms_tokenizer": ["diffusers_patch", "SDXLTokenizer"]},
}


@dataclass(eq=False)
class OMSModule:
    """A loaded OMS module. ``unet`` is in eval mode with gradients off; ``.to`` moves it in place.

    Call ``forward`` for the prediction: on a CUDA device it replays captured CUDA graphs unless ``cuda_graphs`` is
    turned off (do that when the module is moved in and out of the GPU for every generation).
    """

    name: str
    path: Path
    weights_path: Path
    config: dict
    unet: OMSUNet
    latent_space: str
    text_encoder: str
    short_hash: str
    cuda_graphs: bool = True

    def __post_init__(self):
        self.channels_last = False
        self._network = self.unet
        self._graphed = self._new_graphs()

    def _new_graphs(self) -> GraphedCall:
        return GraphedCall(self._network, [self.unet], name=f"the OMS module {self.name}")

    def set_speed_options(self, *, channels_last: bool = False, compile: bool = False) -> None:
        """GPU options, off by default, that ``bench/bench_oms.py`` measures side by side.

        ``channels_last`` stores the convolution weights and runs the network in NHWC layout; ``compile`` runs it
        through ``torch.compile`` (the first call of each input shape compiles, which takes a minute or more).
        Either gives the same results up to float rounding. Captured CUDA graphs are dropped.
        """
        self.channels_last = channels_last
        self.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self._network = torch.compile(self.unet, dynamic=False) if compile else self.unet
        self._graphed.clear()
        self._graphed = self._new_graphs()

    def forward(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The network's prediction v for unit noise ``sample`` and text features ``encoder_hidden_states``."""
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        if self.cuda_graphs:
            return self._graphed(sample, encoder_hidden_states)
        return self._network(sample, encoder_hidden_states)

    def release_graphs(self) -> None:
        """Drop the captured CUDA graphs and their memory (they are captured again when next needed)."""
        self._graphed.clear()

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def text_width(self) -> int:
        """Width D of the text embedding [B, L, D] the network reads (cross_attention_dim)."""
        return self.config["cross_attention_dim"]

    def to(self, device=None, dtype: torch.dtype | None = None) -> OMSModule:
        self.unet.to(device=device, dtype=dtype)
        self._graphed.clear_if_moved()  # the captured CUDA graphs read the weights where they were
        return self


@dataclass(frozen=True)
class ModuleEntry:
    """A module found on disk: display name and the folder or file to pass to load_module."""

    name: str
    path: Path


@dataclass(frozen=True)
class SafetensorsHeader:
    shapes: dict
    dtypes: dict
    metadata: dict


# ---------------------------------------------------------------------------------------------------------------
# Validation before reading tensors


def _refuse_pickle(path: Path) -> ModuleFileError:
    return ModuleFileError(
        f"{path}: pickle files ({', '.join(PICKLE_SUFFIXES)}) are refused because loading them can run arbitrary "
        f"code: use the released .safetensors weights ({WEIGHTS_STEM}.safetensors or {WEIGHTS_STEM}.fp16.safetensors)."
    )


def _corrupt(path: Path, why: str) -> ModuleFileError:
    return ModuleFileError(f"{path}: not a valid safetensors file ({why}): download it again.")


def _truncated(path: Path, size: int, expected: str) -> ModuleFileError:
    return ModuleFileError(f"{path}: the file is truncated ({size} of {expected} bytes): download it again.")


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header without reading tensors.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor data. Every tensor's
    data_offsets must fit its dtype and shape, and the file must end exactly where the last tensor ends.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _truncated(path, size, "at least 8")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {header_bytes} is impossible")
        if size < 8 + header_bytes:
            raise _truncated(path, size, f"at least {8 + header_bytes}")
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(path, f"the header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    shapes, dtypes, data_end = {}, {}, 0
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (dtype in DTYPE_SIZES and all(isinstance(d, int) and d >= 0 for d in shape)
                     and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise _corrupt(path, f"bad header entry for tensor '{key}'")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _corrupt(path, f"tensor '{key}' has {end - begin} bytes for shape {shape} of {dtype}")
        shapes[key], dtypes[key], data_end = tuple(shape), dtype, max(data_end, end)
    expected = 8 + header_bytes + data_end
    if size < expected:
        raise _truncated(path, size, str(expected))
    if size > expected:
        raise _corrupt(path, f"{size - expected} unexpected bytes after the tensor data")
    return SafetensorsHeader(shapes, dtypes, metadata)


def _read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModuleFileError(f"{path}: invalid JSON in the {what} ({error}): fix it or download it again.") from None


def check_state_dict_shapes(found: dict, config: dict, weights: Path | str, config_source: str) -> None:
    """Raise ModuleFileError unless ``found`` (key -> shape) has exactly the keys and shapes ``config`` needs."""
    expected = parameter_shapes(config)
    remedy = f"the weights do not match {config_source}: use the config that came with these weights, or " \
             "download the module again."
    missing = [key for key in expected if key not in found]
    if missing:
        raise ModuleFileError(f"{weights}: {len(missing)} key(s) missing from the weights, first '{missing[0]}': "
                              f"{remedy}")
    unexpected = [key for key in found if key not in expected]
    if unexpected:
        hint = " (time-embedding keys: this is a UNet with time conditioning, not an OMS module)" if any(
            "time_emb" in key for key in unexpected) else ""
        raise ModuleFileError(f"{weights}: {len(unexpected)} unexpected key(s) in the weights, first "
                              f"'{unexpected[0]}'{hint}: {remedy}")
    for key, shape in expected.items():
        if tuple(found[key]) != shape:
            raise ModuleFileError(f"{weights}: tensor '{key}' has shape {tuple(found[key])} but the config needs "
                                  f"{shape}: {remedy}")


def _check_float(header: SafetensorsHeader, weights: Path) -> None:
    for key, dtype in header.dtypes.items():
        if dtype not in FLOAT_DTYPES:
            raise ModuleFileError(f"{weights}: tensor '{key}' is {dtype}, not a float type: OMS weights are F16 or "
                                  "F32; use the released module.")


# ---------------------------------------------------------------------------------------------------------------
# Latent space, text encoder, hash


def latent_space_from_name(name: str) -> str | None:
    """"sdxl" if the name says xl, "sd" if it says 15_21 / sd15 / sd21 / sd1 / sd2, else None."""
    lowered = name.lower()
    if re.search(r"(?<![a-z])(sd_?)?xl(?![a-z])", lowered):
        return "sdxl"
    if re.search(r"(?<![a-z0-9])(15_21|sd[-_]?(1|2)(\.?[0-9x])?)(?![0-9])", lowered):
        return "sd"
    return None


def module_name(path: Path) -> str:
    """Display name of a module: the folder's name, or the file's name without ".safetensors"."""
    path = Path(path)
    return path.name[: -len(path.suffix)] if path.suffix.lower() == ".safetensors" else path.name


def _sidecar_path(module_path: Path) -> Path:
    return module_path.with_name(module_name(module_path) + ".json")


def _describe(name: str, sources: list[tuple[dict, Path]], width: int) -> tuple[str, str]:
    """(latent_space, text_encoder): first of sidecar / model_index / metadata, else from the name / width."""
    found = {}
    for key in ("latent_space", "text_encoder"):
        for entries, origin in sources:
            value = entries.get(key)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise ModuleFileError(f"{origin}: '{key}' must be a non-empty string like \"sd\" or \"sdxl\", "
                                          f"not {value!r}: fix it.")
                found[key] = value
                break
    latent = found.get("latent_space") or latent_space_from_name(name) or ("sdxl" if width == 2048 else "unknown")
    return latent, found.get("text_encoder") or TEXT_ENCODER_BY_WIDTH.get(width, "unknown")


_HASHES: dict[tuple[str, int, int], str] = {}


def file_version(path) -> tuple[str, int, int]:
    """(resolved path, mtime, size): what tells one version of a file from another, as cache keys use it."""
    path = Path(path)
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def short_hash(path: Path) -> str:
    """First 10 hex characters of the file's SHA-256, computed once per file version (path, mtime, size)."""
    key = file_version(path)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()[:10]
    return _HASHES[key]


def check_latent_space(module: OMSModule | CheckedModule, expected: str) -> None:
    """Raise LatentSpaceError unless ``module`` was made for the ``expected`` latent space ("sd", "sdxl", ...)."""
    if module.latent_space == expected:
        return
    sidecar = _sidecar_path(module.path)
    if module.latent_space == "unknown":
        raise LatentSpaceError(
            f"{module.path}: the OMS module '{module.name}' does not say which latent space it was made for: if it was "
            f"made for {expected} checkpoints, add {sidecar} with {{\"latent_space\": \"{expected}\"}} (or put "
            "'15_21' or 'xl' in its name)."
        )
    example = {"sdxl": " (e.g. oms_b_openclip_xl)", "sd": " (e.g. oms_b_openclip_15_21)"}.get(expected, "")
    raise LatentSpaceError(
        f"{module.path}: the OMS module '{module.name}' was made for the '{module.latent_space}' latent space but "
        f"the checkpoint uses '{expected}': choose a module made for '{expected}'{example}, or 'Automatic'."
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _folder_files(path: Path, dtype: torch.dtype) -> tuple[Path, Path, Path]:
    """(module root, config.json, weights) of a released-layout folder (or of its oms_module folder itself)."""
    component = path / COMPONENT
    if not (component / "config.json").is_file() and (path / "config.json").is_file() and path.name == COMPONENT:
        component, path = path, path.parent
    config_path = component / "config.json"
    if not config_path.is_file():
        raise ModuleFileError(
            f"{path}: this folder has no {COMPONENT}/config.json: download the whole module folder (model_index.json, "
            f"{COMPONENT}/config.json, {COMPONENT}/{WEIGHTS_STEM}.safetensors), or use a lone .safetensors file."
        )
    fp16, fp32 = component / f"{WEIGHTS_STEM}.fp16.safetensors", component / f"{WEIGHTS_STEM}.safetensors"
    preferred = [fp16, fp32] if dtype == torch.float16 else [fp32, fp16]
    candidates = [p for p in preferred if p.is_file()] + sorted(component.glob("*.safetensors"))
    if not candidates:
        pickles = sorted(p for p in component.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _refuse_pickle(pickles[0])
        raise ModuleFileError(f"{component}: no weights ({WEIGHTS_STEM}.safetensors or {WEIGHTS_STEM}.fp16.safetensors)"
                              ": download the weights into this folder.")
    return path, config_path, candidates[0]


def _sidecar(module_path: Path) -> tuple[dict, Path]:
    sidecar = _sidecar_path(module_path)
    entries = _read_json(sidecar, "sidecar file") if sidecar.is_file() else {}
    if not isinstance(entries, dict):
        raise ModuleFileError(f"{sidecar}: the sidecar must be a JSON object like {{\"latent_space\": \"sdxl\"}}: "
                              "fix it.")
    return entries, sidecar


def _lone_file_config(weights: Path, sidecar: dict, sidecar_path: Path, header: SafetensorsHeader):
    """(raw config or None to infer it, where it came from) for a lone .safetensors."""
    if "unet_config" in sidecar:
        return sidecar["unet_config"], f"{sidecar_path} (unet_config)"
    if "oms_config" in header.metadata:
        source = f"{weights} (metadata oms_config)"
        try:
            return json.loads(header.metadata["oms_config"]), source
        except json.JSONDecodeError as error:
            raise ModuleFileError(f"{source}: invalid JSON ({error}): re-save the module.") from None
    return None, f"{weights} (config inferred from tensor shapes)"


@dataclass(frozen=True)
class CheckedModule:
    """A module's files, checked without reading a tensor: what it is, and what load_module needs before it reads
    the weights."""

    name: str
    path: Path  # the folder or lone file
    weights: Path
    config: dict
    latent_space: str
    text_encoder: str


def _check_files(path, dtype: torch.dtype) -> CheckedModule:
    path = Path(path)
    if not path.exists():
        raise ModuleFileError(f"{path}: no such file or folder: put the OMS module there (a folder in the released "
                              "layout or a .safetensors file), or choose another module.")
    if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
        raise _refuse_pickle(path)
    if path.is_file() and path.suffix.lower() != ".safetensors":
        raise ModuleFileError(f"{path}: not an OMS module (expected a .safetensors file or a module folder): "
                              "use the released module.")
    index, index_path = {}, None
    if path.is_dir():
        root, config_path, weights = _folder_files(path, dtype)
        if (root / "model_index.json").is_file():
            index_path = root / "model_index.json"
            index = _read_json(index_path, "model_index.json")
            index = index if isinstance(index, dict) else {}
    else:
        root = weights = path
    sidecar, sidecar_path = _sidecar(root)
    header = read_safetensors_header(weights)
    _check_float(header, weights)
    if path.is_dir():
        raw, config_source = _read_json(config_path, "module config"), str(config_path)
    else:
        raw, config_source = _lone_file_config(weights, sidecar, sidecar_path, header)
    if raw is None:
        config = infer_unet_config(header.shapes, str(weights))
    else:
        config = normalize_unet_config(raw, config_source)
    check_state_dict_shapes(header.shapes, config, weights, config_source)
    name = module_name(root)
    latent_space, text_encoder = _describe(
        name, [(sidecar, sidecar_path), (index, index_path), (header.metadata, weights)], config["cross_attention_dim"]
    )
    return CheckedModule(name, root, weights, config, latent_space, text_encoder)


def describe_module(path) -> CheckedModule:
    """A module's files checked, with its latent space and text encoder from its sidecar, model_index.json,
    safetensors metadata, name or text width, without reading a tensor: choosing a module for a checkpoint loads only
    the one chosen, and a module that cannot serve it is refused before anything is loaded."""
    return _check_files(path, torch.float32)


def load_module(path, device="cpu", dtype: torch.dtype = torch.float32) -> OMSModule:
    """Load an OMS module from a released-layout folder or a lone .safetensors (see the module docstring).

    Config: the folder's oms_module/config.json; for a lone file the sidecar's "unet_config", else the safetensors
    metadata "oms_config" (JSON), else inferred from shapes. Latent space / text encoder: sidecar ``<name>.json``,
    model_index.json, safetensors metadata, the name, the text width. Files are checked before tensors are read.
    """
    checked = _check_files(path, dtype)
    tensors = load_file(str(checked.weights))
    not_finite = [key for key, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if not_finite:
        raise ModuleFileError(f"{checked.weights}: tensor '{not_finite[0]}' holds NaN or infinite values "
                              f"({len(not_finite)} such tensor(s)): the file is corrupt; download or re-save it.")
    tensors = {key: value.to(dtype) for key, value in tensors.items()}
    unet = OMSUNet.from_state_dict(checked.config, tensors).eval().requires_grad_(False).to(device)
    return OMSModule(checked.name, checked.path, checked.weights, checked.config, unet, checked.latent_space,
                     checked.text_encoder, short_hash(checked.weights))


# ---------------------------------------------------------------------------------------------------------------
# Saving, discovery, cache


def save_module(folder, unet_or_state_dict, config: dict, *, latent_space: str, text_encoder: str,
                fp16: bool = False, extra_index: dict | None = None, overwrite: bool = False) -> Path:
    """Write the released layout: model_index.json, oms_module/config.json and the weights.

    The weights go to diffusion_pytorch_model[.fp16].safetensors, with the config, latent space and text encoder
    also in their metadata so the file alone is self-describing. An existing non-empty folder is refused unless
    ``overwrite`` (then old weight files are removed so no stale precision is left behind).
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise ModuleFileError(f"{folder}: already exists and is not empty: choose another folder or pass "
                              "overwrite=True.")
    normalised = normalize_unet_config(config, f"the config given for {folder}")
    if isinstance(unet_or_state_dict, OMSModule):
        unet_or_state_dict = unet_or_state_dict.unet
    state = unet_or_state_dict.state_dict() if isinstance(unet_or_state_dict, nn.Module) else unet_or_state_dict
    check_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()}, normalised, folder, "the config given")
    component = folder / COMPONENT
    component.mkdir(parents=True, exist_ok=True)
    for old in component.glob(f"{WEIGHTS_STEM}*.safetensors"):
        old.unlink()
    config_file = {"_class_name": UNET_CLASS, "_diffusers_version": DIFFUSERS_VERSION, **normalised}
    (component / "config.json").write_text(json.dumps(config_file, indent=2) + "\n", encoding="utf-8")
    weights = component / f"{WEIGHTS_STEM}{'.fp16' if fp16 else ''}.safetensors"
    target = torch.float16 if fp16 else torch.float32
    tensors = {key: value.detach().to("cpu", target).contiguous() for key, value in state.items()}
    metadata = {"format": "pt", "oms_config": json.dumps(normalised), "latent_space": latent_space,
                "text_encoder": text_encoder}
    partial = weights.with_name(weights.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, weights)  # a crash never leaves a half-written weights file under the real name
    index = {"_class_name": "OMSPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             COMPONENT: ["diffusers", UNET_CLASS], **TEXT_COMPONENTS.get(text_encoder, {}),
             "latent_space": latent_space, "text_encoder": text_encoder, **(extra_index or {})}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def _other_model(path: Path) -> bool:
    """A lone .safetensors that is not an OMS module: a text encoder placed beside the modules (the name says
    "text_encoder", as the text-encoder search expects) or a file whose tensors hold no OMS network. A file whose
    header cannot be read stays listed, so that choosing it says what is wrong."""
    if "text_encoder" in path.name.lower():
        return True
    try:
        return "conv_in.weight" not in read_safetensors_header(path).shapes
    except (ModuleFileError, OSError):
        return False


def find_modules(dirs) -> list[ModuleEntry]:
    """Module folders and lone .safetensors in ``dirs``, sorted by name; text encoders and other models are left out.

    A folder counts when it has oms_module/ or model_index.json, so a half-downloaded module is listed and
    load_module can say what is missing instead of it silently not appearing. The same file reached twice
    (symlinks, a directory listed twice) appears once; a name already taken by an earlier directory gets the
    directory's name appended, so every entry stays selectable.
    """
    entries, seen, names = [], set(), set()
    for directory in map(Path, dirs):
        if not directory.is_dir():
            continue
        for child in sorted(directory.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() and ((child / COMPONENT).is_dir() or (child / "model_index.json").is_file()):
                name = child.name
            elif child.is_file() and child.suffix.lower() == ".safetensors" and not _other_model(child):
                name = module_name(child)
            else:
                continue
            resolved = child.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            if name in names:
                name = f"{name} ({directory.name})"
            names.add(name)
            entries.append(ModuleEntry(name, child))
    return sorted(entries, key=lambda entry: entry.name.lower())


def module_signature(path: Path) -> tuple:
    """What must be unchanged for a cached module to stay valid: stats of its files and of its sidecar."""
    files = [path, _sidecar_path(path)]
    for folder in (path, path / COMPONENT, path.parent / COMPONENT if path.name == COMPONENT else None):
        if folder is not None and folder.is_dir():
            files += sorted(folder.iterdir())
    return tuple(file_version(f) for f in files if f.is_file())

