"""Text encoders: conversions checked against open_clip's and transformers' own forward passes (tiny random towers)."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel

from lib_oms import text_encoders as te
from lib_oms.errors import TextEncoderError
from lib_oms.text_encoders import (
    MixClipTextEncoder,
    OpenCLIPTextEncoder,
    PromptEmbeddingCache,
    TowerSpec,
    clip_text_config,
    load_mixclip_text_encoder,
    load_openclip_text_encoder,
    tokenize,
)
from tests.factories import openclip_to_transformers

TINY_H = TowerSpec("tiny OpenCLIP", width=64, layers=3, heads=4, intermediate=256, hidden_act="gelu")
TINY_L = TowerSpec("tiny CLIP-L", width=48, layers=3, heads=4, intermediate=192, hidden_act="quick_gelu")
TINY_G = TowerSpec("tiny bigG", width=80, layers=3, heads=4, intermediate=320, hidden_act="gelu")
PROMPTS = ["a photo of a cat", "", "an oil painting of a lighthouse at dusk, " * 12]
SD2_PREFIX = "cond_stage_model.model."
SDXL_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_G_PREFIX = "conditioner.embedders.1.model."
UNRELATED = {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(8, 4, 3, 3)}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every weight (layer norms included) so that any misplaced tensor changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _openclip_model(spec: TowerSpec, seed: int):
    """A tiny open_clip CLIP (vision tower included, as in open_clip checkpoints) with random weights."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=spec.width, heads=spec.heads, layers=spec.layers),
    )
    return _randomize(model, seed)


@torch.no_grad()
def _openclip_reference(model, ids: torch.Tensor, *, blocks_skipped: int, final_norm: bool = True) -> torch.Tensor:
    """SD2's FrozenOpenCLIPEmbedder: embeddings, the resblocks but the last `blocks_skipped`, then ln_final."""
    x = model.token_embedding(ids) + model.positional_embedding
    seq_first = not getattr(model.transformer, "batch_first", False)  # open_clip < 2.23 runs [L, B, D]
    x = x.permute(1, 0, 2) if seq_first else x
    if blocks_skipped:
        for block in model.transformer.resblocks[:-blocks_skipped]:
            x = block(x, attn_mask=model.attn_mask)
    else:
        x = model.transformer(x, attn_mask=model.attn_mask)  # open_clip's own full forward
    x = x.permute(1, 0, 2) if seq_first else x
    return model.ln_final(x) if final_norm else x


def _text_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


def _hf_model(spec: TowerSpec, layers: int) -> CLIPTextModel:
    return CLIPTextModel(clip_text_config(spec, layers)).eval()


def _file_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 drops `text_model.` from its state-dict names; files keep it."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def _load_file_names(model: CLIPTextModel, file_state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    state = {k if k in own else k.removeprefix("text_model."): v for k, v in file_state.items()}
    state = {k: v for k, v in state.items() if k in own}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert [k for k in missing if "position_ids" not in k] == [] and unexpected == []


def _save_hf_folder(folder, file_state: dict[str, torch.Tensor], spec: TowerSpec, layers: int):
    model = _hf_model(spec, layers)
    _load_file_names(model, file_state)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def oc_model():
    return _openclip_model(TINY_H, seed=1)


@pytest.fixture(scope="module")
def ids():
    return open_clip.tokenize(PROMPTS)


@pytest.fixture(scope="module")
def expected(oc_model, ids):
    return {
        "penultimate": _openclip_reference(oc_model, ids, blocks_skipped=1),
        "last": _openclip_reference(oc_model, ids, blocks_skipped=0),
    }


