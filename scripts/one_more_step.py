"""One More Step (Hu et al., CVPR 2024) in the AUTOMATIC1111 WebUI 1.6–1.10, Forge, reForge, Forge Classic and
Forge Neo.

Thin glue: it reads the WebUI's objects into plain values for ``oms_webui.logic`` / ``oms_webui.args`` and
hands the start noise to ``lib_oms.engine.oms_start``. The step is done in a ``p.rng`` wrapper installed by
``process_batch``, whose first draw (the start noise) is corrected, on every WebUI: an error raised there stops the
generation, whereas A1111 ≥ 1.10, Forge and reForge only report errors of ``process_before_every_sampling`` and
would go on to make an image without OMS.

Every ``modules.*`` imported here exists in all of these WebUIs except ``modules.lowvram`` (A1111, Forge, reForge),
which is reached only through ``memory_manager()`` / ``make_room()``; the Forge family's memory manager is looked up
by what it offers, not by the WebUI's name.
"""

import contextlib
import functools
import importlib
import inspect
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from fastapi.exceptions import HTTPException
from modules import script_callbacks, scripts, shared

from lib_oms import download, module_files, text_encoders
from lib_oms.engine import Z_SEED_OFFSET, oms_start
from lib_oms.errors import ModuleFileError, ModuleMissingError, OMSError, TextEncoderMissingError
from lib_oms.sources import (
    OPENCLIP_H,
    PRECISIONS,
    EncoderSource,
    choose_module,
    huggingface_hub_dir,
    module_dtype,
    named_module,
    resolve_text_encoder,
)
from lib_oms.step import inpaint_noise
from lib_oms.step import skip_reason as start_skip_reason
from oms_webui.args import (
    ARG_BY_NAME,
    ARGS,
    AUTOMATIC,
    INFOTEXT_FIRST_PASS_ONLY,
    INFOTEXT_MODULE_REQUESTED,
    INFOTEXT_SKIPPED,
    ArgumentError,
    OMSArgs,
    alwayson_args_problem,
    convert,
    from_dict,
    infotext_keys,
    infotext_params,
    module_hash,
    module_label,
    module_name,
    parse_script_args,
    paste_value,
)
from oms_webui.logic import (
    K_DIFFUSION,
    LATENT_SPACE_OF_FAMILY,
    TIMESTEP,
    Job,
    img2img_start,
    job_skip_reason,
    manager_low_vram,
    model_skip_reason,
    offload_after_use,
    room_to_ask,
    txt2img_start,
    untouched_passes,
    unwrap_hijacked_keys,
    uses_refiner,
)

TITLE = "One More Step"
EXTENSION_DIR = Path(__file__).resolve().parents[1]
AXIS_PREFIX = "[OMS]"

# Neither cache is dropped when a model loads: modules and file-based text encoders do not depend on the checkpoint
# (the SDXL refiner reloads two models every generation), and an encoder read from a checkpoint is kept under it.
MODULE_CACHE = module_files.ModuleCache()
ENCODER_CACHE: OrderedDict[tuple, text_encoders.PromptEmbeddingCache] = OrderedDict()
ENCODERS_KEPT = 2  # OpenCLIP-H's text tower is 0.7 GB in fp16, SDXL's two text towers 1.6 GB


def log(message: str) -> None:
    print(f"[{TITLE}] {message}")


class RequestRefused(HTTPException):
    """An OMS error in what was asked for (an argument, a missing or unfit file). The WebUI's API answers with an
    exception's ``status_code`` attribute and prints no traceback for an HTTPException: this is HTTP 422 with the
    message, like the API's own checks of a request. Other errors (bugs, out of memory) stay 500 with a traceback."""

    def __init__(self, error: OMSError):
        super().__init__(status_code=422, detail=str(error))
        self.error = error

    def __str__(self):
        return self.detail


def refusal(error: Exception) -> Exception:
    return RequestRefused(error) if isinstance(error, OMSError) else error


def option(key: str, default):
    return shared.opts.data.get(key, default)


# ---------------------------------------------------------------------------------------------------------------
# Where modules live

def module_dirs() -> list[Path]:
    """<models>/oms (survives reinstalling), --oms-models-dir, then the extension's own models/."""
    from modules import paths

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


