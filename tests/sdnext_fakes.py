"""A stand-in for SD.Next's ``modules``, injected into ``sys.modules``, driving a real (tiny) diffusers pipeline.

Enough of SD.Next for ``scripts/one_more_step.py`` to be imported and driven as SD.Next drives it. Checked against
vladmandic/sdnext master 058a7f0cf (2026-07-23); covered by the runs of tests/webui against a real SD.Next
(tests/webui/harness/run.py recognises it):

- no ``modules.rng`` (no ImageRNG, no ``p.rng``) and no ``process_before_every_sampling``; ``modules.processing_args``
  exists (it passes ``p.init_latent`` to a text-to-image pipeline as ``latents=``);
- ``process_images_inner`` (modules/processing.py): ``process`` once, then per batch: ``process_batch`` of every
  AlwaysVisible script in the order of their titles (SD.Next's "Init Latents" before "One More Step"), then
  ``process_images`` (a returned Processed replaces the batch), else the pipeline, called with
  ``generator=get_generator(p)`` and ``latents=p.init_latent`` when set; errors of script hooks are shown and the
  generation goes on (scripts_manager.ScriptRunner);
- modules/processing_helpers.py: ``update_sampler`` replaces the pipeline's scheduler by a new one made from the
  model's scheduler config and SD.Next's defaults for the sampler (sd_samplers_diffusers.py's config: Euler and
  DPM++ 2M use "linspace" spacing and steps offset 0, DDIM "leading"); ``calculate_base_steps`` is ``p.steps`` for a
  text-to-image pass without refiner; ``get_generator`` one CPU generator per seed (diffusers_generator_device "CPU");
  ``create_random_tensors`` reseeds torch's global generator and draws per seed, slerped toward the subseed's draw;
- scripts/init_latents.py: sets ``p.init_latent`` in ``process_batch`` only when ``p.subseed_strength != 0``.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import torch

from tests import webui_fakes

# sd_samplers_diffusers.py's own defaults of the samplers used here, over the model's scheduler config.
SAMPLERS = {
    "Euler": ("EulerDiscreteScheduler", {"steps_offset": 0, "timestep_spacing": "linspace"}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {"steps_offset": 0, "timestep_spacing": "linspace"}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"timestep_spacing": "linspace", "solver_order": 2,
                                                 "algorithm_type": "dpmsolver++"}),
    "DDIM": ("DDIMScheduler", {"steps_offset": 0, "timestep_spacing": "leading", "set_alpha_to_one": True}),
}


def create_random_tensors(shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0,
                          seed_resize_from_w=0, p=None):
    """processing_helpers.create_random_tensors on the CPU: per seed torch.manual_seed(seed) and torch.randn, slerped
    toward the subseed's draw by the strength."""
    images = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(int(seed))
        noise = torch.randn(tuple(shape))
        if subseeds is not None and subseed_strength != 0:
            torch.manual_seed(int(subseeds[i]))
            noise = webui_fakes.slerp(subseed_strength, noise, torch.randn(tuple(shape)))
        images.append(noise)
    return torch.stack(images)


@dataclass
class Processing:
    """The fields of SD.Next's StableDiffusionProcessingTxt2Img the extension reads (its processing_class.py)."""

    sd_model: object = None
    prompt: str = "a dark alley"
    prompts: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    subseeds: list = field(default_factory=list)
    subseed_strength: float = 0.0
    steps: int = 3
    width: int = 16
    height: int = 16
    sampler_name: str = "Euler"
    enable_hr: bool = False
    is_hr_pass: bool = False
    init_latent: torch.Tensor | None = None
    generator: object = None
    extra_generation_params: dict = field(default_factory=dict)


@dataclass
class Img2ImgProcessing(Processing):
    """SD.Next's StableDiffusionProcessingImg2Img (its control tab's processing is a subclass of it)."""

    init_images: list = field(default_factory=list)
    denoising_strength: float = 0.75