@pytest.fixture(scope="module")
def files(oc_model, tmp_path_factory):
    """The same tiny tower in every layout a user may have."""
    root = tmp_path_factory.mktemp("openclip")
    state = {k: v.contiguous() for k, v in oc_model.state_dict().items()}
    paths = {"open_clip": root / "open_clip_model.safetensors", "sd2": root / "sd2_checkpoint.safetensors"}
    save_file(state, str(paths["open_clip"]))
    save_file({**{SD2_PREFIX + k: v for k, v in _text_state(oc_model).items()}, **UNRELATED}, str(paths["sd2"]))
    converted = openclip_to_transformers(state)
    paths["hf_full"] = root / "hf_full"
    _save_hf_folder(paths["hf_full"], converted, TINY_H, TINY_H.layers)
    paths["sd2_diffusers"] = root / "stable-diffusion-2-1"
    cut = {k: v for k, v in converted.items() if f"layers.{TINY_H.layers - 1}." not in k}
    _save_hf_folder(paths["sd2_diffusers"] / "text_encoder", cut, TINY_H, TINY_H.layers - 1)
    paths["hf_file"] = root / "text_encoder.safetensors"
    # q, k and v are views of one in_proj tensor: safetensors 0.3 refuses tensors that share memory
    save_file({k: v.clone() for k, v in converted.items()}, str(paths["hf_file"]))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenize_matches_sd2_layout():
    ids = tokenize(["a photo of a cat"], pad_id=0)
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :9].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0]
    assert ids[0, 7:].eq(0).all()


def test_tokenize_truncates_with_eos_last_and_matches_open_clip():
    ids = tokenize(PROMPTS, pad_id=0)
    assert torch.equal(ids, open_clip.tokenize(PROMPTS))
    assert ids[2, -1].item() == te.EOS_ID and ids[2].ne(0).all()


def test_tokenize_clip_l_pads_with_eos():
    ids = tokenize(["a photo of a cat"], pad_id=te.CLIP_L_PAD_ID)
    assert ids[0, 6:].eq(49407).all() and ids[0, 5].item() == 2368


# Frozen from transformers 4.30.2's slow CLIPTokenizer by tests/make_token_reference.py (named and random prompts).
TOKEN_REFERENCE = json.loads((Path(__file__).parent / "data" / "clip_token_ids.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("tokenizer, pad_id", [("sd2", te.OPENCLIP_PAD_ID), ("clip_l", te.CLIP_L_PAD_ID)])
def test_tokenize_equals_the_official_tokenizer(tokenizer, pad_id):
    """SD 2.x / SDXL tokenizer_2 (pad "!", special: every "!" is id 0) and CLIP-L (pad <|endoftext|>)."""
    assert TOKEN_REFERENCE["pad_ids"][tokenizer] == pad_id
    cases = TOKEN_REFERENCE["cases"]
    ids = tokenize([case["prompt"] for case in cases], pad_id=pad_id)
    wrong = [case["prompt"] for case, row in zip(cases, ids.tolist(), strict=True)
             if row != case[tokenizer] + [pad_id] * (77 - len(case[tokenizer]))]
    assert wrong == [], f"{len(wrong)} of {len(cases)} prompts differ, first {wrong[0]!r}"


def test_exclamation_marks_are_the_pad_token_for_openclip_h():
    prompt = "Hello World!!! what a view!"
    sd2 = tokenize([prompt], pad_id=te.OPENCLIP_PAD_ID)[0]
    assert sd2[:11].tolist() == [49406, 3306, 1002, 0, 0, 0, 768, 320, 1093, 0, 49407]
    assert (sd2 != open_clip.tokenize([prompt])[0]).sum() == 7  # open_clip: "!!!" 995, "!" 256
    clip_l = tokenize([prompt], pad_id=te.CLIP_L_PAD_ID)[0]
    assert clip_l[:9].tolist() == [49406, 3306, 1002, 995, 768, 320, 1093, 256, 49407]


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP ViT-H (SD2 style)


def test_key_conversion_matches_transformers_model(oc_model, ids, expected):
    converted = openclip_to_transformers({SD2_PREFIX + k: v for k, v in oc_model.state_dict().items()}, SD2_PREFIX)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in converted
    assert not any("visual" in k or "text_projection" in k or "logit_scale" in k for k in converted)
    model = _hf_model(TINY_H, TINY_H.layers)
    _load_file_names(model, converted)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).last_hidden_state, expected["last"], atol=1e-5)