# ---------------------------------------------------------------------------------------------------------------
# Downloads on first use (lib_oms.download)

def download_refused() -> str | None:
    """Why missing files must not be downloaded, or None: downloading on first use is on by default."""
    if getattr(shared.cmd_opts, "oms_no_download", False):
        return "downloading is off (--oms-no-download)"
    if not option("oms_auto_download", True):
        return "downloading is off (Settings > One More Step > Download missing OMS files automatically)"
    return None


def show_progress(text: str) -> None:
    shared.state.textinfo = text  # the WebUI's progress text


def found_or_downloaded(find, obtain):
    """``find()``; when it says a file is missing, ``obtain(missing)`` downloads it (or raises why not), then
    ``find()`` again."""
    try:
        return find()
    except (ModuleMissingError, TextEncoderMissingError) as missing:
        obtain(missing, refused=download_refused(), progress=show_progress, should_stop=interrupted)
        return find()


# ---------------------------------------------------------------------------------------------------------------
# Reading the WebUI into plain values

def checkpoint_family(sd_model) -> str:
    """"sd1" | "sd2" | "sdxl" | "sdxl-refiner" | "sd3" | the model class name for anything else (Flux, ...)."""
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    if getattr(sd_model, "is_sdxl", False):
        embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", [])
        text_embedders = [e for e in embedders if getattr(e, "input_key", None) == "txt"]
        return "sdxl-refiner" if len(text_embedders) == 1 else "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    return type(sd_model).__name__


def job_of(p) -> Job:
    from modules import processing

    noise_schedule = option("sd_noise_schedule", "Default")
    refiner = uses_refiner(getattr(p, "refiner_checkpoint", None), getattr(p, "refiner_switch_at", None))
    if isinstance(p, processing.StableDiffusionProcessingTxt2Img):
        return Job("txt2img", hires=bool(getattr(p, "enable_hr", False)), refiner=refiner,
                   firstpass_image=getattr(p, "firstpass_image", None) is not None, noise_schedule=noise_schedule)
    return Job("img2img", refiner=refiner, inpainting=getattr(p, "image_mask", None) is not None,
               inpainting_fill=int(getattr(p, "inpainting_fill", 1)),
               denoising_strength=float(getattr(p, "denoising_strength", 0.75) or 0.0),
               initial_noise_multiplier=float(getattr(p, "initial_noise_multiplier", 1.0)),
               extra_noise=float(option("img2img_extra_noise", 0.0)), noise_schedule=noise_schedule)


def sampler_kind(sampler) -> tuple[str | None, str]:
    from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

    name = getattr(sampler.funcname, "__name__", str(sampler.funcname))
    if isinstance(sampler, sd_samplers_kdiffusion.KDiffusionSampler):
        return K_DIFFUSION, name
    if isinstance(sampler, sd_samplers_timesteps.CompVisSampler):
        return TIMESTEP, name
    return None, name


def timestep_alphas(p):
    """ᾱ the timestep samplers use (A1111: the model's; Forge 2: set on the sampler's denoiser)."""
    wrap = getattr(p.sampler, "model_wrap", None)  # A1111 1.6-1.8's CompVisSampler has none
    for owner in (wrap, getattr(wrap, "inner_model", None), p.sd_model):
        if getattr(owner, "alphas_cumprod", None) is not None:
            return owner.alphas_cumprod.float().cpu()
    raise OMSError("cannot find alphas_cumprod for this sampler")


def clean_prompt(prompt: str, steps: int) -> str:
    """The prompt as the sampler reads it at its first step, in plain words for the OMS text encoder, read with the
    WebUI's own parsers: extra-network tags (<lora:…>) removed, AND-separated sub-prompts joined with commas (their
    weights dropped), prompt editing and alternation at the first step, emphasis syntax and BREAK removed."""
    from modules import extra_networks, prompt_parser

    text, _networks = extra_networks.parse_prompt(prompt)
    _indexes, subprompts, _positions = prompt_parser.get_multicond_prompt_list([text])
    cleaned = []
    for subprompt in subprompts:
        first_step = prompt_parser.get_learned_conditioning_prompt_schedules([subprompt], max(int(steps), 1))[0][0][1]
        chunks = prompt_parser.parse_prompt_attention(first_step)  # BREAK comes as ["BREAK", -1]
        text = "".join(" " if (chunk, weight) == ("BREAK", -1) else chunk for chunk, weight in chunks)
        words = " ".join(text.split())
        if words:
            cleaned.append(words)
    return ", ".join(cleaned)


