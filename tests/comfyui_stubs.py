"""Stand-ins for the few pieces of ComfyUI 0.26 the One More Step nodes touch, written from the behaviour they have
(as ComfyUI 0.26 behaves), not from ComfyUI's code, so that the nodes run in CI without ComfyUI.

``install(monkeypatch, models_dir)`` puts them into ``sys.modules`` and returns them; ``sample`` plays a sampler
through the SAMPLER_SAMPLE wrappers of a patched model and returns the x it starts from.
"""

from __future__ import annotations

import copy
import importlib.machinery
import math
import sys
import types
from pathlib import Path

import torch

SAMPLER_SAMPLE = "sampler_sample"


# ---------------------------------------------------------------------------------------------------------------
# model_sampling: the start of every sampler, x = noise_scaling(σ₀, noise, latent, max_denoise)


class ModelSamplingDiscrete:
    """SD's discrete schedule: σ_t = √((1 − ᾱ_t)/ᾱ_t), σ_max its last entry (14.6146 for SD's linear betas)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.sigma_max = self.sigmas[-1]


class EPS:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        """x = √(1 + σ²)·noise + latent at full denoise, else σ·noise + latent."""
        scale = math.sqrt(1.0 + float(sigma) ** 2) if max_denoise else float(sigma)
        return scale * noise + latent_image


class V_PREDICTION(EPS):
    pass


class CONST:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        """Flow matching: x = σ·noise + (1 − σ)·latent."""
        return float(sigma) * noise + (1.0 - float(sigma)) * latent_image


def sd_alphas_cumprod(zsnr: bool = False) -> torch.Tensor:
    """SD's scaled-linear betas 0.00085 … 0.012 over 1000 steps; zsnr rescales them to a zero terminal SNR (the last
    ᾱ is then set to 4.9e-8, as ComfyUI does to keep σ finite)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    if zsnr:
        alphas_cumprod = alphas_cumprod.clone()
        alphas_cumprod[-1] = 4.8973451890853435e-08
    return alphas_cumprod.float()


def model_sampling(prediction=EPS, zsnr: bool = False):
    kind = type("ModelSamplingAdvanced", (ModelSamplingDiscrete, prediction), {})
    return kind(sd_alphas_cumprod(zsnr))


class ModelSamplingContinuousEDM:
    """A continuous EDM schedule (the ModelSamplingContinuousEDM node): σ from sigma_min to sigma_max (120)."""

    def __init__(self, sigma_max: float = 120.0):
        self.sigma_max = torch.tensor(sigma_max)


def edm_sampling(prediction=EPS):
    return type("ModelSamplingAdvanced", (ModelSamplingContinuousEDM, prediction), {})()


class SD15:
    scale_factor = 0.18215


class SDXL:
    scale_factor = 0.13025


class SDXL_Playground_2_5:
    scale_factor = 0.5


class BaseModel:
    def __init__(self, latent_format, sampling):
        self.latent_format, self.model_sampling = latent_format, sampling

    def process_latent_in(self, latent):
        return latent * self.latent_format.scale_factor


class SDXLRefiner(BaseModel):
    pass


# ---------------------------------------------------------------------------------------------------------------
# comfy.model_patcher / comfy.patcher_extension


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict[str, dict[str, list]] = {}
        self.additional_models: dict[str, list] = {}
        self.object_patches: dict[str, object] = {}

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.model_options = {**self.model_options, "transformer_options": dict(self.model_options["transformer_options"])}
        n.wrappers = {kind: {key: list(fns) for key, fns in by_key.items()} for kind, by_key in self.wrappers.items()}
        n.additional_models = dict(self.additional_models)
        n.object_patches = dict(self.object_patches)
        return n

    def add_object_patch(self, name, obj):
        """Replaces an attribute of the model (e.g. model_sampling) while this patcher's model is loaded."""
        self.object_patches[name] = obj

    def get_model_object(self, name):
        return self.object_patches[name] if name in self.object_patches else getattr(self.model, name)

    def patched_model(self):
        """The model as loaded for sampling: its object patches applied (to a shallow copy here)."""
        model = copy.copy(self.model)
        for name, obj in self.object_patches.items():
            setattr(model, name, obj)
        return model

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def set_additional_models(self, key, models):
        self.additional_models[key] = models


class Sampler:
    def max_denoise(self, model_wrap, sigmas):
        """Full denoise: σ₀ within a relative 1e-5 of σ_max, or above it."""
        sigma_max, sigma = float(model_wrap.inner_model.model_sampling.sigma_max), float(sigmas[0])
        return math.isclose(sigma_max, sigma, rel_tol=1e-5) or sigma > sigma_max


class Executor:
    """What a wrapper is handed: calling it goes on to the next wrapper, at the end the sampler's start."""

    def __init__(self, sampler, fns, start):
        self.class_obj, self.fns, self.start = sampler, fns, start

    def __call__(self, *args):
        if self.fns:
            return self.fns[0](Executor(self.class_obj, self.fns[1:], self.start), *args)
        return self.start(*args)


class Guider:
    """CFGGuider as a wrapper sees it: the patcher it was made with and, while sampling, the loaded model."""

    def __init__(self, patcher):
        self.model_patcher, self.inner_model = patcher, patcher.patched_model()