@pytest.mark.parametrize("layout", ["open_clip", "sd2", "hf_full", "hf_file", "sd2_diffusers", "memory", "memory_hf"])
def test_penultimate_matches_open_clip(layout, files, oc_model, expected):
    if layout == "memory":
        source = oc_model.state_dict()
    elif layout == "memory_hf":
        source = openclip_to_transformers(oc_model.state_dict())
    else:
        source = files[layout]
    encoder = load_openclip_text_encoder(source, spec=TINY_H)
    assert isinstance(encoder, OpenCLIPTextEncoder)
    assert (encoder.kind, encoder.width, encoder.max_length, encoder.layer) == ("openclip-h", 64, 77, "penultimate")
    assert encoder.model.config.num_hidden_layers == TINY_H.layers - 1  # the unused last block is not kept
    assert torch.allclose(encoder.encode(PROMPTS), expected["penultimate"], atol=1e-5)


@pytest.mark.parametrize("layout", ["open_clip", "sd2", "hf_full", "memory"])
def test_last_layer_matches_open_clip(layout, files, oc_model, expected):
    source = oc_model.state_dict() if layout == "memory" else files[layout]
    encoder = load_openclip_text_encoder(source, layer="last", spec=TINY_H)
    assert torch.allclose(encoder.encode(PROMPTS), expected["last"], atol=1e-5)


def test_sd2_checkpoint_reads_only_text_encoder_tensors(files, monkeypatch):
    read_names = []
    open_files = te._safetensors_files

    def recording(name, paths):
        tensors = open_files(name, paths)
        read = tensors.read
        tensors.read = lambda names: read_names.extend(names) or read(names)
        return tensors

    monkeypatch.setattr(te, "_safetensors_files", recording)
    load_openclip_text_encoder(files["sd2"], spec=TINY_H)
    assert read_names and all(name.startswith(SD2_PREFIX) for name in read_names)
    assert not any(f"resblocks.{TINY_H.layers - 1}." in name for name in read_names)


def test_state_dict_is_copied(oc_model, expected):
    state = {k: v.clone() for k, v in oc_model.state_dict().items()}
    encoder = load_openclip_text_encoder(state, spec=TINY_H)
    state["ln_final.weight"].mul_(3.0)  # the WebUI patches its weights in place (LoRA)
    assert torch.allclose(encoder.encode(PROMPTS), expected["penultimate"], atol=1e-5)