def oms_prompts(oms_prompt: str, image_prompts: list[str], steps: int) -> list[str]:
    """One OMS prompt per image: the OMS prompt when given, else each image's own prompt, all cleaned."""
    if oms_prompt.strip():
        return [clean_prompt(oms_prompt, steps)] * len(image_prompts)
    return [clean_prompt(prompt, steps) for prompt in image_prompts]


def sampler_start(p, job: Job):
    """The SamplerStart of this sampling, or a string saying why OMS cannot tell where it starts."""
    from modules import sd_samplers_common

    kind, name = sampler_kind(p.sampler)
    if kind is None:
        return f"sampler {p.sampler_name!r} is neither a k-diffusion nor a DDIM/PLMS/UniPC sampler"
    steps, t_enc = (p.steps, None) if job.mode == "txt2img" else sd_samplers_common.setup_img2img_steps(p)
    sigmas = p.sampler.get_sigmas(p, steps).float().cpu() if kind == K_DIFFUSION else None
    timesteps = p.sampler.get_timesteps(p, steps).cpu() if kind == TIMESTEP else None
    alphas = timestep_alphas(p) if kind == TIMESTEP else None
    if job.mode == "txt2img":
        return txt2img_start(kind, name, sigmas=sigmas, timesteps=timesteps, alphas_cumprod=alphas,
                             sgm_noise_multiplier=bool(option("sgm_noise_multiplier", False)))
    return img2img_start(kind, steps=steps, t_enc=t_enc, sigmas=sigmas, timesteps=timesteps, alphas_cumprod=alphas)


# ---------------------------------------------------------------------------------------------------------------
# Loading (cached across model loads: see MODULE_CACHE)

def device_and_dtype():
    from modules import devices

    # --use-cpu oms / all, as A1111's devices.get_device_for reads it (Forge's and reForge's ignore it)
    use_cpu = getattr(shared.cmd_opts, "use_cpu", None) or []
    if "oms" in use_cpu or "all" in use_cpu:
        device = torch.device("cpu")
    else:
        device = devices.get_device_for("oms") if hasattr(devices, "get_device_for") else devices.device
    full_precision = getattr(devices, "dtype_unet", torch.float16) == torch.float32
    dtype = module_dtype(option("oms_precision", PRECISIONS[0]), torch.device(device).type, full_precision)
    return torch.device(device), dtype


def checkpoint_text_weights(sd_model, kind: str):
    """The loaded checkpoint's text-encoder weights: its .safetensors file (only those tensors are read, and never
    a LoRA merged into the live model), else the live model's tensors with the WebUI's hijack wrappers unnamed."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", "") or ""
    if filename.endswith(".safetensors") and Path(filename).is_file():
        return Path(filename)
    if kind == OPENCLIP_H:
        wrapped = sd_model.cond_stage_model
        return unwrap_hijacked_keys(getattr(wrapped, "wrapped", wrapped).model.state_dict())
    live = {k: v for k, v in sd_model.state_dict().items() if k.startswith("conditioner.")}
    return unwrap_hijacked_keys(live)


def checkpoint_identity(sd_model) -> tuple:
    """What tells one checkpoint's weights from another's: its file's version (path, time, size)."""
    filename = getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", "") or ""
    return module_files.file_version(filename) if filename and Path(filename).is_file() else (filename,)


