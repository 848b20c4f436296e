"""Fixture repositories for the fake hub: tiny stand-ins for the released OMS modules, the SD 2.x mirrors' text
encoder and LAION's open_clip checkpoint, with the neighbouring files (other precisions, pickles, other components)
that the downloader must leave alone."""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from lib_oms.catalog import RELEASED_MODULES
from lib_oms.download import OPENCLIP_FILE, OPENCLIP_REPO, TEXT_ENCODER_REPOS
from tests.factories import TINY_OPENCLIP_H as TINY_H
from tests.factories import random_state_dict, tiny_text_model, tiny_unet_config, write_released_folder

MODULE_WEIGHTS = "oms_module/diffusion_pytorch_model.fp16.safetensors"


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def released_module_files(latent_space: str, config: dict, seed: int, text_encoder: str | None) -> dict[str, bytes]:
    """The files of the released module repository of ``latent_space`` (fp16 and fp32 weights, pointer folders,
    README) with random weights of ``config``; ``text_encoder`` goes into model_index.json (None: left out, as
    released, so the width of the network tells it)."""
    name = RELEASED_MODULES[latent_space].folder
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_released_folder(Path(tmp), name, config, random_state_dict(config, seed=seed),
                                       text_encoder=text_encoder, both_precisions=True)
        files = _folder_files(folder)
    return {**files, "README.md": b"# OMS\n"}


@cache
def module_repo(latent_space: str) -> dict[str, bytes]:
    """A tiny released-layout module named as the real repository."""
    return released_module_files(latent_space, tiny_unet_config(), seed=len(latent_space), text_encoder="openclip-h")


def _random(shape, generator) -> torch.Tensor:
    return (0.02 * torch.randn(shape, generator=generator)).contiguous()


@cache
def transformers_tower(seed: int = 3) -> dict[str, torch.Tensor]:
    """A tiny `CLIPTextModel` state dict (`text_model.*`), one block short as SD 2.x's diffusers text_encoder."""
    last = f"encoder.layers.{TINY_H.layers - 1}."
    return {"text_model." + name.removeprefix("text_model."): tensor.contiguous()
            for name, tensor in tiny_text_model(seed=seed).state_dict().items()
            if last not in name and not name.endswith("position_ids")}


def diffusers_mirror(text_encoder: dict[str, bytes]) -> dict[str, bytes]:
    """An SD 2.x diffusers repository around ``text_encoder`` (its files by name in text_encoder/): beside it a
    pickle, other components and the pipeline's index, which the downloader must leave alone."""
    return {
        "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
        **{f"text_encoder/{name}": data for name, data in text_encoder.items()},
        "text_encoder/pytorch_model.bin": b"a pickle: never fetched",
        "unet/diffusion_pytorch_model.fp16.safetensors": save({"conv_in.weight": torch.ones(4, 4)}),
        "tokenizer/vocab.json": b"{}",
    }


@cache
def text_encoder_mirror() -> dict[str, bytes]:
    """The SD 2.x mirror with a tiny text encoder in fp16 and fp32."""
    tower = transformers_tower()
    return diffusers_mirror({
        "config.json": json.dumps({"architectures": ["CLIPTextModel"], "hidden_size": TINY_H.width,
                                   "num_hidden_layers": TINY_H.layers - 1}).encode(),
        "model.fp16.safetensors": save({k: v.half() for k, v in tower.items()}),
        "model.safetensors": save(tower),
    })


@cache
def openclip_checkpoint() -> dict[str, torch.Tensor]:
    """A tiny open_clip CLIP state dict: text tower, projections, logit scale and a vision tower between them."""
    generator = torch.Generator().manual_seed(5)
    width, hidden = TINY_H.width, TINY_H.intermediate
    shapes = {"positional_embedding": (77, width), "text_projection": (width, 16), "logit_scale": (),
              "token_embedding.weight": (49408, width), "ln_final.weight": (width,), "ln_final.bias": (width,),
              "visual.conv1.weight": (32, 3, 8, 8), "visual.proj": (32, 16), "visual.ln_post.weight": (32,)}
    for i in range(TINY_H.layers):
        block = f"transformer.resblocks.{i}."
        shapes.update({block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
                       block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
                       block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                       block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
                       block + "mlp.c_fc.weight": (hidden, width), block + "mlp.c_fc.bias": (hidden,),
                       block + "mlp.c_proj.weight": (width, hidden), block + "mlp.c_proj.bias": (width,)})
    return {name: _random(shape, generator) for name, shape in shapes.items()}


@cache
def laion_repo() -> dict[str, bytes]:
    return {OPENCLIP_FILE: save(openclip_checkpoint()), "open_clip_pytorch_model.bin": b"a pickle: never fetched",
            "open_clip_config.json": b"{}"}


def write_openclip_checkpoint(path: Path) -> Path:
    save_file(openclip_checkpoint(), str(path))
    return path


def populate(hub, *, mirrors=TEXT_ENCODER_REPOS, laion: bool = True, modules=("sd", "sdxl")):
    """The fake hub with the released modules, the given SD 2.x mirrors and LAION's repository."""
    for space in modules:
        hub.add(RELEASED_MODULES[space].repo, module_repo(space))
    for repo in mirrors:
        hub.add(repo, text_encoder_mirror())
    if laion:
        hub.add(OPENCLIP_REPO, laion_repo())
    return hub
