"""Tiny random OMS modules in the released file layouts, for every test in the project.

Nothing here downloads: weights are random (every parameter, so outputs are non-trivial) and written with
safetensors exactly as the released modules are laid out. Other helpers may ADD
functions at the end of this file.
"""

from __future__ import annotations

import gzip
import inspect
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from lib_oms.runtime import HostWords
from lib_oms.text_encoders import (
    TowerSpec,
    clip_text_config,
    load_openclip_text_encoder,
    openclip_to_transformers_names,
)
from lib_oms.unet import OMSUNet, load_into_meta, normalize_unet_config, parameter_shapes

# A host's words as the tests give them: messages must carry them where they say what to do.
TEST_WORDS = HostWords(text_encoder_setting="the test host's text-encoder setting",
                       other_places="the test host's other places and {hub_dir}",
                       refresh="refresh the test host's list")

# The released oms_module/config.json of h1t/oms_b_openclip_15_21.
OMS_B_CONFIG = {
    "_class_name": "UNet2DConditionWoCTModel",
    "_diffusers_version": "0.23.1",
    "_name_or_path": "h1t/oms_b_openclip_15_21",
    "subfolder": "oms_module",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [160, 320, 640],
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 1024,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_out_scale_factor": 1.0,
    "sample_size": None,
    "transformer_layers_per_block": 1,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": False,
}


def oms_b_config(**overrides) -> dict:
    """The released OMS-B config (154 M parameters), raw as in the file; ``overrides`` replace entries."""
    return {**json.loads(json.dumps(OMS_B_CONFIG)), **overrides}