def load_encoder(kind: str, source: EncoderSource, sd_model, home, dtype) -> text_encoders.PromptEmbeddingCache:
    """The text encoder behind a prompt cache, loaded once (once per checkpoint when read from the checkpoint) and
    kept at ``home`` between steps; the least recently used encoders beyond ENCODERS_KEPT are dropped."""
    layer = option("oms_text_encoder_layer", text_encoders.LAYERS[0])
    checkpoint = checkpoint_identity(sd_model) if source.origin == "checkpoint" else None
    key = (kind, source, checkpoint, layer, dtype)
    if key not in ENCODER_CACHE:
        weights = checkpoint_text_weights(sd_model, kind) if source.origin == "checkpoint" else source.path
        if kind == OPENCLIP_H:
            encoder = text_encoders.load_openclip_text_encoder(weights, layer=layer, device="cpu", dtype=dtype)
        else:
            encoder = text_encoders.load_mixclip_text_encoder(weights, device="cpu", dtype=dtype)
        log(f"text encoder: {source.describe()} ({kind}, {layer if kind == OPENCLIP_H else 'penultimate'})")
        ENCODER_CACHE[key] = text_encoders.PromptEmbeddingCache(encoder)
        while len(ENCODER_CACHE) > ENCODERS_KEPT:
            ENCODER_CACHE.popitem(last=False)
    ENCODER_CACHE.move_to_end(key)
    ENCODER_CACHE[key].encoder.to(home)
    return ENCODER_CACHE[key]


# ---------------------------------------------------------------------------------------------------------------
# The plan of one generation: decided in process(), carried out at the first noise draw

@dataclass
class Plan:
    args: OMSArgs
    job: Job | None
    module: object = None
    encoder: object = None
    device: torch.device = torch.device("cpu")
    low_vram: bool = False
    offload: bool = False
    error: Exception | None = None
    said: set = field(default_factory=set)


def say_once(plan: Plan, message: str) -> None:
    """Said in the console once per generation (not once per batch)."""
    if message not in plan.said:
        plan.said.add(message)
        log(message)


def say_skipped(p, plan: Plan, reason: str) -> None:
    """A skip replaces the OMS keys of the infotext with its reason and is said once per generation in the console."""
    for key in infotext_keys():
        p.extra_generation_params.pop(key, None)
    p.extra_generation_params[INFOTEXT_SKIPPED] = reason
    say_once(plan, f"skipped: {reason}")


def prepare(p, args: OMSArgs) -> Plan:
    """Everything that can fail for configuration reasons, done before sampling; writes the infotext."""
    job = job_of(p)
    plan = Plan(args, job)
    sd_model = p.sd_model
    family = checkpoint_family(sd_model)
    reason = model_skip_reason(family, int(getattr(sd_model, "latent_channels", 4))) or job_skip_reason(job)
    if reason:
        say_skipped(p, plan, reason)
        return plan
    latent_space = LATENT_SPACE_OF_FAMILY[family]
    plan.device, dtype = device_and_dtype()
    plan.low_vram = low_vram_mode(sd_model)
    plan.offload = offload_after_use(option("oms_keep_in_vram", True), plan.low_vram, plan.device.type)
    home = torch.device("cpu") if plan.offload else plan.device  # where the module waits between steps
    entry = found_or_downloaded(
        lambda: choose_module(module_name(args.module), module_entries(), latent_space,
                              option(f"oms_module_{latent_space}", AUTOMATIC),
                              lambda e: module_files.describe_module(e.path)[0], module_dirs()),
        functools.partial(download.obtain_module, latent_space, module_dirs()[0]))
    loads = MODULE_CACHE.loads
    plan.module = MODULE_CACHE.get(entry.path, home, dtype)
    if MODULE_CACHE.loads != loads:
        log(f"module: {entry.path} loaded ({plan.module.latent_space}, {plan.module.text_encoder})")
    plan.module.cuda_graphs = not plan.offload  # a module moved in and out for every step would recapture each time
    module_files.check_latent_space(plan.module, latent_space)
    source = found_or_downloaded(
        lambda: resolve_text_encoder(plan.module.text_encoder, family, setting_path=option("oms_text_encoder_path", ""),
                                     module_dirs=module_dirs(), hub_dir=huggingface_hub_dir(),
                                     checkpoints=checkpoint_files()),
        functools.partial(download.obtain_text_encoder, module_dirs()[0]))
    plan.encoder = load_encoder(plan.module.text_encoder, source, sd_model, home, dtype)
    plan.encoder.encoder.cuda_graphs = plan.module.cuda_graphs
    p.extra_generation_params.update(infotext_params(args, module_label(entry.name, plan.module.short_hash)))
    requested_hash = module_hash(args.module)
    if requested_hash and requested_hash != plan.module.short_hash.lower():
        p.extra_generation_params[INFOTEXT_MODULE_REQUESTED] = args.module
        say_once(plan, f"the module file {plan.module.weights_path} has hash {plan.module.short_hash}, not "
                       f"{requested_hash} as asked ({args.module}): it is another file of that name, so the image "
                       "will differ from the one these parameters came from")
    passes = "; ".join(untouched_passes(job))
    if passes:
        p.extra_generation_params[INFOTEXT_FIRST_PASS_ONLY] = passes
        log(f"the first pass starts from the OMS latent; the {passes} continue from it as usual")
    return plan


