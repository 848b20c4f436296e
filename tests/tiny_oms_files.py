"""Tiny random OMS files in the released layouts for the tests of every host (the CI ones, and the ComfyUI probes
run in a real ComfyUI's Python): made with the suite's factories, small enough for a CPU."""

from __future__ import annotations

import functools
from pathlib import Path

from factories import TINY_OPENCLIP_H, random_state_dict, tiny_text_model, tiny_unet_config, write_released_folder
from safetensors.torch import save_file

from lib_oms import text_encoders

MODULE = "oms_tiny_15_21"  # "15_21": the SD1.x/2.x latent space, as the released module's name says
SDXL_MODULE = "oms_tiny_xl"


def write_oms_folder(oms: Path) -> Path:
    """``oms/`` as a user has it: an SD module, an SDXL module and ``text_encoder/`` (a tiny OpenCLIP text model
    in SD 2.x's diffusers layout). Returns ``oms``."""
    config = tiny_unet_config(cross_attention_dim=TINY_OPENCLIP_H.width)
    for seed, (name, space) in enumerate(((MODULE, "sd"), (SDXL_MODULE, "sdxl"))):
        if not (oms / name).is_dir():
            write_released_folder(oms, name, config, random_state_dict(config, seed=seed), latent_space=space,
                                  text_encoder="openclip-h")
    encoder = oms / "text_encoder"
    if not (encoder / "model.safetensors").is_file():
        model = tiny_text_model(seed=3)
        encoder.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(encoder / "config.json")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(encoder / "model.safetensors"))
    return oms


def tiny_encoder_loader():
    """``load_openclip_text_encoder`` for the tiny architecture (the nodes load the real one's)."""
    return functools.partial(text_encoders.load_openclip_text_encoder, spec=TINY_OPENCLIP_H)
