"""The OMS network: parity with diffusers' UNet2DConditionModel made time-free, config normalisation, inference."""

import ast
from pathlib import Path

import pytest
import torch

from lib_oms.errors import ModuleFileError
from lib_oms.unet import OMSUNet, infer_unet_config, normalize_unet_config, parameter_shapes
from tests.factories import (
    diffusers_no_time_unet,
    oms_b_config,
    oms_l_config,
    oms_s_config,
    parameter_count,
    random_state_dict,
    reference_unet,
    tiny_inputs,
    tiny_unet_config,
)

TSV = Path(__file__).parent / "data" / "oms_b_state_dict_keys.tsv"


def parity(config: dict, sizes, batch: int = 1, seed: int = 0) -> float:
    """Max abs difference between our network and diffusers' (time projections zeroed) over latent ``sizes``."""
    state = random_state_dict(config, seed)
    ours, theirs = reference_unet(config, state), diffusers_no_time_unet(config, state)
    worst = 0.0
    with torch.no_grad():
        for height, width in sizes:
            sample, context = tiny_inputs(config, height, width, batch=batch)
            v = ours(sample, context)
            assert v.shape == sample.shape
            assert v.std() > 0.1, "random weights should give a non-trivial output"
            worst = max(worst, (v - theirs(sample, 0, encoder_hidden_states=context).sample).abs().max().item())
    return worst


@pytest.mark.parametrize(
    "overrides, sizes",
    [
        ({}, [(8, 8), (75, 75), (90, 60)]),
        ({"use_linear_projection": True}, [(8, 8), (13, 7)]),
        ({"transformer_layers_per_block": [1, 2, 3], "layers_per_block": [1, 2, 1]}, [(12, 12)]),
        ({"mid_block_type": None, "downsample_padding": 0, "upcast_attention": True, "conv_in_kernel": 1,
          "conv_out_kernel": 5, "mid_block_scale_factor": 2.0, "norm_eps": 1e-3, "center_input_sample": True},
         [(8, 8), (11, 9)]),
        ({"down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3,
          "attention_head_dim": 2}, [(8, 8)]),
    ],
    ids=["oms-b-layout", "linear-projection", "list-layers", "options", "all-attention"],
)
def test_parity_with_diffusers_tiny(overrides, sizes):
    assert parity(tiny_unet_config(**overrides), sizes) <= 1e-5


@pytest.mark.parametrize("width", [768, 1024, 2048, 4096])
def test_parity_with_diffusers_text_widths(width):
    assert parity(tiny_unet_config(cross_attention_dim=width), [(8, 8)], batch=2) <= 1e-5


def test_parity_with_diffusers_oms_s_at_odd_size():
    assert parity(oms_s_config(), [(15, 15)]) <= 1e-5


def read_tsv() -> dict:
    rows = (line.split("\t") for line in TSV.read_text().splitlines() if line.strip())
    return {key: ast.literal_eval(shape) for key, shape in rows}


def test_oms_b_has_exactly_the_released_keys_and_shapes_in_order():
    shapes = parameter_shapes(normalize_unet_config(oms_b_config(), "released config"))
    assert list(shapes.items()) == list(read_tsv().items())
    assert len(shapes) == 458
    assert parameter_count(normalize_unet_config(oms_b_config(), "released config")) == 154_014_564
    assert not any("time" in key for key in shapes)


@pytest.mark.slow
def test_oms_b_parity_with_diffusers_at_32x32():
    """The full 154 M-parameter OMS-B once; the weights are shared by both networks (no copies)."""
    assert parity(oms_b_config(), [(32, 32)]) <= 1e-5