@functools.cache  # the WebUI does not change while it runs: look once, not at every generation
def memory_manager():
    """The Forge family's memory manager, which places every model on the GPU itself (Forge and Forge Neo:
    ``backend.memory_management``; reForge and Forge Classic: ``ldm_patched.modules.model_management``), or None
    (A1111, whose --lowvram / --medvram is ``modules.lowvram``)."""
    for name in ("backend.memory_management", "ldm_patched.modules.model_management"):
        try:
            manager = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(manager, "free_memory", None)) and hasattr(manager, "vram_state"):
            return manager
    return None


def low_vram_mode(sd_model) -> bool:
    """A1111's --lowvram / --medvram (set on the model by modules.lowvram), or the Forge family's manager in a
    low-VRAM state: then the module and text encoder leave the GPU after the step."""
    if getattr(sd_model, "lowvram", False):
        return True
    manager = memory_manager()
    return manager is not None and manager_low_vram(getattr(manager.vram_state, "name", str(manager.vram_state)))


def bytes_off(device: torch.device, models) -> int:
    """Bytes of the models' weights that are not on ``device`` yet."""
    return sum(t.numel() * t.element_size() for model in models for t in (*model.parameters(), *model.buffers())
               if t.device.type != device.type)


def managers_device(manager, device: torch.device) -> torch.device:
    """``device`` as the manager names it: it tells its models' devices apart by ``==``, and torch.device("cuda")
    is not torch.device("cuda:0")."""
    own = manager.get_torch_device() if callable(getattr(manager, "get_torch_device", None)) else None
    if device.index is None and own is not None and torch.device(own).type == device.type:
        return torch.device(own)
    return device


def make_room(plan: Plan) -> None:
    """Room on the GPU for the module and text encoder: the Forge family's manager frees what they need as it does
    for its own models (and unloads everything in its no-VRAM state); on A1111 in low-VRAM mode the WebUI's model
    goes to the CPU first (modules.lowvram)."""
    if plan.device.type == "cpu":
        return
    manager = memory_manager()
    if manager is not None:
        models = [plan.module.unet, *plan.encoder.encoder.torch_models()]
        inference = manager.minimum_inference_memory() if hasattr(manager, "minimum_inference_memory") else 0
        room = room_to_ask(bytes_off(plan.device, models), inference)
        manager.free_memory(room, managers_device(manager, plan.device))
    elif plan.low_vram:
        importlib.import_module("modules.lowvram").send_everything_to_cpu()


@contextlib.contextmanager
def on_device(plan: Plan):
    """The module and text encoder on the OMS device for the step, after ``make_room``; offloaded afterwards in
    low-VRAM mode or when they are not kept in VRAM."""
    from modules import devices

    make_room(plan)
    plan.module.to(plan.device)
    plan.encoder.encoder.to(plan.device)
    try:
        yield
    finally:
        if plan.offload:
            plan.module.to("cpu")
            plan.encoder.encoder.to("cpu")
            devices.torch_gc()


@contextlib.contextmanager
def global_generators_kept():
    """The WebUI's randn() reseeds torch's global generators (and the one of its NV source), which later code may
    draw from (Forge's DDPM sampler does): a side draw puts them back as the WebUI left them."""
    from modules import rng

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    nv_rng = getattr(rng, "nv_rng", None)
    with torch.random.fork_rng(devices=cuda):
        yield
    if nv_rng is not None:
        rng.nv_rng = nv_rng


