"""One More Step (Hu et al., CVPR 2024) as ComfyUI nodes, on the host-free core ``lib_oms``.

Thin glue: it reads ComfyUI's objects (MODEL, NOISE, SIGMAS, latents, folders) into plain values for
``oms_comfyui.logic`` and ``lib_oms`` and hands the corrected start noise back to the sampler.

- "Load One More Step module" (OMS_MODULE): which module, text encoder and precision; resolved against the MODEL
  it is used with ("Automatic" picks the module of the model's latent space) and loaded once, then kept under
  ComfyUI's model management (a ModelPatcher: loaded to the GPU with the model, offloaded like other models).
- "One More Step" (MODEL → MODEL): a SAMPLER_SAMPLE wrapper, so every sampler that goes through ComfyUI's sampling
  (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced, any guider) starts from the OMS latent where it
  starts from pure noise; elsewhere it passes through and says why in the console.
- "One More Step noise" (NOISE → NOISE): the same for SamplerCustomAdvanced's NOISE input, given the MODEL and the
  SIGMAS of that sampler.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.sampler_helpers
import comfy.sd1_clip
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io

from lib_oms import download, module_files, text_encoders
from lib_oms.engine import Z_SEED_OFFSET, check_options, oms_start
from lib_oms.errors import ModuleMissingError, TextEncoderError, TextEncoderMissingError
from lib_oms.sources import (
    AUTOMATIC,
    PRECISIONS,
    SDXL_MIXCLIP,
    choose_module,
    huggingface_hub_dir,
    module_dtype,
    named_module,
    resolve_text_encoder,
)
from lib_oms.step import SamplerStart, inpaint_noise, skip_reason
from oms_comfyui.logic import (
    LATENT_SPACE_OF_FORMAT,
    model_skip_reason,
    noise_scale,
    plain_words,
    start_skip_reason,
    starts_at_max_denoise,
    summary,
    summary_text,
)
from oms_webui.args import ARG_BY_NAME, SOLVER_CHOICES

TITLE = "One More Step"
CATEGORY = TITLE
KEY = "one_more_step"  # the wrapper's, the additional model's and the transformer_options' key
FOLDER = "oms"
EXTENSION_DIR = Path(__file__).resolve().parents[1]
OMSModuleType = io.Custom("OMS_MODULE")
TEXT_ENCODER_PLACES = ("the local Hugging Face cache {hub_dir} and the .safetensors files in ComfyUI's "
                       "models/checkpoints and models/text_encoders")
BUNDLES_KEPT = 2  # an OMS-B module with its OpenCLIP-H text encoder is about 1 GB in fp16
BATCH_INDEX_SEARCH = 64  # how far into a seed's stream a Latent From Batch index is looked for

# <ComfyUI>/models/oms (survives reinstalling the pack; more folders under "oms:" in extra_model_paths.yaml), then
# the pack's own models/.
folder_paths.add_model_folder_path(FOLDER, str(Path(folder_paths.models_dir) / FOLDER), is_default=True)
folder_paths.add_model_folder_path(FOLDER, str(EXTENSION_DIR / "models"))


def log(message: str) -> None:
    logging.info(f"[{TITLE}] {message}")


def module_dirs() -> list[Path]:
    return [Path(folder) for folder in folder_paths.get_folder_paths(FOLDER)]


def module_entries() -> list:
    return module_files.find_modules([folder for folder in module_dirs() if folder.is_dir()])


def safetensors_files(folder_name: str) -> list[Path]:
    """ComfyUI's .safetensors files of a model folder (checkpoints, text_encoders), as full paths."""
    return [Path(folder_paths.get_full_path(folder_name, name)) for name in folder_paths.get_filename_list(folder_name)
            if name.endswith(".safetensors")]


# ---------------------------------------------------------------------------------------------------------------
# Loading: module and text encoder, kept as one model under ComfyUI's model management


@dataclass(frozen=True)
class OMSChoice:
    """What the loader node was set to; resolved against a MODEL by ``prepared``."""

    module: str = AUTOMATIC
    text_encoder: str = AUTOMATIC  # or a file of ComfyUI's text_encoders folder
    layer: str = text_encoders.LAYERS[0]
    precision: str = PRECISIONS[0]
    download: bool = True


