"""One More Step for diffusers pipelines: the ``latents`` to pass to a Stable Diffusion 1.x / 2.x or SDXL pipeline
(text-to-image, or inpainting at strength 1) so that its scheduler starts from the OMS-corrected latent, with any
scheduler those pipelines use."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_oms.catalog import LATENT_SPACES
from lib_oms.options import AUTOMATIC, CFG, LAYERS, PRECISIONS, SOLVER_NAMES, check_cfg, solver_named
from lib_oms.runtime import Choice, Host, HostWords, OMSRuntime, Prepared, corrected_start
from lib_oms.sources import module_dtype
from lib_oms.step import SamplerStart
from oms_diffusers.reading import (
    SchedulerStart,
    batch_size,
    latent_shape,
    latent_space,
    model_text,
    noise_dtype,
    scheduler_start,
    z_generators,
)

log = logging.getLogger(__name__)
MODELS_DIR_VARIABLE = "OMS_MODELS_DIR"
WORDS = HostWords(
    text_encoder_setting="the text_encoder_path argument of oms_diffusers.OneMoreStep",
    other_places="the local Hugging Face cache {hub_dir}",
    refresh="call again",
)


def default_models_dir() -> Path:
    """Where modules are looked for and downloaded to: $OMS_MODELS_DIR, else ~/.cache/one-more-step."""
    return Path(os.environ.get(MODELS_DIR_VARIABLE) or Path.home() / ".cache" / "one-more-step").expanduser()


@dataclass(frozen=True)
class Start:
    """What to start a pipeline from. ``latents``: pass them as the pipeline's ``latents=``; ``skipped``: why the
    start is the pipeline's own draw (it then makes the image it makes without OMS); ``notes``: said once;
    ``module``: "name [hash]" of the module used."""

    latents: torch.Tensor
    skipped: str | None = None
    notes: tuple[str, ...] = ()
    module: str | None = None


def prepared_for(runtime: OMSRuntime, host: Host, choice: Choice, pipe) -> Prepared | str:
    """The module and text encoder for ``pipe`` (its own text encoders where the module reads them), or why OMS
    cannot serve the pipeline's latent space."""
    space = latent_space(pipe)
    if space not in LATENT_SPACES:
        return space
    return runtime.prepare(choice, space, host, model_text(pipe))


def corrected_latents(prepared: Prepared, unit: torch.Tensor, start: SchedulerStart | str, *, prompts: Sequence[str],
                      negative_prompt: str = "", cfg: float = CFG.default, solver: str = SOLVER_NAMES[0], draw_z=None,
                      mask: torch.Tensor | None = None, placed=contextlib.nullcontext) -> Start:
    """The latents that start a pipeline at the OMS latent, from ``unit`` (the noise it would draw) and its
    scheduler's ``start`` (or the host's reason why it does not start from pure noise). ``mask`` (latent size,
    1 = inpaint) keeps the noise outside the masked area as drawn. Every host on diffusers calls this."""
    if isinstance(start, str):
        return Start(unit, skipped=start)
    outcome = corrected_start(prepared, unit.float(), SamplerStart.timestep(start.alpha_bar0), prompts=prompts,
                              negative_prompt=negative_prompt, cfg=cfg, solver=solver, draw_z=draw_z, placed=placed)
    if outcome.noise is None:
        return Start(unit, skipped=outcome.skipped, notes=outcome.notes)
    latents = start.latents(outcome.noise.to(unit.device))
    if mask is not None:
        latents = unit + mask.to(unit.device, torch.float32) * (latents - unit)
    return Start(latents.to(unit.dtype), notes=outcome.notes, module=prepared.label)


def _as_prompts(prompt, batch: int, images_per_prompt: int, what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * batch
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"{what} must be a string or a list of strings, got {prompt!r}")
    if len(prompt) * images_per_prompt != batch:
        raise ValueError(f"got {len(prompt)} {what}s for {batch // images_per_prompt} prompts")
    return [p for p in prompt for _ in range(images_per_prompt)]