def fresh_noise(p, shape, device) -> torch.Tensor:
    """z of the SDE solver, drawn by the WebUI's own ImageRNG as it draws this batch's noise, with seeds and variation
    seeds shifted by Z_SEED_OFFSET: the RNG source, variation seed / strength and "resize seed from" apply, z is never
    the WebUI's own draw, and each image's z depends on its own seeds (a batch equals the images made one by one).
    At variation strength 0 it is randn_local(seed + Z_SEED_OFFSET), as before."""
    from modules import rng

    seeds = [int(seed) + Z_SEED_OFFSET for seed in p.seeds]
    subseeds = None if p.subseeds is None else [int(seed) + Z_SEED_OFFSET for seed in p.subseeds]
    with global_generators_kept():
        draw = rng.ImageRNG(tuple(shape), seeds, subseeds=subseeds, subseed_strength=p.subseed_strength,
                            seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w).next()
    return draw.to(device)


def interrupted() -> bool:
    state = shared.state
    return bool(state.interrupted or state.skipped or getattr(state, "stopping_generation", False))


def corrected_noise(p, plan: Plan, noise: torch.Tensor) -> torch.Tensor | None:
    """The noise to sample from instead of ``noise`` (the unit draw of this batch), or None to leave it."""
    start = sampler_start(p, plan.job)
    reason = start if isinstance(start, str) else start_skip_reason(start)
    if reason:
        say_skipped(p, plan, reason)
        return None
    args = plan.args
    prompts = oms_prompts(args.prompt, list(p.prompts), p.steps)
    negative = clean_prompt(args.negative_prompt, p.steps)
    readable = plan.encoder.max_length - 2  # the start and end tokens take two places
    if any(text_encoders.token_count(prompt) > readable for prompt in [*prompts, negative]):
        say_once(plan, f"a prompt is longer than the {readable} tokens the OMS text encoder reads: OMS reads only its "
                       "beginning. Put the words for light and colour first, or write them in the OMS prompt")
    unit = noise.float()
    z = fresh_noise(p, unit.shape[1:], unit.device) if args.engine_solver == "sde" else None
    with on_device(plan):
        out = oms_start(plan.module, plan.encoder, unit, prompts, start=start, cfg=args.cfg,
                        negative_prompt=negative, solver=args.engine_solver, z=z)
    if plan.job.mode == "img2img":
        out = inpaint_noise(out, unit, p.init_latent.float(), p.nmask.float(), start.sigma0)
    return out.to(noise.dtype)


class FirstDraw:
    """Wraps ``p.rng``: the first ``next()`` (the start noise of the batch) goes through ``fn``; what ``fn`` raises
    stops the generation on every WebUI."""

    def __init__(self, inner, fn):
        self.inner, self.fn, self.done = inner, fn, False

    def next(self):
        x = self.inner.next()
        if not self.done:
            self.done = True
            x = self.fn(x)
        return x

    def __getattr__(self, name):
        return getattr(self.inner, name)


def without_frames(error: Exception) -> Exception:
    """``error`` as the user will see it (its type and message) without its traceback and chained errors: kept until
    the first noise draw, those would hold the failed load's frames and their tensors in a reference cycle with
    ``p`` that only a full garbage collection frees (1.9 GB per failed request with a real text encoder)."""
    error.__cause__ = error.__context__ = None
    return error.with_traceback(None)


def raise_error(error: Exception, _x):
    refused = refusal(error)
    if refused is error:
        raise error
    raise refused from error