class OMSWeights(torch.nn.Module):
    """The OMS network and its text encoder's models as one torch module, for a ComfyUI ModelPatcher."""

    def __init__(self, module, encoder):
        super().__init__()
        self.parts = torch.nn.ModuleList([module.unet, *encoder.torch_models()])


@dataclass(eq=False)
class Bundle:
    module: object
    encoder: text_encoders.PromptEmbeddingCache
    patcher: object
    label: str  # "name [hash]"
    encoder_source: str


BUNDLES: OrderedDict[tuple, Bundle] = OrderedDict()


def download_refused(choice: OMSChoice) -> str | None:
    return None if choice.download else "downloading is off (download_missing of Load One More Step module)"


def found_or_downloaded(find, obtain, choice: OMSChoice):
    """``find()``; when it says a file is missing, ``obtain`` downloads it with ComfyUI's progress bar (or raises
    why not: off, HF_HUB_OFFLINE, failed), then ``find()`` again."""
    try:
        return find()
    except (ModuleMissingError, TextEncoderMissingError) as missing:
        bar = comfy.utils.ProgressBar(1)
        obtain(missing, refused=download_refused(choice), progress=log, should_stop=mm.processing_interrupted,
               counts=lambda done, total: bar.update_absolute(done, total))
        return find()


def devices_and_dtype(precision: str) -> tuple[torch.device, torch.device, torch.dtype]:
    """ComfyUI's load and offload devices (``--cpu`` makes both the CPU) and the module's dtype: fp16 on a GPU unless
    ComfyUI runs its models in fp32 (``--force-fp32``) or the loader says fp32."""
    load, offload = mm.get_torch_device(), mm.unet_offload_device()
    full_precision = mm.unet_dtype(load) == torch.float32
    return load, offload, module_dtype(precision, torch.device(load).type, full_precision)


def text_encoder_source(choice: OMSChoice, kind: str, latent_space: str):
    if kind == SDXL_MIXCLIP:
        raise TextEncoderError("this OMS module reads prompts with SDXL's own two text encoders, which the ComfyUI "
                               "nodes do not take: use the released oms_b_openclip_xl, which reads OpenCLIP ViT-H/14")
    setting_path = "" if choice.text_encoder == AUTOMATIC else \
        folder_paths.get_full_path_or_raise("text_encoders", choice.text_encoder)
    return found_or_downloaded(
        lambda: resolve_text_encoder(kind, latent_space, setting_path=setting_path, module_dirs=module_dirs(),
                                     hub_dir=huggingface_hub_dir(),
                                     checkpoints=safetensors_files("checkpoints") + safetensors_files("text_encoders"),
                                     places=TEXT_ENCODER_PLACES),
        functools.partial(download.obtain_text_encoder, module_dirs()[0]), choice)


def prepared(choice: OMSChoice, latent_space: str) -> Bundle:
    """The module and text encoder for a model of ``latent_space``, loaded once per file version and settings (an
    unchanged one is never moved outside ComfyUI's model management)."""
    entry = found_or_downloaded(
        lambda: choose_module(choice.module, module_entries(), latent_space, "",
                              lambda e: module_files.describe_module(e.path)[0], module_dirs()),
        functools.partial(download.obtain_module, latent_space, module_dirs()[0]), choice)
    load, offload, dtype = devices_and_dtype(choice.precision)
    module_key = (str(entry.path.resolve()), module_files.module_signature(entry.path), dtype)
    kind = module_files.describe_module(entry.path)[1]
    source = text_encoder_source(choice, kind, latent_space)
    key = (module_key, source, module_files.module_signature(source.path), choice.layer)
    if key not in BUNDLES:
        module = module_files.load_module(entry.path, offload, dtype)
        module_files.check_latent_space(module, latent_space)
        module.cuda_graphs = False  # ComfyUI moves the weights between devices: nothing may keep their addresses
        encoder = text_encoders.load_openclip_text_encoder(source.path, layer=choice.layer, device=offload,
                                                           dtype=dtype)
        encoder.cuda_graphs = False
        log(f"module {entry.path} ({module.latent_space}, {module.text_encoder}); text encoder {source.describe()} "
            f"({choice.layer})")
        patcher = comfy.model_patcher.ModelPatcher(OMSWeights(module, encoder), load_device=load,
                                                   offload_device=offload)
        BUNDLES[key] = Bundle(module, text_encoders.PromptEmbeddingCache(encoder), patcher,
                              f"{entry.name} [{module.short_hash}]", source.describe())
        while len(BUNDLES) > BUNDLES_KEPT:
            BUNDLES.popitem(last=False)
    BUNDLES.move_to_end(key)
    return BUNDLES[key]