class InitLatents:
    """scripts/init_latents.py: a variation seed's start, drawn with create_random_tensors."""

    def title(self):
        return "Init Latents"

    def process_batch(self, p, *args, **kwargs):
        if p.subseed_strength == 0:
            return
        pipe = p.sd_model
        shape = [pipe.unet.config.in_channels, p.height // pipe.vae_scale_factor, p.width // pipe.vae_scale_factor]
        p.init_latent = create_random_tensors(shape, seeds=p.seeds, subseeds=p.subseeds,
                                              subseed_strength=p.subseed_strength, p=p).to(
            device=pipe._execution_device, dtype=pipe.unet.dtype)


def make_modules(models_path, opts: dict | None = None):
    """SD.Next's ``modules`` as far as the extension reads them: the A1111 family's common ones (as webui_fakes
    makes them) less modules.rng and the A1111 samplers, plus processing_args, processing_helpers, Processed."""
    package, subs = webui_fakes.make_modules(models_path, with_hook=False, opts=opts)
    for name in ("rng", "sd_samplers_kdiffusion", "sd_samplers_timesteps", "sd_samplers_common", "lowvram"):
        subs.pop(name, None)
        if hasattr(package, name):
            delattr(package, name)
    subs["processing_args"] = types.ModuleType("modules.processing_args")
    helpers = subs["processing_helpers"] = types.ModuleType("modules.processing_helpers")
    # The task of the pipeline as the last generation left it: SD.Next sets it when the pipeline runs, after the
    # scripts' process().
    helpers.is_txt2img = lambda: helpers.task == "txt2img"
    helpers.task = "txt2img"
    helpers.is_refiner_enabled = lambda p: False
    helpers.calculate_base_steps = lambda p, use_denoise_start, use_refiner_start: p.steps
    helpers.get_generator = lambda p: p.generator if p.generator is not None else [
        torch.Generator("cpu").manual_seed(int(seed)) for seed in p.seeds]
    helpers.create_random_tensors = create_random_tensors

    def update_sampler(p, sd_model, second_pass=False):
        import diffusers

        class_name, defaults = SAMPLERS[p.sampler_name]
        base = getattr(sd_model, "default_scheduler", None) or sd_model.scheduler
        sd_model.default_scheduler = base
        sd_model.scheduler = getattr(diffusers, class_name).from_config({**base.config, **defaults})

    helpers.update_sampler = update_sampler
    subs["processing"].Processed = Processed
    subs["processing"].StableDiffusionProcessingTxt2Img = Processing
    subs["processing"].StableDiffusionProcessingImg2Img = Img2ImgProcessing
    for name, module in subs.items():
        setattr(package, name, module)
    return package, subs


class Processed:
    """modules.processing.Processed, as far as a script returns one: its images and info."""

    def __init__(self, p, images_list, info=None, comments="", **kwargs):
        self.images, self.info, self.comments = images_list, info, comments


@dataclass
class SDNext:
    modules: dict
    script_module: types.ModuleType
    errors: list = field(default_factory=list)  # what ScriptRunner showed (and went on)

    @property
    def opts(self):
        return self.modules["shared"].opts

    def run(self, p, args) -> tuple[list, list]:
        """process_images_inner for one batch: returns (the pipeline's output latents, or None when a script's
        Processed replaced them; the UNet's first input)."""
        from tests.diffusers_pipelines import FirstInput

        script = self.script_module.OneMoreStepScript()
        scripts = sorted([InitLatents(), script], key=lambda s: s.title().lower())
        self._call(script.process, p, *args)
        for each in scripts:
            self._call(each.process_batch, p, *args)
        replaced = self._call(script.process_images, p, *args)
        if replaced is not None:
            return None, replaced
        pipe = p.sd_model
        self.modules["processing_helpers"].update_sampler(p, pipe)
        first = FirstInput(pipe.unet)
        try:
            out = pipe(p.prompts, generator=self.modules["processing_helpers"].get_generator(p),
                       num_inference_steps=p.steps, height=p.height, width=p.width, guidance_scale=1.0,
                       output_type="latent", latents=p.init_latent).images
        finally:
            first.handle.remove()
        return out, first.sample

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as error:  # ScriptRunner: errors.display(...), generation goes on
            self.errors.append(error)
            return None


def install(monkeypatch, models_path, opts: dict | None = None) -> SDNext:
    """Inject SD.Next's fakes (and gradio, fastapi) and import the script file fresh, as SD.Next loads it."""
    import importlib.util

    from oms_webui import memory

    package, subs = make_modules(models_path, opts)
    monkeypatch.setitem(sys.modules, "gradio", webui_fakes.make_gradio())
    for name, module in webui_fakes.make_fastapi().items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "modules", package)
    for name, module in subs.items():
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
    memory.memory_manager.cache_clear()
    path = webui_fakes.ROOT / "scripts" / "one_more_step.py"
    spec = importlib.util.spec_from_file_location("one_more_step.py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return SDNext(subs, module)
