"""One More Step (Hu et al., CVPR 2024) in the AUTOMATIC1111 WebUI 1.6–1.10, Forge, reForge, Forge Classic and
Forge Neo: the script, and the reading of the WebUI's processing object ``p`` into plain values.

The OMS runtime (``lib_oms.runtime``) finds, loads and keeps the module and text encoder and corrects the start;
``oms_webui`` holds the WebUI's arguments, settings, folders, memory placement, API check and X/Y/Z axes. The step is
done in a ``p.rng`` wrapper installed by ``process_batch``, whose first draw (the start noise) is corrected, on every
WebUI: an error raised there stops the generation, whereas A1111 ≥ 1.10, Forge and reForge only report errors of
``process_before_every_sampling`` and would go on to make an image without OMS.

Every ``modules.*`` imported here exists in all of these WebUIs; the extension's own modules are all imported when
the WebUI loads this file (only then is the extension's folder on ``sys.path``).
"""

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from modules import script_callbacks, scripts, shared

from lib_oms import module_files
from lib_oms.catalog import OPENCLIP_H, SDXL_MIXCLIP
from lib_oms.engine import z_seed
from lib_oms.errors import OMSError
from lib_oms.runtime import Choice, Inpainting, ModelText, OMSRuntime, Prepared, corrected_start
from lib_oms.sources import module_dtype
from oms_webui import api, xyz
from oms_webui.args import (
    ARG_BY_NAME,
    ARGS,
    INFOTEXT_FIRST_PASS_ONLY,
    INFOTEXT_MODULE_REQUESTED,
    INFOTEXT_SKIPPED,
    TITLE,
    ArgumentError,
    OMSArgs,
    convert,
    from_dict,
    hints_markup,
    infotext_keys,
    infotext_params,
    module_hash,
    module_name,
    parse_script_args,
    paste_value,
)
from oms_webui.environment import host, interrupted, log, module_choices
from oms_webui.logic import (
    K_DIFFUSION,
    LATENT_SPACE_OF_FAMILY,
    TIMESTEP,
    Job,
    img2img_start,
    job_skip_reason,
    model_skip_reason,
    txt2img_start,
    untouched_passes,
    unwrap_hijacked_keys,
    uses_refiner,
)
from oms_webui.memory import Placement, on_device
from oms_webui.settings import module_setting_key, on_ui_settings, setting, webui_option

# Kept across model loads: modules and file-based text encoders do not depend on the checkpoint (the SDXL refiner
# reloads two models every generation), and an encoder read from a checkpoint is kept under it.
RUNTIME = OMSRuntime()


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

    noise_schedule = webui_option("sd_noise_schedule", "Default")
    refiner = uses_refiner(getattr(p, "refiner_checkpoint", None), getattr(p, "refiner_switch_at", None))
    if isinstance(p, processing.StableDiffusionProcessingTxt2Img):
        return Job("txt2img", hires=bool(getattr(p, "enable_hr", False)), refiner=refiner,
                   firstpass_image=getattr(p, "firstpass_image", None) is not None, noise_schedule=noise_schedule)
    return Job("img2img", refiner=refiner, inpainting=getattr(p, "image_mask", None) is not None,
               inpainting_fill=int(getattr(p, "inpainting_fill", 1)),
               denoising_strength=float(getattr(p, "denoising_strength", 0.75) or 0.0),
               initial_noise_multiplier=float(getattr(p, "initial_noise_multiplier", 1.0)),
               extra_noise=float(webui_option("img2img_extra_noise", 0.0)), noise_schedule=noise_schedule)


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
                             sgm_noise_multiplier=bool(webui_option("sgm_noise_multiplier", False)))
    return img2img_start(kind, steps=steps, t_enc=t_enc, sigmas=sigmas, timesteps=timesteps, alphas_cumprod=alphas)



def device_and_dtype():
    from modules import devices

    # --use-cpu oms / all, as A1111's devices.get_device_for reads it (Forge's and reForge's ignore it)
    use_cpu = getattr(shared.cmd_opts, "use_cpu", None) or []
    if "oms" in use_cpu or "all" in use_cpu:
        device = torch.device("cpu")
    else:
        device = devices.get_device_for("oms") if hasattr(devices, "get_device_for") else devices.device
    full_precision = getattr(devices, "dtype_unet", torch.float16) == torch.float32
    dtype = module_dtype(setting("oms_precision"), torch.device(device).type, full_precision)
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


# The text encoder a checkpoint family holds, as the OMS modules read it: SD 2.x's OpenCLIP ViT-H/14, SDXL's CLIP-L
# + bigG.
TEXT_ENCODER_OF_FAMILY = {"sd2": OPENCLIP_H, "sdxl": SDXL_MIXCLIP}


