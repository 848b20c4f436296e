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

from lib_oms import module_files
from lib_oms.engine import z_seed
from lib_oms.options import AUTOMATIC, CFG, HELP, LAYERS, PRECISIONS, SOLVER_NAMES, check_cfg, solver_named
from lib_oms.runtime import Choice, Host, HostWords, Inpainting, OMSRuntime, Prepared, corrected_start
from lib_oms.sources import module_dtype, named_module
from lib_oms.step import SamplerStart
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

TITLE = "One More Step"
CATEGORY = TITLE
KEY = "one_more_step"  # the wrapper's, the additional models' and the transformer_options' key
FOLDER = "oms"
EXTENSION_DIR = Path(__file__).resolve().parents[1]
OMSModuleType = io.Custom("OMS_MODULE")
LOADER = "Load One More Step module"
WORDS = HostWords(
    text_encoder_setting=f"ComfyUI's models/text_encoders, chosen as the text_encoder input of {LOADER}",
    other_places=("the local Hugging Face cache {hub_dir} and the .safetensors files in ComfyUI's models/checkpoints "
                  "and models/text_encoders"),
    refresh="refresh the node definitions (press R)",
)
BATCH_INDEX_SEARCH = 64  # how far into a seed's stream a Latent From Batch index is looked for

# <ComfyUI>/models/oms (survives reinstalling the pack; more folders under "oms:" in extra_model_paths.yaml), then
# the pack's own models/.
folder_paths.add_model_folder_path(FOLDER, str(Path(folder_paths.models_dir) / FOLDER), is_default=True)
folder_paths.add_model_folder_path(FOLDER, str(EXTENSION_DIR / "models"))
# Module and text encoder, each kept once with the ModelPatcher that alone moves its weights.
RUNTIME = OMSRuntime()


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
# Loading: module and text encoder through the runtime, each under ComfyUI's model management


@dataclass(frozen=True)
class OMSChoice:
    """What the loader node was set to; resolved against a MODEL by ``prepared``."""

    module: str = AUTOMATIC
    text_encoder: str = AUTOMATIC  # or a file of ComfyUI's text_encoders folder
    layer: str = LAYERS[0]
    precision: str = PRECISIONS[0]
    download: bool = True


class OMSWeights(torch.nn.Module):
    """The torch modules of an OMS module or text encoder as one, for a ComfyUI ModelPatcher."""

    def __init__(self, models):
        super().__init__()
        self.parts = torch.nn.ModuleList(models)


def comfy_host(choice: OMSChoice) -> Host:
    text_encoder_path = "" if choice.text_encoder == AUTOMATIC else \
        folder_paths.get_full_path_or_raise("text_encoders", choice.text_encoder)
    bar = comfy.utils.ProgressBar(1)
    return Host(WORDS, tuple(module_dirs()), text_encoder_path=text_encoder_path,
                checkpoints=lambda: safetensors_files("checkpoints") + safetensors_files("text_encoders"),
                download_refused=None if choice.download else f"downloading is off (download_missing of {LOADER})",
                progress=log, counts=lambda done, total: bar.update_absolute(done, total),
                should_stop=mm.processing_interrupted)


def devices_and_dtype(precision: str) -> tuple[torch.device, torch.device, torch.dtype]:
    """ComfyUI's load and offload devices (``--cpu`` makes both the CPU) and the module's dtype: fp16 on a GPU unless
    ComfyUI runs its models in fp32 (``--force-fp32``) or the loader says fp32."""
    load, offload = mm.get_torch_device(), mm.unet_offload_device()
    full_precision = mm.unet_dtype(load) == torch.float32
    return load, offload, module_dtype(precision, torch.device(load).type, full_precision)


def prepared(choice: OMSChoice, latent_space: str) -> tuple[Prepared, list]:
    """The module and text encoder for a model of ``latent_space`` (loaded once per file version and settings, on
    ComfyUI's offload device), and the ModelPatchers that load them to the GPU with the model: an unchanged one is
    never moved outside ComfyUI's model management."""
    load, offload, dtype = devices_and_dtype(choice.precision)
    ready = RUNTIME.prepare(Choice(choice.module, layer=choice.layer, device=offload, dtype=dtype, move_kept=False,
                                   cuda_graphs=False),  # ComfyUI moves the weights: nothing may keep their addresses
                            latent_space, comfy_host(choice))
    for loaded in ready.loaded:
        log(f"{loaded} loaded")
    patchers = [RUNTIME.companion(model, lambda model, parts=parts: comfy.model_patcher.ModelPatcher(
                    OMSWeights(parts), load_device=load, offload_device=offload))
                for model, parts in ((ready.module, [ready.module.unet]),
                                     (ready.encoder, ready.encoder.encoder.torch_models()))]
    return ready, patchers


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


def fresh_noise(seed: int, noise: torch.Tensor, batch_inds=None) -> torch.Tensor:
    """z of the SDE solver: ComfyUI's own batch noise (``comfy.sample.prepare_noise``, one generator for the batch)
    for the seed's ``z_seed``, so it is never the sampler's own noise, at the batch indices of the sampler's
    ``noise`` (read back from it when not given); the global generator is left as it was."""
    if batch_inds is None:
        batch_inds = batch_indices(noise, int(seed))
    with torch.random.fork_rng(devices=[]):
        return comfy.sample.prepare_noise(torch.zeros_like(noise, device="cpu"), z_seed(seed), batch_inds)


