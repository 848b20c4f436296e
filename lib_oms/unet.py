"""The OMS network in plain torch, and its config.

OMS (Hu et al., CVPR 2024, §3.3) predicts v at SNR 0 from unit noise and a text embedding, with a UNet that has
no time conditioning. The official class is ``UNet2DConditionWoCTModel``: diffusers' ``UNet2DConditionModel``
without ``time_proj`` / ``time_embedding`` and without the resnets' ``time_emb_proj``.
Parameter names here equal diffusers' so the released state dict loads with ``strict=True``.
"""

from __future__ import annotations

import functools
import inspect
import json
import re

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModuleFileError

# load_state_dict(assign=True) (torch >= 2.1) lets a meta-device network take tensors without a copy
_CAN_ASSIGN = "assign" in inspect.signature(nn.Module.load_state_dict).parameters


def load_into_meta(model: nn.Module, state_dict: dict, *, strict: bool) -> nn.Module:
    """Give ``model``, built on the meta device, the tensors of ``state_dict`` (one device and dtype; every
    parameter and persistent buffer of the model, as the caller has checked). torch >= 2.1 takes them as they are;
    torch 2.0 (WebUI 1.6/1.7) cannot, so the model gets uninitialised storage of their device and dtype first and
    they are copied into it (no random initialisation of weights about to be overwritten)."""
    if _CAN_ASSIGN:
        model.load_state_dict(state_dict, strict=strict, assign=True)
        return model
    if state_dict:  # an empty one is left to load_state_dict to refuse
        first = next(iter(state_dict.values()))
        model.to_empty(device=first.device).to(dtype=first.dtype)
    model.load_state_dict(state_dict, strict=strict)
    return model

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Heads per block of the paper's OMS-S / OMS-B / OMS-L (Appendix D.3), keyed by block_out_channels:
# the number of heads cannot be read from tensor shapes.
PRESET_HEADS = {
    (32, 64, 64): [2, 4, 4],
    (160, 320, 640): [5, 10, 20],
    (320, 640, 1280, 1280): [5, 10, 20, 20],
}

# diffusers 0.2x UNet2DConditionModel defaults, so a partial config means what it means to diffusers.
DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# Features the OMS network does not have: each must keep its neutral value. (key, allowed values, what it is)
UNSUPPORTED = (
    ("dual_cross_attention", (False,), "dual cross-attention"),
    ("encoder_hid_dim", (None,), "an encoder_hid projection"),
    ("encoder_hid_dim_type", (None,), "an encoder_hid projection"),
    ("class_embed_type", (None,), "class embeddings"),
    ("num_class_embeds", (None,), "class embeddings"),
    ("addition_embed_type", (None,), "added (SDXL-style) embeddings"),
    ("mid_block_only_cross_attention", (None, False), "cross-attention-only blocks"),
    ("cross_attention_norm", (None,), "a cross-attention norm"),
    ("attention_type", ("default",), "gated (GLIGEN) attention"),
    ("reverse_transformer_layers_per_block", (None,), "an asymmetric transformer layout"),
    ("act_fn", ("silu", "swish"), "an activation other than SiLU"),
    ("resnet_time_scale_shift", ("default", "scale_shift"), "a spatial or adaptive group norm"),
)


