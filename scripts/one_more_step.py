"""One More Step (Hu et al., CVPR 2024) in the AUTOMATIC1111 WebUI 1.6–1.10, Forge and reForge.

Thin glue: it reads the WebUI's objects into plain values for ``lib_oms.webui_logic`` / ``lib_oms.webui_args`` and
hands the start noise to ``lib_oms.engine.oms_start``. The hook is chosen once, at import:
``process_before_every_sampling`` edits the noise in place where it exists (A1111 ≥ 1.10, Forge, reForge); older
WebUIs get a ``p.rng`` wrapper from ``process_batch`` whose first draw is corrected.
"""

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from modules import script_callbacks, scripts, shared

from lib_oms import modules as oms_modules
from lib_oms import text_encoders
from lib_oms.engine import Z_SEED_OFFSET, oms_start
from lib_oms.errors import OMSError
from lib_oms.step import skip_reason as start_skip_reason
from lib_oms.webui_args import (
    ARG_BY_NAME,
    ARGS,
    AUTOMATIC,
    INFOTEXT_FIRST_PASS_ONLY,
    INFOTEXT_SKIPPED,
    ArgumentError,
    OMSArgs,
    convert,
    from_dict,
    infotext_keys,
    infotext_params,
    module_label,
    parse_script_args,
    paste_value,
)
from lib_oms.webui_logic import (
    K_DIFFUSION,
    LATENT_SPACE_OF_FAMILY,
    OPENCLIP_H,
    PRECISIONS,
    TIMESTEP,
    EncoderSource,
    Job,
    choose_module,
    clean_prompt,
    huggingface_hub_dir,
    img2img_start,
    inpaint_noise,
    job_skip_reason,
    model_skip_reason,
    module_dtype,
    offload_after_use,
    oms_prompts,
    resolve_text_encoder,
    txt2img_start,
    untouched_passes,
    unwrap_hijacked_keys,
)

TITLE = "One More Step"
EXTENSION_DIR = Path(__file__).resolve().parents[1]
# A1111 >= 1.10, Forge and reForge call this hook with the start noise; older WebUIs get the p.rng wrapper.
HAS_SAMPLING_HOOK = hasattr(scripts.Script, "process_before_every_sampling")
AXIS_PREFIX = "[OMS]"

MODULE_CACHE = oms_modules.ModuleCache()
ENCODER_CACHE: dict[tuple, text_encoders.PromptEmbeddingCache] = {}


def log(message: str) -> None:
    print(f"[{TITLE}] {message}")


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
    return oms_modules.find_modules([d for d in module_dirs() if d.is_dir()])


def module_choices() -> list[str]:
    return [AUTOMATIC] + [entry.name for entry in module_entries()]


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
    refiner = bool(getattr(p, "refiner_checkpoint", None)) and getattr(p, "refiner_switch_at", 1.0) < 1.0
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
    wrap = p.sampler.model_wrap
    for owner in (wrap, getattr(wrap, "inner_model", None), p.sd_model):
        if getattr(owner, "alphas_cumprod", None) is not None:
            return owner.alphas_cumprod.float().cpu()
    raise OMSError("cannot find alphas_cumprod for this sampler")


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
# Loading (cached; dropped when the checkpoint changes)

def device_and_dtype():
    from modules import devices

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


def load_encoder(kind: str, source: EncoderSource, sd_model, home, dtype) -> text_encoders.PromptEmbeddingCache:
    """The text encoder behind a prompt cache, loaded once per checkpoint and kept at ``home`` between steps."""
    layer = option("oms_text_encoder_layer", text_encoders.LAYERS[0])
    key = (kind, source, layer, dtype)
    if key not in ENCODER_CACHE:
        weights = checkpoint_text_weights(sd_model, kind) if source.origin == "checkpoint" else source.path
        if kind == OPENCLIP_H:
            encoder = text_encoders.load_openclip_text_encoder(weights, layer=layer, device="cpu", dtype=dtype)
        else:
            encoder = text_encoders.load_mixclip_text_encoder(weights, device="cpu", dtype=dtype)
        log(f"text encoder: {source.describe()} ({kind}, {layer if kind == OPENCLIP_H else 'penultimate'})")
        ENCODER_CACHE[key] = text_encoders.PromptEmbeddingCache(encoder)
    ENCODER_CACHE[key].encoder.to(home)
    return ENCODER_CACHE[key]