def sample(patcher: ModelPatcher, noise, sigmas, latent_image, denoise_mask=None, seed=0) -> torch.Tensor:
    """The x the sampler starts from: its SAMPLER_SAMPLE wrappers, then noise_scaling of the (processed) latent."""
    sampler, guider = Sampler(), Guider(patcher)
    model = guider.inner_model
    latent = model.process_latent_in(latent_image) if torch.any(latent_image) else latent_image

    def start(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        return model.model_sampling.noise_scaling(sigmas[0], noise, latent_image,
                                                  sampler.max_denoise(guider, sigmas))

    fns = [fn for by_key in patcher.wrappers.get(SAMPLER_SAMPLE, {}).values() for fn in by_key]
    return Executor(sampler, fns, start)(guider, sigmas, {"seed": seed}, None, noise, latent, denoise_mask, False)


def prepare_noise(latent_image, seed, noise_inds=None):
    """ComfyUI's batch noise: one CPU generator seeded with ``seed`` (the global one, reseeded) draws the whole batch
    at once; with batch indices (Latent From Batch) it draws one image at a time up to the largest index and keeps
    the images at the indices asked for, repeats included."""
    generator = torch.manual_seed(seed)
    if noise_inds is None:
        return torch.randn(latent_image.size(), generator=generator, dtype=torch.float32)
    one = [1, *latent_image.shape[1:]]
    stream = [torch.randn(one, generator=generator, dtype=torch.float32) for _ in range(max(noise_inds) + 1)]
    return torch.cat([stream[i] for i in noise_inds])


# ---------------------------------------------------------------------------------------------------------------
# comfy_api.latest.io: the schema the nodes declare, kept as plain records


class _Record:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _Type:
    Input = Output = _Record


def _custom(name):
    return type(name, (_Type,), {})


class ComfyNode:
    pass


class NodeOutput:
    def __init__(self, *args, ui=None):
        self.args, self.ui = args, ui


def io_module():
    io = types.ModuleType("comfy_api.latest.io")
    for name in ("String", "Float", "Combo", "Boolean", "Model", "Noise", "Sigmas"):
        setattr(io, name, _custom(name))
    io.Custom, io.Schema, io.ComfyNode, io.NodeOutput = _custom, _Record, ComfyNode, NodeOutput
    return io


class ProgressBar:
    updates: list = []

    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None):
        ProgressBar.updates.append((value, total))


class FolderPaths:
    """folder_paths: model folders by name; ``oms`` is added by the nodes."""

    def __init__(self, models_dir: Path):
        self.models_dir = str(models_dir)
        self.folders = {name: [str(models_dir / name)] for name in ("checkpoints", "text_encoders")}

    def add_model_folder_path(self, name, path, is_default=False):
        paths = self.folders.setdefault(name, [])
        paths.insert(0, path) if is_default else paths.append(path)

    def get_folder_paths(self, name):
        return list(self.folders[name])

    def get_filename_list(self, name):
        return sorted(p.name for folder in self.folders[name] if Path(folder).is_dir() for p in Path(folder).iterdir())

    def get_full_path(self, name, filename):
        for folder in self.folders[name]:
            if (Path(folder) / filename).is_file():
                return str(Path(folder) / filename)
        return None

    def get_full_path_or_raise(self, name, filename):
        path = self.get_full_path(name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return path


def install(monkeypatch, models_dir: Path) -> types.SimpleNamespace:
    """Put the stand-ins into ``sys.modules`` (undone by ``monkeypatch``) and drop any imported node module."""
    loaded = []
    modules = {name: types.ModuleType(name) for name in (
        "comfy", "comfy.model_management", "comfy.model_patcher", "comfy.patcher_extension", "comfy.sample",
        "comfy.sampler_helpers", "comfy.sd1_clip", "comfy.utils", "comfy_api", "comfy_api.latest")}
    mm = modules["comfy.model_management"]
    mm.get_torch_device = mm.unet_offload_device = lambda: torch.device("cpu")
    mm.unet_dtype = lambda device=None: torch.float32
    mm.load_models_gpu = loaded.append
    mm.processing_interrupted = lambda: False
    modules["comfy.model_patcher"].ModelPatcher = ModelPatcher
    modules["comfy.patcher_extension"].WrappersMP = types.SimpleNamespace(SAMPLER_SAMPLE=SAMPLER_SAMPLE)
    modules["comfy.sample"].prepare_noise = prepare_noise
    modules["comfy.sampler_helpers"].prepare_mask = lambda mask, shape, device: torch.nn.functional.interpolate(
        mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=tuple(shape[-2:])).expand(shape).to(device)
    clip = modules["comfy.sd1_clip"]
    clip.escape_important = clip.unescape_important = lambda text: text
    clip.token_weights = lambda text, weight: [(text, weight)]
    modules["comfy.utils"].ProgressBar = ProgressBar
    modules["comfy_api.latest"].io = io_module()
    modules["comfy_api.latest"].ComfyExtension = object
    folder_paths = FolderPaths(models_dir)
    folder_paths.__spec__ = importlib.machinery.ModuleSpec("folder_paths", None)
    modules["folder_paths"] = folder_paths
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(modules[parent], child, module)
    monkeypatch.delitem(sys.modules, "oms_comfyui.nodes", raising=False)
    return types.SimpleNamespace(folder_paths=folder_paths, loaded=loaded, modules=modules)