def _fail(source: str, problem: str) -> ModuleFileError:
    return ModuleFileError(
        f"{source}: {problem}. Use the config.json that came with the module's weights "
        "(a diffusers UNet2DConditionModel config without time conditioning)."
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_block(config: dict, key: str, n: int, source: str) -> list:
    """An int-or-list config entry as one positive int per block."""
    value = config[key]
    values = [value] * n if _is_int(value) else value
    if not isinstance(values, (list, tuple)) or len(values) != n or not all(_is_int(v) and v > 0 for v in values):
        raise _fail(source, f"'{key}' must be a positive integer or a list of {n} (one per block), not {value!r}")
    return list(values)


def _expand(config: dict, key: str) -> list:
    """A normalised config's int-or-list entry as one value per block."""
    value = config[key]
    return [value] * len(config["block_out_channels"]) if _is_int(value) else list(value)


def _compact(values: list):
    """One int when every block has the same value (the released configs' form), else the list."""
    return values[0] if len(set(values)) == 1 else values


def normalize_unet_config(raw: dict, source: str) -> dict:
    """Validate a diffusers-style (WoCT) UNet config and fill diffusers' defaults.

    Unknown keys (``_name_or_path``, ``subfolder``, ...) are dropped. The heads go to ``attention_head_dim`` as a
    list (diffusers' quirk: there it is the number of heads unless ``num_attention_heads`` is set), and
    ``num_attention_heads`` becomes null, the form the released config uses. Raises ModuleFileError naming
    ``source`` for unknown block types, unsupported features or inconsistent sizes. As in diffusers,
    ``resnet_out_scale_factor`` only applies to block types OMS does not use, so it is checked but has no effect;
    ``mid_block_scale_factor`` scales the mid block's resnets.
    """
    if not isinstance(raw, dict):
        raise _fail(source, f"the UNet config must be a JSON object, not {type(raw).__name__}")
    config = {key: raw.get(key, default) for key, default in DIFFUSERS_DEFAULTS.items()}
    for key, allowed, feature in UNSUPPORTED:
        if config[key] not in allowed:
            raise _fail(source, f"'{key}': {config[key]!r} asks for {feature}, which the OMS network does not have")
    only_cross = config["only_cross_attention"]
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise _fail(source, "'only_cross_attention' is not supported (the OMS network uses self- and cross-attention)")
    config["only_cross_attention"] = False
    config["mid_block_only_cross_attention"] = None
    config["act_fn"] = "silu"

    channels = config["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels or not all(_is_int(c) and c > 0 for c in channels):
        raise _fail(source, f"'block_out_channels' must be a non-empty list of positive integers, not {channels!r}")
    n = len(channels)
    config["block_out_channels"] = list(channels)
    # diffusers accepts block names with a "UNetRes" prefix as the plain block.
    for key, known in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        types = config[key]
        if not isinstance(types, (list, tuple)) or len(types) != n:
            raise _fail(source, f"'{key}' must list {n} block types (one per block_out_channels entry), not {types!r}")
        types = [re.sub(r"^UNetRes", "", t) if isinstance(t, str) else t for t in types]
        for block_type in types:
            if block_type not in known:
                raise _fail(source, f"unknown block type {block_type!r} in '{key}' (supported: {', '.join(known)})")
        config[key] = types
    if config["mid_block_type"] not in MID_BLOCK_TYPES:
        raise _fail(source, f"unknown mid block type {config['mid_block_type']!r} (supported: UNetMidBlock2DCrossAttn "
                    "or null)")

    for key in ("in_channels", "out_channels", "downsample_padding", "conv_in_kernel", "conv_out_kernel"):
        if not _is_int(config[key]) or config[key] < (0 if key == "downsample_padding" else 1):
            raise _fail(source, f"'{key}' must be a positive integer, not {config[key]!r}")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if config[key] % 2 == 0:
            raise _fail(source, f"'{key}' must be odd, not {config[key]}")
    groups = config["norm_num_groups"]
    if not _is_int(groups) or groups < 1 or any(c % groups for c in channels):
        raise _fail(source, f"'norm_num_groups' {groups!r} must be a positive integer dividing every "
                    f"block_out_channels entry {channels}")
    for key in ("norm_eps", "mid_block_scale_factor", "resnet_out_scale_factor"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _fail(source, f"'{key}' must be a positive number, not {value!r}")

    heads_key = "attention_head_dim" if config["num_attention_heads"] is None else "num_attention_heads"
    heads = _per_block(config, heads_key, n, source)
    for count, width in zip(heads, channels, strict=True):
        if count > width:
            raise _fail(source, f"'{heads_key}' {heads} asks for more heads than channels ({channels})")
    config["attention_head_dim"], config["num_attention_heads"] = heads, None
    config["layers_per_block"] = _compact(_per_block(config, "layers_per_block", n, source))
    config["transformer_layers_per_block"] = _compact(_per_block(config, "transformer_layers_per_block", n, source))
    # every block reads the same text embedding, so one width
    widths = _per_block(config, "cross_attention_dim", n, source)
    if len(set(widths)) > 1:
        raise _fail(source, f"'cross_attention_dim' {widths} differs between blocks; all read one text embedding")
    config["cross_attention_dim"] = widths[0]
    for key in ("use_linear_projection", "upcast_attention", "center_input_sample"):
        if not isinstance(config[key], bool):
            raise _fail(source, f"'{key}' must be true or false, not {config[key]!r}")
    return config


def infer_unet_config(state_dict_shapes: dict, source: str) -> dict:
    """A normalised config from tensor shapes alone (for a lone .safetensors without a config).

    Reads channels, layer counts, block types (a block has attentions or not), the cross-attention width, conv vs
    linear projections and transformer depth. The number of heads is not in the shapes: it comes from the
    paper's presets (PRESET_HEADS) by block_out_channels. norm_num_groups, norm_eps and downsample_padding take
    diffusers' defaults (32, 1e-5, 1), which the released modules use.
    """
    shapes = {key: tuple(shape) for key, shape in state_dict_shapes.items()}

    def need(key: str) -> tuple:
        if key not in shapes:
            raise ModuleFileError(
                f"{source}: cannot infer the OMS network from the tensors: '{key}' is missing. The file is not an OMS "
                "module in diffusers format: use the released module (folder with oms_module/config.json)."
            )
        return shapes[key]

    def count(prefix: str) -> int:
        indices = {int(m.group(1)) for key in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
        return max(indices) + 1 if indices else 0

    conv_in, conv_out = need("conv_in.weight"), need("conv_out.weight")
    n = count("down_blocks.")
    if n == 0 or count("up_blocks.") != n:
        raise ModuleFileError(f"{source}: cannot infer the OMS network: expected as many up_blocks as down_blocks "
                              "(diffusers key names). Use the released module folder with its config.json.")
    channels = [need(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n)]
    layers = [count(f"down_blocks.{i}.resnets.") for i in range(n)]
    has_attention = [count(f"down_blocks.{i}.attentions.") > 0 for i in range(n)]
    depth = [max(count(f"down_blocks.{i}.attentions.0.transformer_blocks."), 1) for i in range(n)]
    attention_keys = [key for key in shapes if key.endswith("attn2.to_k.weight")]
    proj_in = [shape for key, shape in shapes.items() if key.endswith(".proj_in.weight")]
    heads = PRESET_HEADS.get(tuple(channels))
    if heads is None:
        sidecar = re.sub(r"\.safetensors$", "", source, flags=re.IGNORECASE) + ".json"
        raise ModuleFileError(
            f"{source}: block_out_channels {channels} is not one of the paper's OMS-S/B/L sizes, so the number of "
            f"attention heads cannot be known from the tensors. Add a config: a sidecar {sidecar} beside the file "
            'with {"unet_config": {...the diffusers UNet config...}}, or use the folder layout with '
            "oms_module/config.json."
        )
    if count("mid_block.attentions.") > 0:
        mid_block_type = "UNetMidBlock2DCrossAttn"
    elif count("mid_block.resnets.") > 0:
        raise _fail(source, "the mid block has no attention (UNetMidBlock2D), which is not supported")
    else:
        mid_block_type = None
    raw = {
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": [
            "CrossAttnUpBlock2D" if count(f"up_blocks.{i}.attentions.") else "UpBlock2D" for i in range(n)
        ],
        "mid_block_type": mid_block_type,
        "cross_attention_dim": shapes[attention_keys[0]][1] if attention_keys else DIFFUSERS_DEFAULTS[
            "cross_attention_dim"],
        "use_linear_projection": bool(proj_in) and len(proj_in[0]) == 2,
        "transformer_layers_per_block": depth,
        "attention_head_dim": heads,
    }
    return normalize_unet_config(raw, source)


# ---------------------------------------------------------------------------------------------------------------
# Network. Each class mirrors one diffusers class, without the time embedding.


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without temb: ``(x + conv2(silu(gn2(conv1(silu(gn1(x))))))) / scale``."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, output_scale_factor: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + h) / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention, q/k/v without bias, softmax scale 1/sqrt(head_dim) (diffusers AttnProcessor2_0)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch = x.shape[0]
        q, k, v = (
            t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        dtype = q.dtype
        # upcast_attention: half-precision softmax can overflow; compute the attention itself in fp32.
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(dtype)
        return self.to_out[0](out.transpose(1, 2).reshape(batch, -1, self.heads * q.shape[-1]))


class GEGLU(nn.Module):
    """``a * gelu(b)`` with ``[a, b] = proj(x)`` (diffusers GEGLU, exact GELU)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    """GEGLU feed-forward with width 4·dim; index 1 holds diffusers' dropout so keys read ff.net.0 / ff.net.2."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock (layer_norm): self-attention, cross-attention, feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, head_dim, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers Transformer2DModel (continuous input): GroupNorm (eps 1e-6), projection in, blocks, out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool,
                 upcast: bool):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, context_dim, heads, head_dim, upcast) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, h.shape[1])
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        # back to [B, C, h, w] in the input's layout: channels-last is this permute's own layout, so no copy
        h = h.reshape(batch, height, width, h.shape[-1]).permute(0, 3, 1, 2).contiguous(memory_format=_layout(x))
        if not self.linear:
            h = self.proj_out(h)
        return h + x


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last if ``x`` [B, C, h, w] is stored channels-last (the GPU speed option), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class Downsample(nn.Module):
    """Stride-2 3x3 conv; with padding 0 diffusers pads right/bottom by one first."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to the skip tensor's size, then a 3x3 conv (so odd latent sizes like 75x75 work)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        dtype = x.dtype
        # nearest upsampling lacks bfloat16 kernels on some torch builds
        x = F.interpolate(x.float() if dtype == torch.bfloat16 else x, size=size, mode="nearest")
        return self.conv(x.to(dtype))


def _transformer(config: dict, i: int, channels: int) -> SpatialTransformer:
    return SpatialTransformer(
        channels,
        heads=config["attention_head_dim"][i],
        depth=_expand(config, "transformer_layers_per_block")[i],
        context_dim=config["cross_attention_dim"],
        groups=config["norm_num_groups"],
        linear=config["use_linear_projection"],
        upcast=config["upcast_attention"],
    )


def _resnet(config: dict, in_channels: int, out_channels: int, scale: float = 1.0) -> ResnetBlock:
    return ResnetBlock(in_channels, out_channels, config["norm_num_groups"], config["norm_eps"], scale)


class DownBlock(nn.Module):
    """DownBlock2D / CrossAttnDownBlock2D: resnets (each followed by an attention if cross-attn), then downsample."""

    def __init__(self, config: dict, i: int, in_channels: int, out_channels: int, attention: bool, downsample: bool):
        super().__init__()
        layers = _expand(config, "layers_per_block")[i]
        # attentions first: diffusers' key order
        self.attentions = nn.ModuleList(
            _transformer(config, i, out_channels) for _ in range(layers if attention else 0)
        )
        self.resnets = nn.ModuleList(
            _resnet(config, in_channels if j == 0 else out_channels, out_channels) for j in range(layers)
        )
        self.downsamplers = nn.ModuleList(
            [Downsample(out_channels, config["downsample_padding"])] if downsample else []
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions:
                x = self.attentions[j](x, context)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D / CrossAttnUpBlock2D: resnets on [x, skip] (each followed by an attention), then upsample."""

    def __init__(self, config: dict, i: int, prev_channels: int, skip_in_channels: int, out_channels: int,
                 attention: bool, upsample: bool):
        super().__init__()
        mirror = len(config["block_out_channels"]) - 1 - i  # diffusers reverses the per-block lists for up blocks
        layers = _expand(config, "layers_per_block")[mirror] + 1
        self.attentions = nn.ModuleList(
            _transformer(config, mirror, out_channels) for _ in range(layers if attention else 0)
        )
        self.resnets = nn.ModuleList(
            _resnet(
                config,
                (prev_channels if j == 0 else out_channels) + (skip_in_channels if j == layers - 1 else out_channels),
                out_channels,
            )
            for j in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], context: torch.Tensor,
                size: tuple[int, int] | None) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1))
            if self.attentions:
                x = self.attentions[j](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, attention, resnet (resnets scaled by mid_block_scale_factor)."""

    def __init__(self, config: dict, channels: int):
        super().__init__()
        scale = config["mid_block_scale_factor"]
        self.attentions = nn.ModuleList([_transformer(config, len(config["block_out_channels"]) - 1, channels)])
        self.resnets = nn.ModuleList(_resnet(config, channels, channels, scale) for _ in range(2))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x, context))


class OMSUNet(nn.Module):
    """The OMS network: ``forward(sample [B,C,h,w], encoder_hidden_states [B,L,D]) -> v [B,C_out,h,w]``.

    ``config`` must come from normalize_unet_config (or infer_unet_config). Inputs are cast to the weights' dtype.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        channels = config["block_out_channels"]
        n = len(channels)
        groups, eps = config["norm_num_groups"], config["norm_eps"]
        self.conv_in = nn.Conv2d(config["in_channels"], channels[0], config["conv_in_kernel"],
                                 padding=config["conv_in_kernel"] // 2)
        self.down_blocks = nn.ModuleList(
            DownBlock(config, i, channels[max(i - 1, 0)], channels[i],
                      attention=block_type == "CrossAttnDownBlock2D", downsample=i < n - 1)
            for i, block_type in enumerate(config["down_block_types"])
        )
        reversed_channels = list(reversed(channels))
        # up_blocks before mid_block: the released state dict's key order
        self.up_blocks = nn.ModuleList(
            UpBlock(config, i, prev_channels=reversed_channels[max(i - 1, 0)],
                    skip_in_channels=reversed_channels[min(i + 1, n - 1)], out_channels=reversed_channels[i],
                    attention=block_type == "CrossAttnUpBlock2D", upsample=i < n - 1)
            for i, block_type in enumerate(config["up_block_types"])
        )
        self.mid_block = MidBlock(config, channels[-1]) if config["mid_block_type"] else None
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], config["out_channels"], config["conv_out_kernel"],
                                  padding=config["conv_out_kernel"] // 2)

    @classmethod
    def from_state_dict(cls, config: dict, state_dict: dict) -> OMSUNet:
        """Build without initialising random weights (on the meta device) and take the given tensors (strict)."""
        with torch.device("meta"):
            unet = cls(config)
        return load_into_meta(unet, state_dict, strict=True)

    def forward(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        x, context = sample.to(dtype), encoder_hidden_states.to(dtype)
        if self.config["center_input_sample"]:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, context)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, context)
        for block in self.up_blocks:
            own = skips[len(skips) - len(block.resnets):]
            del skips[len(skips) - len(block.resnets):]
            # diffusers passes upsample_size = the next skip's size so sizes that are not multiples of 2^k work
            x = block(x, own, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the network for ``config`` with its shape, in module order (nothing allocated)."""
    return dict(_shapes_of(json.dumps(config, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _shapes_of(config_json: str) -> tuple:
    with torch.device("meta"):
        unet = OMSUNet(json.loads(config_json))
    return tuple((key, tuple(tensor.shape)) for key, tensor in unet.state_dict().items())