class OneMoreStep:
    """One More Step (Hu et al., CVPR 2024) for diffusers: ``start(pipe, prompt, ...)`` gives the ``latents`` to pass
    to the pipeline's own call, drawn from the same generators, so that its first step starts from the OMS latent.

    The module (Automatic: the one made for the pipeline's latent space) and the OpenCLIP ViT-H/14 text encoder it
    reads prompts with are looked for in ``models_dir`` (default $OMS_MODELS_DIR or ~/.cache/one-more-step), then the
    local Hugging Face cache, and downloaded there on first use unless ``download`` is False; an SD 2.x or SDXL
    pipeline's own text encoders are used where the module reads them. Loaded once and kept for later calls.
    """

    def __init__(self, *, module: str = AUTOMATIC, models_dir: str | os.PathLike | None = None,
                 text_encoder_path: str | os.PathLike = "", layer: str = LAYERS[0], precision: str = PRECISIONS[0],
                 download: bool = True):
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.module, self.layer, self.precision = module, layer, precision
        self.host = Host(WORDS, (Path(models_dir).expanduser() if models_dir else default_models_dir(),),
                         text_encoder_path=str(text_encoder_path),
                         download_refused=None if download else "downloading is off (download=False)",
                         progress=log.info)
        self.runtime = OMSRuntime()

    def start(self, pipe, prompt: str | list[str], *, generator=None, num_inference_steps: int = 50,
              timesteps: list[int] | None = None, sigmas: list[float] | None = None, height: int | None = None,
              width: int | None = None, num_images_per_prompt: int = 1, oms_prompt: str | list[str] | None = None,
              negative_prompt: str = "", cfg: float = CFG.default, solver: str = SOLVER_NAMES[0],
              mask_image=None, strength: float = 1.0) -> Start:
        """The start of ``pipe(prompt, generator=..., num_inference_steps=..., latents=start.latents, ...)``.

        Give the same ``prompt``, ``generator``, step count (or ``timesteps`` / ``sigmas``), size and
        ``num_images_per_prompt`` as to the pipeline: the noise is the pipeline's own draw from those generators (the
        DDIM solver keeps it), and the SDE solver's fresh noise z comes from each generator's seed. ``oms_prompt``:
        what OMS reads (default: each image's prompt); ``negative_prompt`` and ``cfg``: OMS's own guidance;
        ``mask_image``: an inpainting pipeline's mask, so that only the masked area starts at the OMS latent.
        """
        cfg, solver = check_cfg(cfg), solver_named(solver).name
        batch = batch_size(prompt, num_images_per_prompt)
        prompts = _as_prompts(prompt if oms_prompt is None else oms_prompt, batch, num_images_per_prompt,
                              "prompt" if oms_prompt is None else "oms_prompt")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        from diffusers.utils.torch_utils import randn_tensor

        device = pipe._execution_device
        shape = latent_shape(pipe, batch, height, width)
        unit = randn_tensor(shape, generator=generator, device=device, dtype=noise_dtype(pipe))
        start = "denoising strength below 1 keeps part of the image" if strength < 1.0 else \
            scheduler_start(pipe.scheduler, None if (timesteps or sigmas) else num_inference_steps,
                            timesteps=timesteps, sigmas=sigmas)
        mask = None if mask_image is None else latent_mask(pipe, mask_image, shape, height, width)
        choice = Choice(self.module, layer=self.layer, device=device,
                        dtype=module_dtype(self.precision, device.type, pipe.unet.dtype == torch.float32),
                        cuda_graphs=device.type == "cuda")
        prepared = prepared_for(self.runtime, self.host, choice, pipe)
        if isinstance(prepared, str):
            result = Start(unit, skipped=prepared)
        else:
            result = corrected_latents(
                prepared, unit, start, prompts=prompts, negative_prompt=negative_prompt, cfg=cfg, solver=solver,
                draw_z=lambda: randn_tensor(shape, generator=z_generators(generator), device=device,
                                            dtype=torch.float32), mask=mask)
        if result.skipped:
            log.warning("One More Step skipped: %s", result.skipped)
        for note in result.notes:
            log.warning("One More Step: %s", note)
        return result


def latent_mask(pipe, mask_image, shape, height, width) -> torch.Tensor:
    """An inpainting pipeline's mask at latent size, made as the pipeline makes it (its own mask processor, then
    nearest-neighbour resizing)."""
    processor = getattr(pipe, "mask_processor", None)
    if processor is None:
        raise ValueError(f"{type(pipe).__name__} takes no mask: mask_image is for inpainting pipelines")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    mask = processor.preprocess(mask_image, height=height or size, width=width or size)
    return torch.nn.functional.interpolate(mask, size=shape[-2:]).expand(shape[0], 1, *shape[-2:])