# ---------------------------------------------------------------------------------------------------------------
# Reading ComfyUI's model into plain values


def latent_format_name(model) -> str:
    return type(model.get_model_object("latent_format")).__name__


def model_reason(model) -> str | None:
    sampling = [cls.__name__ for cls in type(model.get_model_object("model_sampling")).__mro__
                if cls not in (torch.nn.Module, object)]
    return model_skip_reason(latent_format_name(model), type(model.model).__name__, sampling)


def clean_prompt(text: str) -> str:
    """The prompt in plain words, read with ComfyUI's own emphasis parser: "(word:1.2)" gives "word"."""
    chunks = comfy.sd1_clip.token_weights(comfy.sd1_clip.escape_important(text), 1.0)
    return plain_words([(comfy.sd1_clip.unescape_important(chunk), weight) for chunk, weight in chunks])


def batch_indices(noise: torch.Tensor, seed: int) -> list[int] | None:
    """The batch indices ComfyUI drew the sampler's ``noise`` with, read back from it: a latent from *Latent From
    Batch* carries them, ComfyUI's noise for it is the images at those places of the seed's stream
    (``comfy.sample.prepare_noise`` with indices), and the sampler is not told them. None for the seed's plain batch
    draw, and for noise that is not the seed's (another NOISE node): then z is the plain batch draw too."""
    cpu = noise.detach().to("cpu", torch.float32)
    with torch.random.fork_rng(devices=[]):  # prepare_noise seeds the global generator
        if torch.equal(comfy.sample.prepare_noise(torch.zeros_like(cpu), seed), cpu):
            return None
        stream = comfy.sample.prepare_noise(torch.zeros_like(cpu[:1]), seed,
                                            list(range(max(BATCH_INDEX_SEARCH, len(cpu)))))
    found = []
    for image in cpu:
        place = next((k for k, drawn in enumerate(stream) if torch.equal(drawn, image)), None)
        if place is None:
            return None
        found.append(place)
    return found


def fresh_noise(seed: int, like: torch.Tensor, batch_inds=None) -> torch.Tensor:
    """z of the SDE solver: ComfyUI's own batch noise (``comfy.sample.prepare_noise``, one generator for the batch)
    for ``seed + Z_SEED_OFFSET``, so it is never the sampler's own noise; the global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return comfy.sample.prepare_noise(torch.zeros_like(like, device="cpu"), (int(seed) + Z_SEED_OFFSET) % 2**64,
                                          batch_inds)


# ---------------------------------------------------------------------------------------------------------------
# The step


@dataclass(eq=False)
class OMSRun:
    """One One More Step node's settings with its loaded bundle: corrects the start noise of a sampling."""

    bundle: Bundle
    prompt: str
    negative_prompt: str
    cfg: float
    solver: str  # "SDE" | "DDIM"
    info: dict = field(default_factory=dict)

    def corrected(self, noise: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, sigma0: float,
                  max_denoise: bool, seed: int | None, batch_inds=None) -> torch.Tensor:
        """The noise to start from instead of ``noise``; ``noise`` itself when the start is not pure noise (said in
        the console). ``latent`` is the processed latent the sampler adds, ``mask`` its prepared denoise mask,
        ``batch_inds`` the latent's batch indices (read back from ``noise`` when not given)."""
        start = SamplerStart.k_diffusion(sigma0, sgm_noise_multiplier=max_denoise)
        reason = start_skip_reason(noise_is_zero=not torch.any(noise), latent_is_empty=not torch.any(latent),
                                   masked=mask is not None, max_denoise=max_denoise) or skip_reason(start)
        if reason is None and seed is None and self.solver == "SDE":
            reason = "the sampler was given no seed, from which the SDE solver's fresh noise is drawn"
        if reason:
            log(f"skipped: {reason}")
            return noise
        if self.solver == "SDE" and batch_inds is None:
            batch_inds = batch_indices(noise, int(seed))
        z = fresh_noise(seed, noise, batch_inds) if self.solver == "SDE" else None
        out = oms_start(self.bundle.module, self.bundle.encoder, noise.float(), self.prompt, start=start, cfg=self.cfg,
                        negative_prompt=self.negative_prompt, solver=self.solver.lower(), z=z)
        if mask is not None:
            out = inpaint_noise(out, noise.float(), latent.float(), mask.float(), noise_scale(sigma0, max_denoise))
        log(f"the sampling starts from the OMS latent (sigma0 {sigma0:.4g}, {self.bundle.label})")
        return out.to(noise.dtype)