def correct_first_draw(p, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    if interrupted():
        return x
    try:
        out = corrected_noise(p, plan, x)
    except OMSError as error:
        raise refusal(error) from error
    return x if out is None else out


# ---------------------------------------------------------------------------------------------------------------
# The script

def xyz_overrides(p) -> dict:
    """The values of this X/Y/Z cell's OMS axes. A cell of any OMS axis turns OMS on, as an "[OMS] Enabled: True"
    cell does, unless an [OMS] Enabled axis says otherwise."""
    overrides = getattr(p, "_oms_xyz", {})
    return {"enabled": True, **overrides} if overrides else {}


def requested(args, overrides: dict) -> bool:
    """Whether OMS is asked for, before validating anything else (a disabled script must stay untouched)."""
    if "enabled" in overrides:
        raw = overrides["enabled"]
    elif args and isinstance(args[0], dict):
        raw = args[0].get("enabled", False)
    else:
        raw = args[0] if args else False
    try:
        return bool(convert(ARG_BY_NAME["enabled"], raw))
    except ArgumentError:
        return True  # unreadable: let the validation name the field


# How each control reads a pasted infotext; one object per argument, shared by the txt2img and img2img tabs, so that
# the WebUI's "Send to" buttons can match a tab's field to the other tab's by these names.
PASTE = {arg.name: functools.partial(paste_value, arg) for arg in ARGS}


class OneMoreStepScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules import ui_common
        from modules.ui_components import InputAccordion

        a = ARG_BY_NAME
        with InputAccordion(a["enabled"].default, label=a["enabled"].label, elem_id=self.elem_id("enabled")) as enabled:
            with gr.Row():
                module = gr.Dropdown(label=a["module"].label, choices=module_choices(), value=a["module"].default,
                                     allow_custom_value=True, elem_id=self.elem_id("module"))  # pasted names
                ui_common.create_refresh_button(module, lambda: None, lambda: {"choices": module_choices()},
                                                self.elem_id("module_refresh"))
            prompt = gr.Textbox(label=a["prompt"].label, value=a["prompt"].default, lines=2,
                                placeholder="Empty: each image's own prompt", elem_id=self.elem_id("prompt"))
            negative_prompt = gr.Textbox(label=a["negative_prompt"].label, value=a["negative_prompt"].default,
                                         lines=1, placeholder="Empty: as released", elem_id=self.elem_id("negative"))
            with gr.Row():
                cfg = gr.Slider(label=a["cfg"].label, minimum=a["cfg"].minimum, maximum=a["cfg"].maximum,
                                step=a["cfg"].step, value=a["cfg"].default, elem_id=self.elem_id("cfg"))
                solver = gr.Radio(label=a["solver"].label, choices=list(a["solver"].choices),
                                  value=a["solver"].default, elem_id=self.elem_id("solver"))
        components = {"enabled": enabled, "module": module, "prompt": prompt, "negative_prompt": negative_prompt,
                      "cfg": cfg, "solver": solver}
        self.infotext_fields = [(components[arg.name], PASTE[arg.name]) for arg in ARGS]
        # "Send to img2img/txt2img" copies the fields whose name is listed here (the same objects in both tabs)
        self.paste_field_names = [PASTE[arg.name] for arg in ARGS]
        return [components[arg.name] for arg in ARGS]

    def process(self, p, *args):
        p._oms_plan = None
        for key in infotext_keys():  # X/Y/Z cells share one extra_generation_params: drop another cell's keys
            p.extra_generation_params.pop(key, None)
        overrides = xyz_overrides(p)
        if not requested(args, overrides):
            return
        try:
            oms_args = from_dict(overrides, parse_script_args(args))
            if oms_args.enabled:
                p._oms_plan = prepare(p, oms_args)
        except Exception as error:  # raised from the first noise draw: the WebUI swallows errors of process()
            log(f"error: {error}")
            p._oms_plan = Plan(OMSArgs(), None, error=without_frames(error))

    def process_batch(self, p, *args, **kwargs):
        plan = getattr(p, "_oms_plan", None)
        if plan is None:
            return
        if plan.error is not None:
            p.rng = FirstDraw(p.rng, functools.partial(raise_error, plan.error))
        elif plan.module is not None:
            p.rng = FirstDraw(p.rng, functools.partial(correct_first_draw, p, plan))


# ---------------------------------------------------------------------------------------------------------------
# Settings, X/Y/Z axes

def on_ui_settings():
    section = ("oms", TITLE)

    def add(key, info):
        shared.opts.add_option(key, info)

    for space, what in (("sd", "SD1.x / SD2.x"), ("sdxl", "SDXL")):
        add(f"oms_module_{space}", shared.OptionInfo(
            AUTOMATIC, f"Module used for {what} checkpoints when the module is 'Automatic'", gr.Dropdown,
            lambda: {"choices": module_choices()}, refresh=lambda: None, section=section))
    add("oms_auto_download", shared.OptionInfo(
        True, "Download missing OMS files automatically (the module for the checkpoint and the SD 2.x text encoder, "
        "from Hugging Face; --oms-no-download turns this off)", section=section))
    add("oms_text_encoder_path", shared.OptionInfo(
        "", "OpenCLIP ViT-H/14 text encoder: file or folder (blank: automatic search)", section=section))
    add("oms_text_encoder_layer", shared.OptionInfo(
        text_encoders.LAYERS[0], "Text encoder layer", gr.Radio, {"choices": list(text_encoders.LAYERS)},
        section=section))
    add("oms_keep_in_vram", shared.OptionInfo(
        True, "Keep the module and text encoder in VRAM between generations (always offloaded with --lowvram/"
        "--medvram)", section=section))
    add("oms_precision", shared.OptionInfo(
        PRECISIONS[0], "Precision of the module and text encoder (Automatic: fp16 on a GPU unless the WebUI runs its "
        "model in fp32, e.g. A1111's --no-half or Forge's --all-in-fp32)",
        gr.Radio, {"choices": list(PRECISIONS)}, section=section))


class AlwaysonArgsCheck:
    """ASGI middleware answering HTTP 422 with a message for a txt2img/img2img request whose One More Step "args"
    is not a list (the WebUI's API would answer ``KeyError: 0``). Other requests pass untouched: the body read here
    is handed on as it came."""

    PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message.get("type") != "http.request" or not message.get("more_body", False):
                break
        problem = alwayson_args_problem(body, TITLE)
        if problem is not None:
            content = json.dumps({"error": "HTTPException", "detail": problem, "body": "", "errors": problem})
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": content.encode()})

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def add_middleware(app, middleware) -> None:
    """``app.add_middleware`` once the app serves requests, on every Starlette the WebUIs ship. Starlette ≤ 0.2x
    (A1111: 0.26) rebuilds its middleware stack there; later ones (Forge Neo: 0.50) refuse ("Cannot add middleware
    after an application has started") and build the stack from ``user_middleware`` when it is None, which the next
    request then does with this one in it."""
    try:
        app.add_middleware(middleware)
    except RuntimeError:
        from starlette.middleware import Middleware

        app.user_middleware.insert(0, Middleware(middleware))
        app.middleware_stack = None


def on_app_started(_demo, app) -> None:
    add_middleware(app, AlwaysonArgsCheck)


def set_xyz_value(p, x, xs, *, name):
    p._oms_xyz = {**getattr(p, "_oms_xyz", {}), name: x}


def confirm_xyz_values(p, xs, *, arg):
    """Every value of an OMS axis checked before the grid starts (a missing module too)."""
    try:
        for x in xs:
            value = convert(arg, x)
            if arg.kind == "module" and value != AUTOMATIC:
                try:
                    named_module(module_name(value), module_entries(), module_dirs())
                except ModuleFileError as missing:
                    raise ArgumentError(f"One More Step: argument '{arg.name}' ({arg.label}): {missing}") from None
    except OMSError as error:
        raise refusal(error) from error


def prepare_number_values(text: str, *, xyz, arg) -> list[str]:
    """The X/Y/Z plot's own list and range parsing of a number axis, with the extension's message for a value that
    is neither a number nor a range (the plot alone says only "could not convert string to float")."""
    values = xyz.csv_string_to_list_strip(text)
    for value in values:
        if value and not (xyz.re_range_float.fullmatch(value) or xyz.re_range_count_float.fullmatch(value)):
            confirm_xyz_values(None, [value], arg=arg)
    return values


def find_xyz_module():
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    return None


def register_xyz_axes() -> None:
    xyz = find_xyz_module()
    if xyz is None or any(opt.label.startswith(AXIS_PREFIX) for opt in xyz.axis_options):
        return
    types = {"bool": str, "number": float, "text": str, "choice": str, "module": str}
    choices = {"bool": lambda: ["True", "False"], "module": module_choices}
    has_prepare = "prepare" in inspect.signature(xyz.AxisOption).parameters  # A1111 >= 1.9, Forge, reForge
    for arg in ARGS:
        if arg.axis is None:
            continue
        arg_choices = choices.get(arg.kind) or ((lambda arg=arg: list(arg.choices)) if arg.choices else None)
        prepare = {"prepare": functools.partial(prepare_number_values, xyz=xyz, arg=arg)} \
            if arg.kind == "number" and has_prepare else {}
        xyz.axis_options.append(xyz.AxisOption(
            arg.axis, types[arg.kind], functools.partial(set_xyz_value, name=arg.name),
            confirm=functools.partial(confirm_xyz_values, arg=arg), choices=arg_choices,
            cost=0.5 if arg.kind == "module" else 0.0, **prepare))


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(register_xyz_axes)
script_callbacks.on_app_started(on_app_started)