def model_text(sd_model, family: str) -> ModelText | None:
    kind = TEXT_ENCODER_OF_FAMILY.get(family)
    if kind is None:
        return None
    return ModelText(frozenset([kind]), checkpoint_identity(sd_model),
                     functools.partial(checkpoint_text_weights, sd_model, kind))


# ---------------------------------------------------------------------------------------------------------------
# The plan of one generation: decided in process(), carried out at the first noise draw

@dataclass
class Plan:
    args: OMSArgs
    job: Job | None
    prepared: Prepared | None = None
    placement: Placement | None = None
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
    device, dtype = device_and_dtype()
    plan.placement = Placement.of(device, sd_model, setting("oms_keep_in_vram"))
    choice = Choice(module_name(args.module), setting(module_setting_key(latent_space)),
                    setting("oms_text_encoder_layer"), plan.placement.home, dtype,
                    cuda_graphs=not plan.placement.offload)  # weights moved for every step would recapture each time
    plan.prepared = RUNTIME.prepare(choice, latent_space, host(), model_text(sd_model, family))
    for loaded in plan.prepared.loaded:
        log(f"{loaded} loaded")
    p.extra_generation_params.update(infotext_params(args, plan.prepared.label))
    requested_hash = module_hash(args.module)
    if requested_hash and requested_hash != plan.prepared.module.short_hash.lower():
        p.extra_generation_params[INFOTEXT_MODULE_REQUESTED] = args.module
        module = plan.prepared.module
        say_once(plan, f"the module file {module.weights_path} has hash {module.short_hash}, not {requested_hash} as "
                       f"asked ({args.module}): it is another file of that name, so the image will differ from the one "
                       "these parameters came from")
    passes = "; ".join(untouched_passes(job))
    if passes:
        p.extra_generation_params[INFOTEXT_FIRST_PASS_ONLY] = passes
        log(f"the first pass starts from the OMS latent; the {passes} continue from it as usual")
    return plan


# ---------------------------------------------------------------------------------------------------------------
# The step, at the first noise draw of each batch

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
    seeds taken through ``z_seed``: the RNG source, variation seed / strength and "resize seed from" apply, z is never
    the WebUI's own draw, and each image's z depends on its own seeds (a batch equals the images made one by one)."""
    from modules import rng

    seeds = [z_seed(seed) for seed in p.seeds]
    subseeds = None if p.subseeds is None else [z_seed(seed) for seed in p.subseeds]
    with global_generators_kept():
        draw = rng.ImageRNG(tuple(shape), seeds, subseeds=subseeds, subseed_strength=p.subseed_strength,
                            seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w).next()
    return draw.to(device)


def corrected_noise(p, plan: Plan, noise: torch.Tensor) -> torch.Tensor | None:
    """The noise to sample from instead of ``noise`` (the unit draw of this batch), or None to leave it."""
    start = sampler_start(p, plan.job)
    inpainting = None
    if plan.job.mode == "img2img" and not isinstance(start, str):
        inpainting = Inpainting(p.init_latent, p.nmask, start.sigma0)
    args = plan.args
    outcome = corrected_start(
        plan.prepared, noise, start, prompts=oms_prompts(args.prompt, list(p.prompts), p.steps),
        negative_prompt=clean_prompt(args.negative_prompt, p.steps), cfg=args.cfg, solver=args.solver,
        draw_z=lambda: fresh_noise(p, noise.shape[1:], noise.device), inpainting=inpainting,
        placed=lambda: on_device(plan.prepared, plan.placement))
    if outcome.skipped:
        say_skipped(p, plan, outcome.skipped)
    for note in outcome.notes:
        say_once(plan, note)
    return outcome.noise


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
    refused = api.refusal(error)
    if refused is error:
        raise error
    raise refused from error


def correct_first_draw(p, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    if interrupted():
        return x
    try:
        out = corrected_noise(p, plan, x)
    except OMSError as error:
        raise api.refusal(error) from error
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
            gr.HTML(hints_markup(), elem_classes=["oms-hints"])  # read by javascript/oms_hints.js, never shown
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
        overrides = xyz.overrides(p)
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
        elif plan.prepared is not None:
            p.rng = FirstDraw(p.rng, functools.partial(correct_first_draw, p, plan))


script_callbacks.on_ui_settings(functools.partial(on_ui_settings, module_choices))
script_callbacks.on_before_ui(xyz.register_axes)
script_callbacks.on_app_started(api.on_app_started)