def test_to_and_dtype(files, expected):
    encoder = load_openclip_text_encoder(files["open_clip"], spec=TINY_H, dtype=torch.float16)
    assert encoder.dtype == torch.float16 and encoder.device.type == "cpu"
    assert encoder.to(dtype=torch.float64) is encoder and encoder.dtype == torch.float64
    out = encoder.encode(PROMPTS[:1])
    assert out.dtype == torch.float64 and torch.allclose(out.float(), expected["penultimate"][:1], atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loads_on_torch_2_0_without_assign(as_on_torch_2_0, files, dtype):
    """A1111 1.6/1.7 run torch 2.0, whose load_state_dict has no ``assign``: the same encoder, weights copied in."""
    assigned = load_openclip_text_encoder(files["open_clip"], spec=TINY_H, dtype=dtype)
    as_on_torch_2_0()
    copied = load_openclip_text_encoder(files["open_clip"], spec=TINY_H, dtype=dtype)
    assert copied.dtype == dtype and copied.device.type == "cpu"
    assert torch.equal(copied.encode(PROMPTS), assigned.encode(PROMPTS))


# ---------------------------------------------------------------------------------------------------------------
# SDXL mixclip


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    torch.manual_seed(3)
    clip_l = _randomize(_hf_model(TINY_L, TINY_L.layers), seed=3)
    clip_g = _openclip_model(TINY_G, seed=4)
    l_state = _file_names(clip_l.state_dict())
    l_state.setdefault("text_model.embeddings.position_ids", torch.arange(77).expand(1, -1))
    checkpoint = {
        **{SDXL_L_PREFIX + k: v.contiguous() for k, v in l_state.items()},
        **{SDXL_G_PREFIX + k: v.contiguous() for k, v in _text_state(clip_g).items()},
        **UNRELATED,
    }
    root = tmp_path_factory.mktemp("sdxl")
    save_file(checkpoint, str(root / "sdxl.safetensors"))
    _save_hf_folder(root / "diffusers" / "text_encoder", l_state, TINY_L, TINY_L.layers)
    _save_hf_folder(root / "diffusers" / "text_encoder_2", openclip_to_transformers(clip_g.state_dict()), TINY_G, 3)
    ids_g = open_clip.tokenize(PROMPTS)
    ids_l = ids_g.masked_fill(ids_g == 0, 49407)  # SDXL's first tokenizer pads with <|endoftext|>
    with torch.no_grad():
        l_features = clip_l(input_ids=ids_l, output_hidden_states=True).hidden_states[-2]
    g_features = _openclip_reference(clip_g, ids_g, blocks_skipped=1, final_norm=False)
    return {"checkpoint": checkpoint, "root": root, "expected": torch.cat([l_features, g_features], dim=-1)}


@pytest.mark.parametrize("layout", ["checkpoint_file", "diffusers", "memory"])
def test_mixclip_matches_direct_computation(layout, sdxl):
    source = {
        "checkpoint_file": sdxl["root"] / "sdxl.safetensors",
        "diffusers": sdxl["root"] / "diffusers",
        "memory": sdxl["checkpoint"],
    }[layout]
    encoder = load_mixclip_text_encoder(source, specs=(TINY_L, TINY_G))
    assert isinstance(encoder, MixClipTextEncoder)
    assert (encoder.kind, encoder.width, encoder.max_length) == ("sdxl-mixclip", 48 + 80, 77)
    assert torch.allclose(encoder.encode(PROMPTS), sdxl["expected"], atol=1e-5)


def test_mixclip_loads_on_torch_2_0_without_assign(as_on_torch_2_0, sdxl):
    assigned = load_mixclip_text_encoder(sdxl["checkpoint"], specs=(TINY_L, TINY_G))
    as_on_torch_2_0()
    copied = load_mixclip_text_encoder(sdxl["checkpoint"], specs=(TINY_L, TINY_G))
    assert torch.equal(copied.encode(PROMPTS), assigned.encode(PROMPTS))


def test_mixclip_refuses_sd2_checkpoint(files):
    with pytest.raises(TextEncoderError, match="SDXL.s own CLIP-L and OpenCLIP bigG"):
        load_mixclip_text_encoder(files["sd2"], specs=(TINY_L, TINY_G))


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(TextEncoderError, match="does not exist"):
        load_openclip_text_encoder(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_refused(tmp_path, suffix):
    path = tmp_path / ("model" + suffix)
    path.write_bytes(b"not read")
    with pytest.raises(TextEncoderError, match="pickle"):
        load_openclip_text_encoder(path)


def test_folder_with_only_pickle_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(TextEncoderError, match="pickle"):
        load_openclip_text_encoder(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(TextEncoderError, match="no model.safetensors"):
        load_openclip_text_encoder(tmp_path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(TextEncoderError, match="truncated or corrupt"):
        load_openclip_text_encoder(path)


def test_sd15_checkpoint_explains_where_to_get_openclip(tmp_path):
    clip_l = {
        "cond_stage_model.transformer." + k: v.contiguous()
        for k, v in _file_names(_hf_model(TINY_L, 2).state_dict()).items()
    }
    path = tmp_path / "sd15.safetensors"
    save_file({**clip_l, **UNRELATED}, str(path))
    with pytest.raises(TextEncoderError, match="stable-diffusion-2-1") as error:
        load_openclip_text_encoder(path, spec=TINY_H)
    assert str(path) in str(error.value) and "48-wide" in str(error.value)


def test_file_without_text_encoder(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(UNRELATED, str(path))
    with pytest.raises(TextEncoderError, match="holds no CLIP text encoder"):
        load_openclip_text_encoder(path)


@pytest.mark.parametrize("width, name", [(768, "CLIP ViT-L/14"), (1280, "bigG")])
def test_wrong_width_named(width, name):
    shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width)}
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}  # refused before any read
    with pytest.raises(TextEncoderError, match=f"{width}-wide text encoder .*{name}"):
        load_openclip_text_encoder(state)


def test_missing_key_named(oc_model):
    state = dict(oc_model.state_dict())
    del state["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(TextEncoderError, match=r"lacks text-encoder weight 'encoder\.layers\.1\.mlp\.fc1\.bias'"):
        load_openclip_text_encoder(state, spec=TINY_H)


def test_unexpected_key_named(oc_model):
    state = {**oc_model.state_dict(), "transformer.resblocks.0.ls_1.gamma": torch.ones(64)}
    with pytest.raises(TextEncoderError, match="unexpected text-encoder weight 'transformer.resblocks.0.ls_1.gamma'"):
        load_openclip_text_encoder(state, spec=TINY_H)


def test_wrong_shape_named(oc_model):
    spec = TowerSpec("narrow MLP", width=64, layers=3, heads=4, intermediate=128, hidden_act="gelu")
    with pytest.raises(TextEncoderError, match="'encoder.layers.0.mlp.fc1.weight' has shape"):
        load_openclip_text_encoder(oc_model.state_dict(), spec=spec)


def test_wrong_depth(oc_model):
    spec = TowerSpec("deeper", width=64, layers=6, heads=4, intermediate=256, hidden_act="gelu")
    with pytest.raises(TextEncoderError, match="with 3 blocks"):
        load_openclip_text_encoder(oc_model.state_dict(), spec=spec)


def test_last_layer_needs_complete_tower(files):
    with pytest.raises(TextEncoderError, match="layer='last' cannot be computed"):
        load_openclip_text_encoder(files["sd2_diffusers"], layer="last", spec=TINY_H)


def test_unknown_layer(files):
    with pytest.raises(TextEncoderError, match="penultimate, last"):
        load_openclip_text_encoder(files["open_clip"], layer="middle", spec=TINY_H)


# ---------------------------------------------------------------------------------------------------------------
# Prompt cache


class CountingEncoder:
    kind, width, max_length = "counting", 2, 77
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self):
        self.calls = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return torch.stack([torch.full((77, 2), float(len(p))) + torch.tensor([0.0, ord(p[0])]) for p in prompts])


def test_cache_encodes_misses_once_in_one_batch():
    encoder = CountingEncoder()
    cache = PromptEmbeddingCache(encoder)
    first = cache.encode(["a", "bb", "a"])
    assert encoder.calls == [["a", "bb"]]
    assert torch.equal(first, encoder.encode(["a", "bb", "a"]))
    encoder.calls.clear()
    second = cache.encode(["ccc", "bb"])
    assert encoder.calls == [["ccc"]] and torch.equal(second[1], first[1]) and second[0, 0, 0].item() == 3.0
    assert (cache.kind, cache.width, cache.max_length) == ("counting", 2, 77)


def test_cache_evicts_least_recently_used():
    encoder = CountingEncoder()
    cache = PromptEmbeddingCache(encoder, maxsize=2)
    cache.encode(["a", "b"])
    cache.encode(["a"])  # "b" is now the least recently used
    cache.encode(["c"])
    encoder.calls.clear()
    cache.encode(["a", "c", "b"])
    assert encoder.calls == [["b"]] and len(cache) == 2


def test_cache_keys_on_dtype():
    encoder = CountingEncoder()
    cache = PromptEmbeddingCache(encoder)
    cache.encode(["a"])
    encoder.dtype = torch.float16
    cache.encode(["a"])
    cache.encode(["a"])
    assert encoder.calls == [["a"], ["a"]] and len(cache) == 2


def test_cache_with_real_encoder(files, expected):
    cache = PromptEmbeddingCache(load_openclip_text_encoder(files["open_clip"], spec=TINY_H))
    assert torch.allclose(cache.encode(PROMPTS[::-1]), expected["penultimate"].flip(0), atol=1e-5)
    assert torch.allclose(cache.encode(PROMPTS), expected["penultimate"], atol=1e-5)
