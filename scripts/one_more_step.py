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
import html
from pathlib import Path

import gradio as gr
import torch
from modules import script_callbacks, scripts, shared

from lib_oms import module_files
from lib_oms.catalog import OPENCLIP_H, SDXL_MIXCLIP
from lib_oms.engine import z_seed
from lib_oms.errors import OMSError
from lib_oms.runtime import Choice, Inpainting, ModelText, OMSRuntime, corrected_start
from lib_oms.sources import module_dtype
from oms_webui import api, sdnext, xyz
from oms_webui.args import (
    ARG_BY_NAME,
    ARGS,
    TITLE,
    OMSArgs,
    from_dict,
    hints_markup,
    infotext_keys,
    module_name,
    parse_script_args,
    paste_value,
    requested,
)
from oms_webui.environment import (
    INIT_LATENT_HOOK,
    RNG_HOOK,
    cannot_run,
    host,
    interrupted,
    log,
    module_choices,
    start_hook,
)
from oms_webui.generation import (
    Plan,
    clean_prompt,
    oms_prompts,
    record_applied,
    say_once,
    say_skipped,
    without_frames,
)
from oms_webui.logic import (
    IMG2IMG_RULE,
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
from oms_webui.settings import automatic_modules, on_ui_settings, setting, webui_option

# Kept across model loads: modules and file-based text encoders do not depend on the checkpoint (the SDXL refiner
# reloads two models every generation), and an encoder read from a checkpoint is kept under it.
RUNTIME = OMSRuntime()
HOOK = start_hook()  # how this WebUI lets the script set where sampling starts


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

    schedule = {"noise_schedule": webui_option("sd_noise_schedule", "Default"),
                # Forge Neo's model config says so when the checkpoint holds a "ztsnr" key
                "checkpoint_zero_terminal_snr": bool(getattr(getattr(p.sd_model, "model_config", None), "ztsnr",
                                                             False))}
    refiner = uses_refiner(getattr(p, "refiner_checkpoint", None), getattr(p, "refiner_switch_at", None))
    if isinstance(p, processing.StableDiffusionProcessingTxt2Img):
        return Job("txt2img", hires=bool(getattr(p, "enable_hr", False)), refiner=refiner,
                   firstpass_image=getattr(p, "firstpass_image", None) is not None, **schedule)
    return Job("img2img", refiner=refiner, inpainting=getattr(p, "image_mask", None) is not None,
               inpainting_fill=int(getattr(p, "inpainting_fill", 1)),
               denoising_strength=float(getattr(p, "denoising_strength", 0.75) or 0.0),
               initial_noise_multiplier=float(getattr(p, "initial_noise_multiplier", 1.0)),
               extra_noise=float(webui_option("img2img_extra_noise", 0.0)), **schedule)


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
    choice = Choice(module_name(args.module), automatic_modules(), setting("oms_text_encoder_layer"),
                    plan.placement.home, dtype,
                    cuda_graphs=not plan.placement.offload)  # weights moved for every step would recapture each time
    plan.prepared = RUNTIME.prepare(choice, latent_space, host(), model_text(sd_model, family))
    record_applied(p, plan, untouched_passes(job))
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

# Where img2img starts from pure noise, which is where OMS applies there, as each hook allows.
IMG2IMG_NOTES = {
    RNG_HOOK: f"{IMG2IMG_RULE}; other img2img is made without it, and its parameters say why.",
    INIT_LATENT_HOOK: "In SD.Next, OMS applies to text-to-image only: img2img, inpainting and control start from "
                      "their image.",
}


def ui_notes(is_img2img: bool) -> list[str]:
    """What the accordion says where a user sees it: that this WebUI cannot run OMS now, or where OMS applies in
    img2img."""
    reason = cannot_run(HOOK)
    if reason:
        return [reason]
    return [IMG2IMG_NOTES[HOOK]] if is_img2img else []


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
            for note in ui_notes(is_img2img):
                gr.HTML(f"<p>{html.escape(note, quote=False)}</p>", elem_classes=["oms-note"])
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
                reason = cannot_run(HOOK)
                if reason:
                    raise OMSError(reason)
                p._oms_plan = prepare(p, oms_args) if HOOK == RNG_HOOK else sdnext.prepare(p, oms_args, RUNTIME)
        except Exception as error:  # raised where the generation stops: the WebUIs swallow errors of process()
            log(f"error: {error}")
            p._oms_plan = Plan(OMSArgs(), error=without_frames(error))

    def process_batch(self, p, *args, **kwargs):
        plan = getattr(p, "_oms_plan", None)
        if plan is None:
            return
        if HOOK == INIT_LATENT_HOOK:
            if plan.error is None and plan.prepared is not None:
                try:
                    sdnext.start_batch(p, plan)
                except Exception as error:  # SD.Next shows a script's errors and goes on: process_images stops it
                    log(f"error: {error}")
                    plan.error = without_frames(error)
        elif plan.error is not None:
            p.rng = FirstDraw(p.rng, functools.partial(raise_error, plan.error))
        elif plan.prepared is not None:
            p.rng = FirstDraw(p.rng, functools.partial(correct_first_draw, p, plan))

    def process_images(self, p, *args, **kwargs):
        """SD.Next: what this returns replaces the generation; after an OMS error, no image is made."""
        plan = getattr(p, "_oms_plan", None)
        if plan is not None and plan.error is not None:
            return sdnext.no_image(p, plan.error)
        return None


if cannot_run(HOOK):
    log(f"error: {cannot_run(HOOK)}")
script_callbacks.on_ui_settings(functools.partial(on_ui_settings, module_choices))
script_callbacks.on_before_ui(xyz.register_axes)
script_callbacks.on_app_started(api.app_started(functools.partial(cannot_run, HOOK)))