def clear_caches(*_args) -> None:
    MODULE_CACHE.clear()
    ENCODER_CACHE.clear()


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


def say_skipped(p, plan: Plan, reason: str) -> None:
    """A skip replaces the OMS keys of the infotext with its reason and is said once per generation in the console."""
    for key in infotext_keys():
        p.extra_generation_params.pop(key, None)
    p.extra_generation_params[INFOTEXT_SKIPPED] = reason
    if reason not in plan.said:
        plan.said.add(reason)
        log(f"skipped: {reason}")


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
    plan.low_vram = bool(getattr(sd_model, "lowvram", False))
    plan.offload = offload_after_use(option("oms_keep_in_vram", True), plan.low_vram, plan.device.type)
    home = torch.device("cpu") if plan.offload else plan.device  # where the module waits between steps
    # Modules whose names say this latent space are tried first, so "Automatic" loads nothing it does not use.
    entries = sorted(module_entries(), key=lambda e: oms_modules.latent_space_from_name(e.name) != latent_space)
    entry = choose_module(args.module, entries, latent_space, option(f"oms_module_{latent_space}", AUTOMATIC),
                          lambda e: MODULE_CACHE.get(e.path, home, dtype).latent_space, module_dirs())
    plan.module = MODULE_CACHE.get(entry.path, home, dtype)
    plan.module.cuda_graphs = not plan.offload  # a module moved in and out for every step would recapture each time
    oms_modules.check_latent_space(plan.module, latent_space)
    source = resolve_text_encoder(plan.module.text_encoder, family,
                                  setting_path=option("oms_text_encoder_path", ""),
                                  module_dirs=module_dirs(), hub_dir=huggingface_hub_dir())
    plan.encoder = load_encoder(plan.module.text_encoder, source, sd_model, home, dtype)
    plan.encoder.encoder.cuda_graphs = plan.module.cuda_graphs
    p.extra_generation_params.update(infotext_params(args, module_label(entry.name, plan.module.short_hash)))
    passes = "; ".join(untouched_passes(job))
    if passes:
        p.extra_generation_params[INFOTEXT_FIRST_PASS_ONLY] = passes
        log(f"the first pass starts from the OMS latent; the {passes} continue from it as usual")
    return plan


@contextlib.contextmanager
def on_device(plan: Plan):
    """The module and text encoder on the OMS device for the step; in low-VRAM mode the WebUI's model leaves first."""
    from modules import devices, lowvram

    if plan.low_vram:
        lowvram.send_everything_to_cpu()
    plan.module.to(plan.device)
    plan.encoder.encoder.to(plan.device)
    try:
        yield
    finally:
        if plan.offload:
            plan.module.to("cpu")
            plan.encoder.encoder.to("cpu")
            devices.torch_gc()


def fresh_noise(seeds, shape, device) -> torch.Tensor:
    """z of the SDE solver: one draw per image from seed + Z_SEED_OFFSET (the WebUI's RNG source setting applies;
    the WebUI's own noise stream is not touched, so a batch equals the same images made one by one)."""
    from modules import rng

    return torch.stack([rng.randn_local(int(seed) + Z_SEED_OFFSET, tuple(shape)).to(device) for seed in seeds])


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
    unit = noise.float()
    z = fresh_noise(p.seeds, unit.shape[1:], unit.device) if args.engine_solver == "sde" else None
    with on_device(plan):
        out = oms_start(plan.module, plan.encoder, unit, prompts, start=start, cfg=args.cfg,
                        negative_prompt=negative, solver=args.engine_solver, z=z)
    if plan.job.mode == "img2img":
        out = inpaint_noise(out, unit, p.init_latent.float(), p.nmask.float(), start.sigma0)
    return out.to(noise.dtype)


class FirstDraw:
    """Wraps ``p.rng`` (WebUI 1.6–1.9, and errors everywhere): the first ``next()`` goes through ``fn``."""

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


def raise_error(error: Exception, _x):
    raise error