def oms_s_config(**overrides) -> dict:
    """OMS-S (paper, Appendix D.3): OMS-B's block layout with channels [32, 64, 64] and heads [2, 4, 4]."""
    return oms_b_config(**{"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4], **overrides})


def oms_l_config(**overrides) -> dict:
    """OMS-L (paper): channels [320, 640, 1280, 1280], heads [5, 10, 20, 20]; block types assumed SD-like."""
    return oms_b_config(**{
        "block_out_channels": [320, 640, 1280, 1280],
        "attention_head_dim": [5, 10, 20, 20],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        **overrides,
    })


def tiny_unet_config(**overrides) -> dict:
    """OMS-B's layout (Down, CrossAttn, CrossAttn; mid; CrossAttn, CrossAttn, Up) with tiny widths: fast on CPU.

    Channels [16, 32, 32], 8 norm groups, heads [1, 2, 2] (head dim 16), text width 32.
    """
    return oms_b_config(**{
        "_name_or_path": "tests/tiny_oms",
        "block_out_channels": [16, 32, 32],
        "attention_head_dim": [1, 2, 2],
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        **overrides,
    })


def random_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for ``config`` (raw or normalised), every parameter random including the zero-init ones.

    Weights ~ N(0, 1/fan_in) keep activations O(1); norm scales ~ 1 + N(0, 0.1²); biases ~ N(0, 0.1²).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in parameter_shapes(normalize_unet_config(config, "tests.factories")).items():
        tensor = torch.randn(shape, generator=generator)
        if key.endswith("bias"):
            tensor *= 0.1
        elif len(shape) == 1:
            tensor = 1 + 0.1 * tensor
        else:
            tensor /= math.sqrt(math.prod(shape[1:]))
        state[key] = tensor.to(dtype)
    return state


def tiny_inputs(config: dict, height: int = 8, width: int = 8, batch: int = 2, tokens: int = 77, seed: int = 1):
    """(sample [B,C,h,w], encoder_hidden_states [B,tokens,D]) of unit Gaussians for ``config``."""
    config = normalize_unet_config(config, "tests.factories")
    width_text = config["cross_attention_dim"]
    width_text = width_text if isinstance(width_text, int) else width_text[0]
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config["in_channels"], height, width, generator=generator)
    return sample, torch.randn(batch, tokens, width_text, generator=generator)


def reference_unet(config: dict, state_dict: dict) -> OMSUNet:
    """Our network built straight from a config and state dict (no file involved), in eval mode."""
    return OMSUNet.from_state_dict(normalize_unet_config(config, "tests.factories"), state_dict).eval()


def write_released_folder(root: Path, name: str, config: dict, state_dict: dict, fp16: bool = False,
                          latent_space: str | None = None, text_encoder: str | None = None,
                          both_precisions: bool = False) -> Path:
    """``root/name`` in the released layout: model_index.json, oms_module/config.json + weights, pointer folders.

    ``fp16`` writes diffusion_pytorch_model.fp16.safetensors instead of the fp32 file; ``both_precisions`` writes
    both. ``latent_space`` / ``text_encoder`` go into model_index.json as our trainer writes them.
    """
    folder = Path(root) / name
    (folder / "oms_module").mkdir(parents=True)
    index = {
        "_class_name": "OMSPipeline",
        "_diffusers_version": "0.23.1",
        "oms_module": ["diffusers_patch", "UNet2DConditionWoCTModel"],
        "oms_text_encoder": ["transformers", "CLIPTextModel"],
        "oms_tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if latent_space is not None:
        index["latent_space"] = latent_space
    if text_encoder is not None:
        index["text_encoder"] = text_encoder
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "oms_module" / "config.json").write_text(json.dumps(config, indent=2))
    for component in ("oms_text_encoder", "oms_tokenizer"):
        (folder / component).mkdir()
        pointer = {"_name_or_path": "stabilityai/stable-diffusion-2-1", "subfolder": component[4:]}
        (folder / component / "config.json").write_text(json.dumps(pointer))
    tensors = {key: value.contiguous() for key, value in state_dict.items()}
    if fp16 or both_precisions:
        save_file({k: v.half() for k, v in tensors.items()},
                  folder / "oms_module" / "diffusion_pytorch_model.fp16.safetensors", metadata={"format": "pt"})
    if not fp16 or both_precisions:
        save_file({k: v.float() for k, v in tensors.items()},
                  folder / "oms_module" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return folder


def write_lone_safetensors(path: Path, state_dict: dict, config: dict | None = None,
                           metadata: dict | None = None) -> Path:
    """A lone .safetensors; ``config`` goes into the metadata key "oms_config" (JSON), ``metadata`` is added."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    if config is not None:
        meta["oms_config"] = json.dumps(config)
    save_file({key: value.contiguous() for key, value in state_dict.items()}, path, metadata=meta)
    return path


def write_sidecar(module_path: Path, **entries) -> Path:
    """``<name>.json`` beside a module file or folder, e.g. latent_space="sdxl" or unet_config={...}."""
    module_path = Path(module_path)
    name = module_path.name[: -len(".safetensors")] if module_path.suffix == ".safetensors" else module_path.name
    sidecar = module_path.with_name(name + ".json")
    sidecar.write_text(json.dumps(entries))
    return sidecar


def diffusers_no_time_unet(config: dict, state_dict: dict):
    """diffusers' UNet2DConditionModel for ``config`` with our weights and every time projection zeroed.

    With time_embedding and each resnet's time_emb_proj all zero, the time embedding adds 0: the network is the
    official no-time UNet2DConditionWoCTModel. Call it as ``model(sample, 0, encoder_hidden_states=ctx).sample``.
    """
    from diffusers import UNet2DConditionModel as unet_class  # test-only dependency: the reference implementation
    normalised = normalize_unet_config(config, "tests.factories")
    accepted = inspect.signature(unet_class.__init__).parameters
    with torch.device("meta"):
        model = unet_class(**{key: value for key, value in normalised.items() if key in accepted})
    full = {}
    for key, tensor in model.state_dict().items():
        if key in state_dict:
            full[key] = state_dict[key]
        else:
            assert "time" in key, f"diffusers has a non-time parameter we lack: {key}"
            full[key] = torch.zeros(tensor.shape, dtype=tensor.dtype)
    return load_into_meta(model, full, strict=True).eval()


# ---------------------------------------------------------------------------------------------------------------
# Tiny text towers (no download, no open_clip: usable on a machine with torch and transformers only)


TINY_OPENCLIP_H = TowerSpec("tiny OpenCLIP", width=64, layers=3, heads=4, intermediate=256, hidden_act="gelu")


def tiny_text_model(spec: TowerSpec = TINY_OPENCLIP_H, seed: int = 0):
    """A transformers ``CLIPTextModel`` of ``spec`` (all its blocks) with every weight random, in eval mode."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(clip_text_config(spec, spec.layers)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("bias"):
                parameter.copy_(0.1 * noise)
            elif parameter.dim() == 1:
                parameter.copy_(1 + 0.1 * noise)
            elif "embedding" in name:
                parameter.copy_(noise)
            else:
                parameter.copy_(noise / math.sqrt(parameter.shape[1]))
    return model


def tiny_openclip_encoder(seed: int = 0, **kwargs):
    """The OMS text encoder (penultimate layer, as released) over ``tiny_text_model(seed=seed)``."""
    return load_openclip_text_encoder(tiny_text_model(seed=seed).state_dict(), spec=TINY_OPENCLIP_H, **kwargs)


def write_sparse_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> Path:
    """A .safetensors of full-size shapes whose data is a hole of the file system (no disk is used): for code that
    reads only headers, e.g. telling an SD 2.x checkpoint (a 1024-wide text tower) from others without real weights."""
    size = {"F16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        count = math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + count]}
        offset += count
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def text_tower_shapes(prefix: str, width: int, blocks: int) -> dict[str, tuple[int, ...]]:
    """The open_clip text-tower tensor names and shapes a header check looks at (one tensor per block suffices)."""
    shapes = {f"{prefix}token_embedding.weight": (49408, width), f"{prefix}positional_embedding": (77, width)}
    shapes.update({f"{prefix}transformer.resblocks.{i}.ln_1.weight": (width,) for i in range(blocks)})
    return shapes


def openclip_to_transformers(state_dict: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """An open_clip text tower (the tensors under ``prefix``) under transformers ``CLIPTextModel`` file names
    (``text_model.*``): how the SD2.x diffusers text_encoder stores the same weights."""
    own = {name[len(prefix):]: tensor for name, tensor in state_dict.items() if name.startswith(prefix)}
    return {"text_model." + name: tensor for name, tensor in openclip_to_transformers_names(own).items()}


def parameter_count(config: dict) -> int:
    """Number of parameters of the network for ``config``."""
    return sum(math.prod(shape) for shape in parameter_shapes(config).values())


def bpe_files() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges as transformers' CLIPTokenizer reads them, from open_clip's BPE file."""
    import open_clip.tokenizer as oc_tokenizer

    merges_text = gzip.open(oc_tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = merges_text[1:49152 - 256 - 2 + 1]
    byte_chars = list(oc_tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A CLIP tokenizer folder (vocab.json, merges.txt, special tokens) as SD's pipelines ship one, made offline."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_files()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                              "do_lower_case": True}))
    return folder