def sampler_sample(run: OMSRun, executor, guider, sigmas, extra_args, callback, noise, latent_image=None,
                   denoise_mask=None, disable_pbar=False):
    """SAMPLER_SAMPLE wrapper: sees the sampler's exact sigmas, processed latent, mask, seed and max_denoise.

    The model is checked again here: a node placed after One More Step (ModelSamplingContinuousEDM,
    ModelSamplingSD3, …) can change the sampling the model is run with."""
    patcher = getattr(guider, "model_patcher", None)
    reason = model_reason(patcher) if patcher is not None else None
    if reason:
        log(f"skipped: {reason}")
    elif len(sigmas) > 1:
        max_denoise = bool(executor.class_obj.max_denoise(guider, sigmas))
        noise = run.corrected(noise, latent_image, denoise_mask, float(sigmas[0]), max_denoise, extra_args.get("seed"))
    return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


def new_run(model, oms: OMSChoice, prompt: str, negative_prompt: str, cfg: float, solver: str) -> OMSRun | str:
    """The run for ``model``, or why OMS cannot work on it. Bad options and file problems are raised here, before
    anything is loaded or sampled."""
    check_options(cfg, solver.lower())
    reason = model_reason(model)
    if reason:
        return reason
    bundle = prepared(oms, LATENT_SPACE_OF_FORMAT[latent_format_name(model)])
    prompt, negative_prompt = clean_prompt(prompt), clean_prompt(negative_prompt)
    readable = bundle.encoder.max_length - 2  # the start and end tokens take two places
    if any(text_encoders.token_count(text) > readable for text in (prompt, negative_prompt)):
        log(f"a prompt is longer than the {readable} tokens the OMS text encoder reads: OMS reads only its beginning")
    info = summary(module=bundle.label, text_encoder=bundle.encoder_source, prompt=prompt,
                   negative_prompt=negative_prompt, cfg=cfg, solver=solver)
    return OMSRun(bundle, prompt, negative_prompt, cfg, solver, info)


# ---------------------------------------------------------------------------------------------------------------
# Nodes


def option_inputs() -> list:
    """The OMS prompt, negative prompt, CFG and solver inputs, with the WebUI extension's defaults and ranges."""
    cfg = ARG_BY_NAME["cfg"]
    return [
        io.String.Input("prompt", multiline=True, default="",
                        tooltip="What the image should look like in light and colour (OMS reads it with its own text "
                                "encoder; convert it to an input to share the sampler's prompt)"),
        io.String.Input("negative_prompt", multiline=True, default="", tooltip="Empty: as released"),
        io.Float.Input("cfg", default=cfg.default, min=cfg.minimum, max=cfg.maximum, step=cfg.step,
                       tooltip="OMS CFG; at 1 the negative prompt is not used"),
        io.Combo.Input("solver", options=list(SOLVER_CHOICES), default=ARG_BY_NAME["solver"].default,
                       tooltip="SDE: fresh noise from the seed (as released); DDIM: keeps the seed's composition"),
    ]


def ui_text(text: str) -> dict:
    return {"text": [text]}


def passed_through(value, reason: str) -> io.NodeOutput:
    """The node's input unchanged, and why, in the console and under the node."""
    log(f"skipped: {reason}")
    return io.NodeOutput(value, ui=ui_text(f"One More Step skipped: {reason}"))


class OMSLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneMoreStepLoader",
            display_name="Load One More Step module",
            category=CATEGORY,
            description="Chooses the OMS module and its text encoder (ComfyUI/models/oms; downloaded on first use)",
            inputs=[
                io.Combo.Input("module", options=[AUTOMATIC] + [entry.name for entry in module_entries()],
                               default=AUTOMATIC, tooltip="Automatic: the module made for the model's latent space"),
                io.Combo.Input("text_encoder", options=[AUTOMATIC] + folder_paths.get_filename_list("text_encoders"),
                               default=AUTOMATIC,
                               tooltip="Automatic: models/oms/text_encoder, an SD 2.x checkpoint, an OpenCLIP "
                                       "ViT-H/14 file in text_encoders, else a download"),
                io.Combo.Input("text_encoder_layer", options=list(text_encoders.LAYERS),
                               default=text_encoders.LAYERS[0], advanced=True),
                io.Combo.Input("precision", options=list(PRECISIONS), default=PRECISIONS[0], advanced=True),
                io.Boolean.Input("download_missing", default=True,
                                 tooltip="Download a missing module or text encoder from Hugging Face on first use "
                                         "(never with HF_HUB_OFFLINE=1)"),
            ],
            outputs=[OMSModuleType.Output(display_name="oms_module")],
        )

    @classmethod
    def execute(cls, module, text_encoder, text_encoder_layer, precision, download_missing) -> io.NodeOutput:
        if module != AUTOMATIC:
            named_module(module, module_entries(), module_dirs())
        return io.NodeOutput(OMSChoice(module, text_encoder, text_encoder_layer, precision, download_missing))


class OneMoreStep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneMoreStep",
            display_name=TITLE,
            category=CATEGORY,
            description="Every sampler using this model starts from the OMS latent where it starts from pure noise "
                        "(empty latent, or the mask of an inpainting at denoise 1): really dark and bright images",
            inputs=[io.Model.Input("model"), OMSModuleType.Input("oms_module"), *option_inputs()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, oms_module, prompt, negative_prompt, cfg, solver) -> io.NodeOutput:
        run = new_run(model, oms_module, prompt, negative_prompt, cfg, solver)
        if isinstance(run, str):
            return passed_through(model, run)
        patched = model.clone()
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, KEY,
                                     functools.partial(sampler_sample, run))
        patched.set_additional_models(KEY, [run.bundle.patcher])  # loaded and offloaded with the model
        patched.model_options["transformer_options"] = {**patched.model_options.get("transformer_options", {}),
                                                        KEY: run.info}
        return io.NodeOutput(patched, ui=ui_text(summary_text(run.info)))


@dataclass(eq=False)
class OMSNoise:
    """A NOISE whose draw starts the sampler at the OMS latent (``.seed`` and ``generate_noise`` as ComfyUI's)."""

    inner: object
    model: object
    sigmas: torch.Tensor
    run: OMSRun

    @property
    def seed(self):
        return self.inner.seed

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        noise = self.inner.generate_noise(input_latent)
        samples = input_latent["samples"]
        latent = self.model.model.process_latent_in(samples) if torch.any(samples) else samples
        mask = input_latent.get("noise_mask")
        if mask is not None:
            mask = comfy.sampler_helpers.prepare_mask(mask, noise.shape, "cpu")
        sigma0 = float(self.sigmas[0])
        sigma_max = float(self.model.get_model_object("model_sampling").sigma_max)
        mm.load_models_gpu([self.run.bundle.patcher])
        return self.run.corrected(noise, latent, mask, sigma0, starts_at_max_denoise(sigma0, sigma_max), self.seed,
                                  input_latent.get("batch_index"))


class OMSNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OneMoreStepNoise",
            display_name="One More Step noise",
            category=CATEGORY,
            description="NOISE for SamplerCustomAdvanced that starts at the OMS latent; give it the sampler's MODEL "
                        "and SIGMAS",
            inputs=[io.Noise.Input("noise"), io.Model.Input("model"), io.Sigmas.Input("sigmas"),
                    OMSModuleType.Input("oms_module"), *option_inputs()],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, noise, model, sigmas, oms_module, prompt, negative_prompt, cfg, solver) -> io.NodeOutput:
        run = new_run(model, oms_module, prompt, negative_prompt, cfg, solver) if len(sigmas) > 1 else \
            "the SIGMAS hold no sampling step"
        if isinstance(run, str):
            return passed_through(noise, run)
        return io.NodeOutput(OMSNoise(noise, model, sigmas, run), ui=ui_text(summary_text(run.info)))


class OMSExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [OMSLoader, OneMoreStep, OMSNoiseNode]


async def comfy_entrypoint() -> OMSExtension:
    return OMSExtension()