def correct_first_draw(p, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    if interrupted():
        return x
    out = corrected_noise(p, plan, x)
    return x if out is None else out


# ---------------------------------------------------------------------------------------------------------------
# The script

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
        self.infotext_fields = [(components[arg.name], functools.partial(paste_value, arg)) for arg in ARGS]
        return [components[arg.name] for arg in ARGS]

    def process(self, p, *args):
        p._oms_plan = None
        overrides = getattr(p, "_oms_xyz", {})
        if not requested(args, overrides):
            return
        try:
            oms_args = from_dict(overrides, parse_script_args(args))
            if oms_args.enabled:
                p._oms_plan = prepare(p, oms_args)
        except Exception as error:  # raised from the first noise draw: the WebUI swallows errors of process()
            log(f"error: {error}")
            p._oms_plan = Plan(OMSArgs(), None, error=error)

    def process_batch(self, p, *args, **kwargs):
        plan = getattr(p, "_oms_plan", None)
        if plan is None:
            return
        if plan.error is not None:
            p.rng = FirstDraw(p.rng, functools.partial(raise_error, plan.error))
        elif plan.module is not None and not HAS_SAMPLING_HOOK:
            p.rng = FirstDraw(p.rng, functools.partial(correct_first_draw, p, plan))

    def process_before_every_sampling(self, p, *args, **kwargs):
        plan = getattr(p, "_oms_plan", None)
        if plan is None or plan.module is None or getattr(p, "is_hr_pass", False) or interrupted():
            return
        noise = kwargs.get("noise")
        if not isinstance(noise, torch.Tensor):
            return
        try:
            out = corrected_noise(p, plan, noise)
        except Exception as error:  # the WebUI only reports it: say in the infotext that OMS did not run
            say_skipped(p, plan, f"error: {error}")
            raise
        if out is not None:
            noise.copy_(out)  # in place: A1111 keeps using its own reference to this tensor


# ---------------------------------------------------------------------------------------------------------------
# Settings, X/Y/Z axes, cache invalidation

def on_ui_settings():
    section = ("oms", TITLE)

    def add(key, info):
        shared.opts.add_option(key, info)

    for space, what in (("sd", "SD1.x / SD2.x"), ("sdxl", "SDXL")):
        add(f"oms_module_{space}", shared.OptionInfo(
            AUTOMATIC, f"Module used for {what} checkpoints when the module is 'Automatic'", gr.Dropdown,
            lambda: {"choices": module_choices()}, refresh=lambda: None, section=section))
    add("oms_text_encoder_path", shared.OptionInfo(
        "", "OpenCLIP ViT-H/14 text encoder: file or folder (blank: automatic search)", section=section))
    add("oms_text_encoder_layer", shared.OptionInfo(
        text_encoders.LAYERS[0], "Text encoder layer", gr.Radio, {"choices": list(text_encoders.LAYERS)},
        section=section))
    add("oms_keep_in_vram", shared.OptionInfo(
        True, "Keep the module and text encoder in VRAM between generations (always offloaded with --lowvram/"
        "--medvram)", section=section))
    add("oms_precision", shared.OptionInfo(
        PRECISIONS[0], "Precision of the module and text encoder (Automatic: fp16 on GPU unless --no-half)",
        gr.Radio, {"choices": list(PRECISIONS)}, section=section))


def set_xyz_value(p, x, xs, *, name):
    p._oms_xyz = {**getattr(p, "_oms_xyz", {}), name: x}


def confirm_xyz_values(p, xs, *, arg):
    for x in xs:
        convert(arg, x)


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
    for arg in ARGS:
        if arg.axis is None:
            continue
        arg_choices = choices.get(arg.kind) or ((lambda arg=arg: list(arg.choices)) if arg.choices else None)
        xyz.axis_options.append(xyz.AxisOption(
            arg.axis, types[arg.kind], functools.partial(set_xyz_value, name=arg.name),
            confirm=functools.partial(confirm_xyz_values, arg=arg), choices=arg_choices,
            cost=0.5 if arg.kind == "module" else 0.0))


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(register_xyz_axes)
script_callbacks.on_model_loaded(clear_caches)
