"""Decisions the ComfyUI nodes make, on plain values: which models OMS fits, where a sampling starts from pure
noise, and how ComfyUI's samplers scale the noise they are given (as ComfyUI 0.26 to 0.33 do).

No ComfyUI imports: ``oms_comfyui.nodes`` reads ComfyUI's objects into the plain values these functions take.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# ComfyUI's latent formats (``comfy.latent_formats``) by class name, and the OMS latent space each one is.
# SDXL_Playground_2_5 and every other format have their own latent statistics: no released module fits them.
LATENT_SPACE_OF_FORMAT = {"SD15": "sd", "SDXL": "sdxl"}
# The discrete-time VP schedule of SD1.x/2.x/SDXL (``comfy.model_sampling``): ᾱ = 1/(1 + σ²) holds for it.
DISCRETE_SCHEDULE = "ModelSamplingDiscrete"
# Prediction types whose start is ComfyUI's EPS noise scaling (V_PREDICTION and the LCM type derive from EPS).
EPS_SCALING = "EPS"
# Schedules and predictions derived from the two above that are not SD's: EDM (Playground 2.5, "edm" options),
# Stable Cascade's schedule, x0 / image-to-image predictions, flow matching.
NOT_SD_SAMPLING = {"ModelSamplingDiscreteEDM", "StableCascadeSampling", "EDM", "X0", "IMG_TO_IMG", "CONST",
                   "IMG_TO_IMG_FLOW"}
# The class ComfyUI's ModelSampling* nodes compose from a schedule and a prediction type: it names neither.
COMPOSED_SAMPLING = "ModelSamplingAdvanced"
APPLIES = ("OMS applies where sampling starts from pure noise: an empty latent, or the masked area of an inpainting "
           "at denoise 1")


def model_skip_reason(latent_format: str, model_class: str, sampling: Iterable[str]) -> str | None:
    """Why OMS cannot run on this model, or None. ``latent_format`` and ``model_class`` are the class names of
    the model's latent format and of ``model.model``; ``sampling`` the class names its model_sampling is made of."""
    if model_class == "SDXLRefiner":
        return "the model is the SDXL refiner: it refines images and does not start from noise"
    if latent_format not in LATENT_SPACE_OF_FORMAT:
        return (f"the model's latent space is {latent_format}: OMS modules exist for SD1.x/SD2.x (SD15) and SDXL "
                "(train one for this latent space with the trainer)")
    sampling = list(sampling)
    if DISCRETE_SCHEDULE not in sampling or EPS_SCALING not in sampling or NOT_SD_SAMPLING.intersection(sampling):
        named = " + ".join(name for name in sampling if name != COMPOSED_SAMPLING)
        return (f"the model samples with {named}: OMS needs SD's discrete-time schedule with eps or v prediction "
                "(not EDM, flow matching or x0 prediction)")
    return None


def start_skip_reason(*, noise_is_zero: bool, latent_is_empty: bool, masked: bool, max_denoise: bool) -> str | None:
    """Why this sampling does not start from pure noise, or None when it does.

    The sampler starts from ``latent + c·noise``: with no noise (add noise off) it continues from the latent; an
    empty latent (txt2img) starts from noise alone at any σ₀; in an inpainting the masked area holds the image's
    latent, which only full denoise (σ₀ = σ_max) drowns in noise.
    """
    if noise_is_zero:
        return "the sampler gets no noise (add noise is off): it continues from the latent as it is"
    if masked:
        if not max_denoise:
            return f"inpainting below full denoise keeps part of the image under the mask; {APPLIES}"
        return None
    if not latent_is_empty:
        return (f"the latent is not empty (img2img, a hires-fix second pass or a refiner stage): sampling continues "
                f"from it; {APPLIES}")
    return None


def noise_scale(sigma0: float, max_denoise: bool) -> float:
    """c in ComfyUI's start x = latent + c·noise (``noise_scaling`` of EPS and V_PREDICTION): √(1 + σ₀²) when the
    sampler starts at σ_max (``max_denoise``), else σ₀ — the k-diffusion start with and without the SGM noise
    multiplier."""
    return math.sqrt(1.0 + sigma0**2) if max_denoise else float(sigma0)


def starts_at_max_denoise(sigma0: float, sigma_max: float) -> bool:
    """ComfyUI's ``max_denoise`` rule, for a NOISE that does not see the sampler: σ₀ within a relative 1e-5 of the
    model's σ_max, or above it."""
    return math.isclose(sigma_max, sigma0, rel_tol=1e-5) or sigma0 > sigma_max


def plain_words(chunks: Sequence[tuple[str, float]]) -> str:
    """The text of a prompt split into (text, weight) chunks by ComfyUI's emphasis parser, weights dropped and
    white space collapsed: what OMS's text encoder reads."""
    return " ".join("".join(text for text, _weight in chunks).split())


def summary(*, module: str, text_encoder: str, prompt: str, negative_prompt: str, cfg: float, solver: str) -> dict:
    """What a One More Step node does, as shown under the node and kept with the patched model."""
    return {"module": module, "text_encoder": text_encoder, "prompt": prompt, "negative_prompt": negative_prompt,
            "cfg": cfg, "solver": solver}


def summary_text(info: dict) -> str:
    """``summary`` in one line."""
    prompts = f"prompt {info['prompt']!r}" + (f", negative {info['negative_prompt']!r}" if info["negative_prompt"]
                                               else "")
    return (f"One More Step: module {info['module']}, text encoder {info['text_encoder']}, {prompts}, "
            f"CFG {info['cfg']:g}, solver {info['solver']}")