def test_from_state_dict_is_strict():
    config = tiny_unet_config()
    state = random_state_dict(config)
    state.pop("conv_in.bias")
    with pytest.raises(RuntimeError, match="conv_in.bias"):
        reference_unet(config, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_state_dict_without_assign_matches(as_on_torch_2_0, dtype):
    """torch 2.0 (WebUI 1.6/1.7) has no load_state_dict(assign=True): the weights are copied in instead."""
    config = tiny_unet_config()
    state = random_state_dict(config, dtype=dtype)
    sample, context = tiny_inputs(config)
    with torch.no_grad():
        expected = reference_unet(config, state)(sample.to(dtype), context.to(dtype))
        as_on_torch_2_0()
        unet = reference_unet(config, state)
        assert torch.equal(unet(sample.to(dtype), context.to(dtype)), expected)
    assert {p.dtype for p in unet.parameters()} == {dtype}


def test_half_precision_forward_with_upcast_attention_is_close_to_fp32():
    config = tiny_unet_config(upcast_attention=True)
    state = random_state_dict(config)
    sample, context = tiny_inputs(config, 10, 10)
    with torch.no_grad():
        full = reference_unet(config, state)(sample, context)
        half = reference_unet(config, {k: v.bfloat16() for k, v in state.items()})(sample, context)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1


# --- config normalisation -----------------------------------------------------------------------------------


def test_normalize_released_config():
    config = normalize_unet_config(oms_b_config(), "oms_module/config.json")
    assert config["attention_head_dim"] == [5, 10, 20] and config["num_attention_heads"] is None
    assert config["cross_attention_dim"] == 1024 and config["layers_per_block"] == 2
    assert "_name_or_path" not in config and "subfolder" not in config
    assert normalize_unet_config(config, "again") == config


def test_normalize_fills_diffusers_defaults():
    config = normalize_unet_config({"block_out_channels": [32, 64, 64, 64]}, "partial.json")
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["attention_head_dim"] == [8, 8, 8, 8]  # diffusers' quirk: 8 heads
    assert (config["norm_num_groups"], config["norm_eps"], config["cross_attention_dim"]) == (32, 1e-5, 1280)
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn" and config["downsample_padding"] == 1


def test_num_attention_heads_wins_over_attention_head_dim():
    by_heads = normalize_unet_config(tiny_unet_config(num_attention_heads=[1, 4, 4], attention_head_dim=64), "a")
    by_quirk = normalize_unet_config(tiny_unet_config(attention_head_dim=[1, 4, 4]), "b")
    assert by_heads == by_quirk
    assert OMSUNet.from_state_dict(by_heads, random_state_dict(by_heads)).mid_block.attentions[0] \
        .transformer_blocks[0].attn1.heads == 4


def test_unet_res_prefix_is_the_plain_block():
    config = normalize_unet_config(tiny_unet_config(down_block_types=["UNetResDownBlock2D", "CrossAttnDownBlock2D",
                                                                       "CrossAttnDownBlock2D"]), "x")
    assert config["down_block_types"][0] == "DownBlock2D"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]},
         "unknown block type 'AttnDownBlock2D'"),
        ({"up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"]}, "'AttnUpBlock2D'"),
        ({"mid_block_type": "UNetMidBlock2D"}, "unknown mid block type"),
        ({"dual_cross_attention": True}, "dual cross-attention"),
        ({"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 32}, "encoder_hid"),
        ({"class_embed_type": "timestep"}, "class embeddings"),
        ({"num_class_embeds": 10}, "class embeddings"),
        ({"addition_embed_type": "text_time"}, "added (SDXL-style) embeddings"),
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"only_cross_attention": [False, True, False]}, "only_cross_attention"),
        ({"attention_type": "gated"}, "GLIGEN"),
        ({"act_fn": "gelu"}, "activation"),
        ({"resnet_time_scale_shift": "spatial"}, "group norm"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "must list 3 block types"),
        ({"attention_head_dim": [1, 2]}, "'attention_head_dim'"),
        ({"attention_head_dim": [1, 2, 64]}, "more heads than channels"),
        ({"norm_num_groups": 5}, "'norm_num_groups'"),
        ({"cross_attention_dim": [32, 64, 32]}, "differs between blocks"),
        ({"layers_per_block": 0}, "'layers_per_block'"),
        ({"block_out_channels": []}, "'block_out_channels'"),
        ({"conv_in_kernel": 2}, "must be odd"),
        ({"norm_eps": -1}, "'norm_eps'"),
        ({"use_linear_projection": "yes"}, "'use_linear_projection'"),
    ],
)
def test_normalize_rejects_with_the_source_named(overrides, expected):
    with pytest.raises(ModuleFileError) as error:
        normalize_unet_config(tiny_unet_config(**overrides), "models/oms/bad/oms_module/config.json")
    message = str(error.value)
    assert "models/oms/bad/oms_module/config.json" in message and expected in message
    assert "Use the config.json that came with the module" in message


def test_normalize_rejects_non_object():
    with pytest.raises(ModuleFileError, match="must be a JSON object"):
        normalize_unet_config([1, 2], "list.json")


# --- config inference from shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [oms_s_config(), oms_b_config(), oms_l_config(), oms_s_config(use_linear_projection=True),
     oms_s_config(transformer_layers_per_block=[1, 2, 3], layers_per_block=[2, 1, 2], mid_block_type=None),
     oms_b_config(cross_attention_dim=2048, in_channels=16, out_channels=16)],
    ids=["S", "B", "L", "S-linear", "S-layers", "B-2048-16ch"],
)
def test_inferred_config_equals_the_original(config):
    normalised = normalize_unet_config(config, "original")
    assert infer_unet_config(parameter_shapes(normalised), "lone.safetensors") == normalised


def test_inference_refuses_unknown_head_counts():
    shapes = parameter_shapes(normalize_unet_config(tiny_unet_config(), "tiny"))
    with pytest.raises(ModuleFileError) as error:
        infer_unet_config(shapes, "models/oms/custom.safetensors")
    message = str(error.value)
    assert "models/oms/custom.safetensors" in message and "[16, 32, 32]" in message
    assert "models/oms/custom.json" in message and "unet_config" in message and "oms_module/config.json" in message


def test_inference_refuses_non_oms_tensors():
    with pytest.raises(ModuleFileError, match="'conv_in.weight' is missing"):
        infer_unet_config({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "sd15.safetensors")