# ---------------------------------------------------------------------------------------------------------------
# The step


@dataclass(eq=False)
class OMSRun:
    """One One More Step node's settings with its prepared module and text encoder: corrects the start noise of a
    sampling."""

    prepared: Prepared
    patchers: list  # ComfyUI's ModelPatchers of the module and text encoder
    prompt: str
    negative_prompt: str
    cfg: float
    solver: str
    info: dict = field(default_factory=dict)

    def corrected(self, noise: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, sigma0: float,
                  max_denoise: bool, seed: int | None, batch_inds=None) -> torch.Tensor:
        """The noise to start from instead of ``noise``; ``noise`` itself when the start is not pure noise (said in
        the console). ``latent`` is the processed latent the sampler adds, ``mask`` its prepared denoise mask,
        ``batch_inds`` the latent's batch indices (read back from ``noise`` when not given)."""
        draws_z = solver_named(self.solver).draws_z
        start = start_skip_reason(noise_is_zero=not torch.any(noise), latent_is_empty=not torch.any(latent),
                                  masked=mask is not None, max_denoise=max_denoise)
        if start is None and seed is None and draws_z:
            start = f"the sampler was given no seed, from which the {self.solver} solver's fresh noise is drawn"
        if start is None:
            start = SamplerStart.k_diffusion(sigma0, sgm_noise_multiplier=max_denoise)
        outcome = corrected_start(
            self.prepared, noise, start, prompts=[self.prompt] * len(noise), negative_prompt=self.negative_prompt,
            cfg=self.cfg, solver=self.solver,
            draw_z=lambda: fresh_noise(seed, noise, batch_inds),
            inpainting=None if mask is None else Inpainting(latent, mask, noise_scale(sigma0, max_denoise)))
        for note in outcome.notes:
            log(note)
        if outcome.noise is None:
            log(f"skipped: {outcome.skipped}")
            return noise
        log(f"the sampling starts from the OMS latent (sigma0 {sigma0:.4g}, {self.prepared.label})")
        return outcome.noise


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
    cfg, solver = check_cfg(cfg), solver_named(solver).name
    reason = model_reason(model)
    if reason:
        return reason
    ready, patchers = prepared(oms, LATENT_SPACE_OF_FORMAT[latent_format_name(model)])
    prompt, negative_prompt = clean_prompt(prompt), clean_prompt(negative_prompt)
    info = summary(module=ready.label, text_encoder=ready.encoder_source.describe(), prompt=prompt,
                   negative_prompt=negative_prompt, cfg=cfg, solver=solver)
    return OMSRun(ready, patchers, prompt, negative_prompt, cfg, solver, info)


# ---------------------------------------------------------------------------------------------------------------
# Nodes


def option_inputs() -> list:
    """The OMS prompt, negative prompt, CFG and solver inputs, with every host's defaults, ranges and help."""
    return [
        io.String.Input("prompt", multiline=True, default="",
                        tooltip=f"{HELP['prompt']} ComfyUI does not tell this node the sampler's prompt: type it "
                                "here, or convert it to an input and connect the same text as the sampler's"),
        io.String.Input("negative_prompt", multiline=True, default="", tooltip=HELP["negative_prompt"]),
        io.Float.Input("cfg", default=CFG.default, min=CFG.minimum, max=CFG.maximum, step=CFG.step,
                       tooltip=HELP["cfg"]),
        io.Combo.Input("solver", options=list(SOLVER_NAMES), default=SOLVER_NAMES[0], tooltip=HELP["solver"]),
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
            display_name=LOADER,
            category=CATEGORY,
            description="Chooses the OMS module and its text encoder (ComfyUI/models/oms; downloaded on first use)",
            inputs=[
                io.Combo.Input("module", options=[AUTOMATIC] + [entry.name for entry in module_entries()],
                               default=AUTOMATIC, tooltip=HELP["module"]),
                io.Combo.Input("text_encoder", options=[AUTOMATIC] + folder_paths.get_filename_list("text_encoders"),
                               default=AUTOMATIC,
                               tooltip="Automatic: models/oms/text_encoder, an SD 2.x checkpoint, an OpenCLIP "
                                       "ViT-H/14 file in text_encoders, else a download"),
                io.Combo.Input("text_encoder_layer", options=list(LAYERS), default=LAYERS[0], advanced=True,
                               tooltip=HELP["layer"]),
                io.Combo.Input("precision", options=list(PRECISIONS), default=PRECISIONS[0], advanced=True,
                               tooltip=HELP["precision"]),
                io.Boolean.Input("download_missing", default=True, tooltip=HELP["download"]),
            ],
            outputs=[OMSModuleType.Output(display_name="oms_module")],
        )

    @classmethod
    def execute(cls, module, text_encoder, text_encoder_layer, precision, download_missing) -> io.NodeOutput:
        if module != AUTOMATIC:
            named_module(module, module_entries(), module_dirs(), WORDS)
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
        patched.set_additional_models(KEY, run.patchers)  # loaded and offloaded with the model
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
        mm.load_models_gpu(self.run.patchers)
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
