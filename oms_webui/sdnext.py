"""One More Step in SD.Next, whose generations run diffusers pipelines: a text-to-image generation's start latent is
handed to SD.Next as ``p.init_latent``, which it passes to the pipeline as ``latents=`` (oms_diffusers gives them).
Hires and refiner passes are image-to-image pipelines there and continue from the first pass as they are.

Every SD.Next helper used is its own: its sampler set-up (``update_sampler``, ``calculate_base_steps``), its
generators (``get_generator``) and its variation-seed noise (``create_random_tensors``). Imports SD.Next's
``modules`` when a function runs.
"""

from __future__ import annotations

import re

import torch

from lib_oms.engine import z_seed
from lib_oms.runtime import Choice
from lib_oms.sources import module_dtype
from oms_diffusers.one_more_step import corrected_latents, prepared_for
from oms_diffusers.reading import noise_dtype, scheduler_start
from oms_webui.args import OMSArgs, module_name
from oms_webui.environment import host
from oms_webui.generation import Plan, clean_prompt, oms_prompts, record_applied, say_once, say_skipped
from oms_webui.settings import automatic_modules, setting


def custom_timesteps(p) -> bool:
    """Whether SD.Next will give the pipeline its own timesteps (Settings > Sampler: timesteps), as it decides."""
    from modules import shared

    listed = getattr(p, "schedulers_timesteps", None) or shared.opts.data.get("schedulers_timesteps", "") or ""
    return len(re.split(",| ", listed)) > 2


def job_skip_reason(p) -> str | None:
    from modules import processing

    # By the class of p: SD.Next's processing_helpers.is_txt2img() reads the task of the pipeline, which SD.Next sets
    # only when the pipeline runs, after the scripts' process(): there it still says what the last generation was.
    if isinstance(p, processing.StableDiffusionProcessingImg2Img):  # control's processing is one too
        return ("SD.Next hands a start latent only to text-to-image pipelines: img2img, inpainting and control start "
                "from their image")
    if custom_timesteps(p):
        return "custom sampler timesteps are set (Settings > Sampler): OMS reads where sampling starts from the steps"
    return None


def untouched_passes(p) -> list[str]:
    from modules import processing_helpers

    notes = ["hires fix second pass"] if getattr(p, "enable_hr", False) else []
    return notes + (["refiner"] if processing_helpers.is_refiner_enabled(p) else [])


def prepare(p, args: OMSArgs, runtime) -> Plan:
    """Everything that can fail for configuration reasons, done in ``process``; writes the infotext."""
    plan = Plan(args)
    pipe = p.sd_model
    reason = job_skip_reason(p)
    if reason:
        say_skipped(p, plan, reason)
        return plan
    device = pipe._execution_device
    dtype = module_dtype(setting("oms_precision"), device.type, pipe.unet.dtype == torch.float32)
    choice = Choice(module_name(args.module), automatic_modules(), setting("oms_text_encoder_layer"), device, dtype,
                    cuda_graphs=device.type == "cuda")
    prepared = prepared_for(runtime, host(), choice, pipe)
    if isinstance(prepared, str):
        say_skipped(p, plan, prepared)
        return plan
    plan.prepared = prepared
    record_applied(p, plan, untouched_passes(p))
    return plan


def scheduler_of(p):
    """Where this generation's scheduler starts: SD.Next's own sampler set-up for it (which it repeats, alike, just
    before the pipeline runs), read for the steps its first pass takes."""
    from modules import processing_helpers

    processing_helpers.update_sampler(p, p.sd_model)
    refiner = processing_helpers.is_refiner_enabled(p) and not getattr(p, "is_hr_pass", False)
    steps = processing_helpers.calculate_base_steps(p, use_denoise_start=False, use_refiner_start=refiner)
    return scheduler_start(p.sd_model.scheduler, steps)


def noise_of(p, plan: Plan, shape) -> torch.Tensor:
    """The noise this batch starts from: what SD.Next's Init Latents script set for a variation seed in this batch,
    else what the pipeline would draw itself (its generators, device and dtype)."""
    from diffusers.utils.torch_utils import randn_tensor
    from modules import processing_helpers

    given = getattr(p, "init_latent", None)
    if given is not None and given is not plan.started:
        return given
    pipe = p.sd_model
    return randn_tensor(shape, generator=processing_helpers.get_generator(p), device=pipe._execution_device,
                        dtype=noise_dtype(pipe))


def fresh_noise(p, shape) -> torch.Tensor:
    """z of the SDE solver, drawn by SD.Next's own variation-seed noise with seeds and variation seeds taken through
    ``z_seed``; it reseeds torch's global generator, which is put back as it was."""
    from modules import processing_helpers

    seeds = [z_seed(seed) for seed in p.seeds]
    subseeds = [z_seed(seed) for seed in p.subseeds] if getattr(p, "subseeds", None) else None
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
        return processing_helpers.create_random_tensors(shape[1:], seeds=seeds, subseeds=subseeds,
                                                        subseed_strength=getattr(p, "subseed_strength", 0.0), p=p)


def start_batch(p, plan: Plan) -> None:
    """Sets ``p.init_latent`` to this batch's OMS start (or leaves the start to SD.Next, saying why)."""
    pipe = p.sd_model
    factor = pipe.vae_scale_factor
    shape = (len(p.seeds), pipe.vae.config.get("latent_channels", 4), p.height // factor, p.width // factor)
    unit = noise_of(p, plan, shape)
    args = plan.args
    result = corrected_latents(
        plan.prepared, unit, scheduler_of(p), prompts=oms_prompts(args.prompt, list(p.prompts), p.steps),
        negative_prompt=clean_prompt(args.negative_prompt, p.steps), cfg=args.cfg, solver=args.solver,
        draw_z=lambda: fresh_noise(p, shape).to(unit.device, torch.float32))
    for note in result.notes:
        say_once(plan, note)
    if result.skipped:
        say_skipped(p, plan, result.skipped)
        if getattr(p, "init_latent", None) is plan.started:
            p.init_latent = None  # this batch starts from the pipeline's own draw, not the last batch's start
        return
    p.init_latent = plan.started = result.latents


def no_image(p, error: Exception):
    """What SD.Next makes instead of an image when OMS was asked for and failed: nothing, with the error said (SD.Next
    shows a script's errors and goes on, so the generation itself is replaced)."""
    from modules import processing

    return processing.Processed(p, [], info=f"One More Step: {error}", comments=str(error))
