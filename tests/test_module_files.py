"""Module files: released folder / lone safetensors loading, latent space, hash, discovery, cache, save, bad input."""

import hashlib
import json
import struct

import pytest
import torch

import lib_oms.module_files as modules
from lib_oms.errors import LatentSpaceError, ModuleFileError
from lib_oms.module_files import (
    ModuleEntry,
    check_latent_space,
    describe_module,
    find_modules,
    latent_space_from_name,
    load_module,
    read_safetensors_header,
    save_module,
    short_hash,
)
from tests.factories import (
    oms_s_config,
    random_state_dict,
    reference_unet,
    tiny_inputs,
    tiny_unet_config,
    write_lone_safetensors,
    write_released_folder,
    write_sidecar,
)


@pytest.fixture(scope="module")
def tiny():
    """A tiny OMS-B-shaped config with a 1024-d text width (the released OpenCLIP-H width) and its weights."""
    config = tiny_unet_config(cross_attention_dim=1024)
    return config, random_state_dict(config, seed=3)


def same_output(module, config, state) -> bool:
    sample, context = tiny_inputs(config, 9, 7)
    with torch.no_grad():
        return torch.equal(module.unet(sample, context), reference_unet(config, state)(sample, context))


# --- loading ------------------------------------------------------------------------------------------------


def test_released_folder_loads_and_matches_the_reference(tmp_path, tiny):
    config, state = tiny
    folder = write_released_folder(tmp_path, "oms_b_openclip_15_21", config, state)
    module = load_module(folder)
    assert same_output(module, config, state)
    assert (module.name, module.path, module.latent_space, module.text_encoder) == (
        "oms_b_openclip_15_21", folder, "sd", "openclip-h")
    assert module.weights_path == folder / "oms_module" / "diffusion_pytorch_model.safetensors"
    assert module.text_width == 1024 and module.dtype == torch.float32 and module.device == torch.device("cpu")
    assert not module.unet.training and not any(p.requires_grad for p in module.unet.parameters())
    assert module.config["attention_head_dim"] == [1, 2, 2]


def test_the_oms_module_subfolder_itself_loads(tmp_path, tiny):
    folder = write_released_folder(tmp_path, "oms_b_openclip_xl", *tiny)
    module = load_module(folder / "oms_module")
    assert module.name == "oms_b_openclip_xl" and module.latent_space == "sdxl"


@pytest.mark.parametrize(
    "files, dtype, chosen, loaded_dtype",
    [
        ("both", torch.float16, "diffusion_pytorch_model.fp16.safetensors", torch.float16),
        ("both", torch.float32, "diffusion_pytorch_model.safetensors", torch.float32),
        ("both", torch.bfloat16, "diffusion_pytorch_model.safetensors", torch.bfloat16),
        ("fp16", torch.float32, "diffusion_pytorch_model.fp16.safetensors", torch.float32),
        ("fp32", torch.float16, "diffusion_pytorch_model.safetensors", torch.float16),
    ],
)
def test_weights_variant_choice(tmp_path, tiny, files, dtype, chosen, loaded_dtype):
    folder = write_released_folder(tmp_path, "oms_sd15", *tiny, fp16=files == "fp16", both_precisions=files == "both")
    module = load_module(folder, dtype=dtype)
    assert module.weights_path.name == chosen and module.dtype == loaded_dtype


def test_module_to_moves_in_place(tmp_path, tiny):
    module = load_module(write_released_folder(tmp_path, "oms_sd15", *tiny))
    assert module.to("cpu", torch.bfloat16) is module and module.dtype == torch.bfloat16


def test_lone_safetensors_with_config_in_metadata(tmp_path, tiny):
    config, state = tiny
    path = write_lone_safetensors(tmp_path / "oms_tiny_sd15.safetensors", state, config)
    module = load_module(path)
    assert same_output(module, config, state)
    assert (module.name, module.path, module.weights_path, module.latent_space) == (
        "oms_tiny_sd15", path, path, "sd")


def test_lone_safetensors_without_config_infers_a_paper_size(tmp_path):
    config = oms_s_config(cross_attention_dim=2048)
    state = random_state_dict(config)
    module = load_module(write_lone_safetensors(tmp_path / "custom.safetensors", state))
    assert same_output(module, config, state)
    assert (module.latent_space, module.text_encoder) == ("sdxl", "sdxl-mixclip")  # from the 2048 width


def test_lone_safetensors_with_sidecar_config(tmp_path, tiny):
    config, state = tiny
    path = write_lone_safetensors(tmp_path / "custom.safetensors", state)
    write_sidecar(path, unet_config=config, latent_space="sd", text_encoder="my-encoder")
    module = load_module(path)
    assert same_output(module, config, state)
    assert (module.latent_space, module.text_encoder) == ("sd", "my-encoder")


# --- latent space and text encoder --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [("oms_b_openclip_xl", "sdxl"), ("oms_b_mixclip_xl", "sdxl"), ("my-sdxl-oms", "sdxl"), ("oms_sd_xl", "sdxl"),
     ("oms_b_openclip_15_21", "sd"), ("oms_sd15", "sd"), ("oms-sd21", "sd"), ("oms_sd1.5", "sd"), ("sd2_oms", "sd"),
     ("oms_pixel", None), ("oms_b", None), ("oms_sd35", None), ("xlarge", None)],
)
def test_latent_space_from_name(name, expected):
    assert latent_space_from_name(name) == expected


def test_latent_space_sources_in_order(tmp_path, tiny):
    config, state = tiny
    folder = write_released_folder(tmp_path, "oms_b_openclip_xl", config, state, latent_space="custom-vae",
                                   text_encoder="t5")
    module = load_module(folder)
    assert (module.latent_space, module.text_encoder) == ("custom-vae", "t5")  # model_index beats the name
    write_sidecar(folder, latent_space="sd")
    assert load_module(folder).latent_space == "sd"  # the sidecar beats model_index
    lone = write_lone_safetensors(tmp_path / "plain.safetensors", state, config, metadata={"latent_space": "sdxl"})
    assert load_module(lone).latent_space == "sdxl"  # safetensors metadata
    unnamed = load_module(write_lone_safetensors(tmp_path / "plain2.safetensors", state, config))
    assert (unnamed.latent_space, unnamed.text_encoder) == ("unknown", "openclip-h")


def test_check_latent_space(tmp_path, tiny):
    module = load_module(write_released_folder(tmp_path, "oms_b_openclip_15_21", *tiny))
    check_latent_space(module, "sd")
    with pytest.raises(LatentSpaceError) as error:
        check_latent_space(module, "sdxl")
    message = str(error.value)
    assert str(module.path) in message and "'sd' latent space" in message and "oms_b_openclip_xl" in message


def test_check_latent_space_unknown_says_how_to_declare_it(tmp_path, tiny):
    config, state = tiny
    module = load_module(write_lone_safetensors(tmp_path / "mystery.safetensors", state, config))
    with pytest.raises(LatentSpaceError) as error:
        check_latent_space(module, "sdxl")
    assert str(tmp_path / "mystery.json") in str(error.value) and '"latent_space": "sdxl"' in str(error.value)


# --- hash, discovery, cache -----------------------------------------------------------------------------------


def test_short_hash_is_the_sha256_prefix_and_computed_once(tmp_path, tiny, monkeypatch):
    path = write_lone_safetensors(tmp_path / "h.safetensors", tiny[1], tiny[0])
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert short_hash(path) == expected and len(expected) == 10
    calls = []
    monkeypatch.setattr(modules.hashlib, "sha256", lambda: calls.append(1))
    assert short_hash(path) == expected and load_module(path).short_hash == expected and not calls


def test_find_modules(tmp_path, tiny):
    first, second = tmp_path / "webui_models", tmp_path / "extension_models"
    write_released_folder(first, "oms_b_openclip_xl", *tiny)
    write_lone_safetensors(first / "Alpha.safetensors", tiny[1])
    write_lone_safetensors(second / "Alpha.safetensors", tiny[1])
    (first / "not_a_module").mkdir()
    (first / "half_downloaded" / "oms_module").mkdir(parents=True)
    (first / "notes.txt").write_text("x")
    (first / "old.ckpt").write_bytes(b"x")
    (first / ".hidden.safetensors").write_bytes(b"x")
    (first / "sd21_text_encoder.safetensors").write_bytes(b"x")  # a text encoder placed beside the modules
    (first / ".oms-download" / "oms_b_openclip_15_21" / "oms_module").mkdir(parents=True)  # a download under way
    found = find_modules([first, second, first, tmp_path / "missing"])
    assert found == [
        ModuleEntry("Alpha", first / "Alpha.safetensors"),
        ModuleEntry("Alpha (extension_models)", second / "Alpha.safetensors"),
        ModuleEntry("half_downloaded", first / "half_downloaded"),
        ModuleEntry("oms_b_openclip_xl", first / "oms_b_openclip_xl"),
    ]


def test_find_modules_leaves_out_text_encoders_and_other_models(tmp_path, tiny):
    """models/README.md suggests models/oms/sd21_text_encoder.safetensors: it is a text encoder, not a module."""
    folder = tmp_path / "oms"
    write_lone_safetensors(folder / "oms_tiny_15_21.safetensors", tiny[1], tiny[0])
    text_tensors = {"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}
    write_lone_safetensors(folder / "sd21_text_encoder.safetensors", text_tensors)
    write_lone_safetensors(folder / "open_clip_vit_h14.safetensors", text_tensors)  # no OMS network inside
    (folder / "text_encoder").mkdir()
    write_lone_safetensors(folder / "text_encoder" / "model.safetensors", text_tensors)
    (folder / "truncated.safetensors").write_bytes(b"\x10")  # unreadable: listed, so loading it says why
    assert [entry.name for entry in find_modules([folder])] == ["oms_tiny_15_21", "truncated"]


def test_describe_module_reads_no_tensor(tmp_path, tiny, monkeypatch):
    config, state = tiny
    named = write_released_folder(tmp_path, "oms_b_openclip_xl", config, state)
    indexed = write_released_folder(tmp_path, "plain_folder", config, state, latent_space="sd",
                                    text_encoder="openclip-h")
    lone = write_lone_safetensors(tmp_path / "plain.safetensors", state, config, metadata={"latent_space": "sdxl"})
    sidecar = write_lone_safetensors(tmp_path / "other.safetensors", state, config)
    write_sidecar(sidecar, latent_space="custom")
    monkeypatch.setattr(modules, "load_file", lambda *args, **kwargs: pytest.fail("tensors were read"))
    described = {path: describe_module(path) for path in (named, indexed, lone, sidecar)}
    assert {path: (d.latent_space, d.text_encoder) for path, d in described.items()} == {
        named: ("sdxl", "openclip-h"), indexed: ("sd", "openclip-h"), lone: ("sdxl", "openclip-h"),
        sidecar: ("custom", "openclip-h")}
    assert (described[named].name, described[named].path) == ("oms_b_openclip_xl", named)
    with pytest.raises(LatentSpaceError, match="made for the 'sdxl' latent space"):
        check_latent_space(described[named], "sd")  # a module that cannot serve is refused before it is loaded


# --- saving ---------------------------------------------------------------------------------------------------


def test_save_module_round_trip(tmp_path, tiny):
    config, state = tiny
    folder = save_module(tmp_path / "oms_new", reference_unet(config, state), config, latent_space="sdxl",
                         text_encoder="openclip-h", extra_index={"trained_steps": 10})
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OMSPipeline" and index["oms_module"][1] == "UNet2DConditionWoCTModel"
    assert (index["latent_space"], index["text_encoder"], index["trained_steps"]) == ("sdxl", "openclip-h", 10)
    assert index["oms_text_encoder"] == ["transformers", "CLIPTextModel"]
    saved_config = json.loads((folder / "oms_module" / "config.json").read_text())
    assert saved_config["_class_name"] == "UNet2DConditionWoCTModel"
    assert saved_config["block_out_channels"] == [16, 32, 32] and "layers_per_block" in saved_config
    module = load_module(folder)
    assert same_output(module, config, state) and module.latent_space == "sdxl"
    # the weights file alone describes itself
    lone = load_module(folder / "oms_module" / "diffusion_pytorch_model.safetensors")
    assert (lone.latent_space, lone.text_encoder) == ("sdxl", "openclip-h") and same_output(lone, config, state)


def test_save_module_fp16_and_overwrite(tmp_path, tiny):
    config, state = tiny
    folder = save_module(tmp_path / "m", state, config, latent_space="sd", text_encoder="openclip-h")
    with pytest.raises(ModuleFileError) as error:
        save_module(folder, state, config, latent_space="sd", text_encoder="openclip-h")
    assert str(folder) in str(error.value) and "overwrite=True" in str(error.value)
    save_module(folder, state, config, latent_space="sd", text_encoder="openclip-h", fp16=True, overwrite=True)
    weights = sorted(p.name for p in (folder / "oms_module").iterdir() if p.suffix == ".safetensors")
    assert weights == ["diffusion_pytorch_model.fp16.safetensors"]  # no stale fp32 file left behind
    assert load_module(folder).weights_path.name == "diffusion_pytorch_model.fp16.safetensors"


def test_save_module_into_an_empty_existing_folder(tmp_path, tiny):
    """An empty folder that already exists is not refused as "already exists": the module is written into that very
    folder (not beside it, not nested) and loads back as the network it was saved from."""
    config, state = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_module(empty, state, config, latent_space="sd", text_encoder="openclip-h") == empty
    assert sorted(p.relative_to(empty).as_posix() for p in empty.rglob("*") if p.is_file()) == [
        "model_index.json", "oms_module/config.json", "oms_module/diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    module = load_module(empty)
    assert (module.path, module.latent_space, module.text_encoder) == (empty, "sd", "openclip-h")
    assert same_output(module, config, state)


def test_save_module_checks_the_state_dict_against_the_config(tmp_path, tiny):
    config, state = tiny
    with pytest.raises(ModuleFileError, match="'conv_in.weight'"):
        save_module(tmp_path / "m", {k: v for k, v in state.items() if k != "conv_in.weight"}, config,
                    latent_space="sd", text_encoder="openclip-h")
    assert not (tmp_path / "m").exists()


# --- bad input: one test each; nothing heavy may run before the error -------------------------------------------


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if tensors are read or the network is built before the error."""

    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work before validation")

    monkeypatch.setattr(modules, "load_file", forbidden)
    monkeypatch.setattr(modules.OMSUNet, "from_state_dict", forbidden)


def raises_naming(path, remedy, error_type=ModuleFileError):
    """pytest.raises that also checks the message names ``path`` and contains ``remedy``."""

    class Check:
        def __enter__(self):
            self.context = pytest.raises(error_type)
            self.info = self.context.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self.context.__exit__(*exc)
            message = str(self.info.value)
            assert str(path) in message, message
            assert remedy in message, message
            return suppressed

    return Check()


def weights_of(folder):
    return folder / "oms_module" / "diffusion_pytorch_model.safetensors"


def test_missing_path(tmp_path, no_heavy_work):
    with raises_naming(tmp_path / "nope", "put the OMS module there"):
        load_module(tmp_path / "nope")


def test_folder_without_config(tmp_path, tiny, no_heavy_work):
    folder = write_released_folder(tmp_path, "m", *tiny)
    (folder / "oms_module" / "config.json").unlink()
    with raises_naming(folder, "download the whole module folder"):
        load_module(folder)


def test_folder_without_weights(tmp_path, tiny, no_heavy_work):
    folder = write_released_folder(tmp_path, "m", *tiny)
    weights_of(folder).unlink()
    with raises_naming(folder / "oms_module", "download the weights into this folder"):
        load_module(folder)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_file_refused(tmp_path, no_heavy_work, suffix):
    path = tmp_path / f"oms{suffix}"
    path.write_bytes(b"\x80\x02}q\x00.")
    with raises_naming(path, "use the released .safetensors"):
        load_module(path)


def test_pickle_only_folder_refused(tmp_path, tiny, no_heavy_work):
    folder = write_released_folder(tmp_path, "m", *tiny)
    weights_of(folder).rename(folder / "oms_module" / "diffusion_pytorch_model.bin")
    with raises_naming(folder / "oms_module" / "diffusion_pytorch_model.bin", "can run arbitrary code"):
        load_module(folder)


def test_truncated_download(tmp_path, tiny, no_heavy_work):
    folder = write_released_folder(tmp_path, "m", *tiny)
    weights = weights_of(folder)
    full = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(full // 2)
    with raises_naming(weights, f"the file is truncated ({full // 2} of {full} bytes): download it again"):
        load_module(folder)


def test_truncated_inside_the_header(tmp_path, tiny, no_heavy_work):
    path = write_lone_safetensors(tmp_path / "m.safetensors", tiny[1], tiny[0])
    path.write_bytes(path.read_bytes()[:100])
    with raises_naming(path, "the file is truncated (100 of at least"):
        load_module(path)


def raw_safetensors(header: dict, data_bytes: int) -> bytes:
    """A hand-made safetensors file: 8-byte little-endian header length, JSON header, ``data_bytes`` zero bytes."""
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + b"\0" * data_bytes


@pytest.mark.parametrize(
    "content, why",
    [
        (b"\xff" * 64, "header length"),
        (struct.pack("<Q", 4) + b"{{{{", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4),
         "has 4 bytes for shape [2]"),
        (raw_safetensors({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, 4), "bad header entry"),
        (raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 9), "5 unexpected bytes"),
        (raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"k": 1}}, 4),
         "__metadata__"),
    ],
    ids=["length", "json", "array", "offsets", "dtype", "trailing", "metadata"],
)
def test_corrupt_safetensors(tmp_path, no_heavy_work, content, why):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with raises_naming(path, why):
        load_module(path)
    assert "download it again" in str(pytest.raises(ModuleFileError, read_safetensors_header, path).value)


def test_non_float_weights(tmp_path, tiny, no_heavy_work):
    config, state = tiny
    path = write_lone_safetensors(tmp_path / "m.safetensors", {**state, "conv_in.bias": state["conv_in.bias"].int()},
                                  config)
    with raises_naming(path, "'conv_in.bias' is I32, not a float type"):
        load_module(path)


def test_invalid_config_json(tmp_path, tiny, no_heavy_work):
    folder = write_released_folder(tmp_path, "m", *tiny)
    config_path = folder / "oms_module" / "config.json"
    config_path.write_text('{"block_out_channels": [16, 32, 32],')
    with raises_naming(config_path, "invalid JSON in the module config"):
        load_module(folder)


def test_invalid_sidecar_json(tmp_path, tiny, no_heavy_work):
    folder = write_released_folder(tmp_path, "m", *tiny)
    (tmp_path / "m.json").write_text("latent_space: sdxl")
    with raises_naming(tmp_path / "m.json", "invalid JSON in the sidecar"):
        load_module(folder)


def test_invalid_metadata_config(tmp_path, tiny, no_heavy_work):
    path = write_lone_safetensors(tmp_path / "m.safetensors", tiny[1], metadata={"oms_config": "{not json"})
    with raises_naming(path, "re-save the module"):
        load_module(path)


def test_unknown_block_type(tmp_path, tiny, no_heavy_work):
    config, state = tiny
    folder = write_released_folder(tmp_path, "m", {**config, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, state)
    with raises_naming(folder / "oms_module" / "config.json", "unknown mid block type"):
        load_module(folder)


def test_missing_keys(tmp_path, tiny, no_heavy_work):
    config, state = tiny
    dropped = {k: v for k, v in state.items() if not k.startswith("conv_out")}
    folder = write_released_folder(tmp_path, "m", config, dropped)
    with raises_naming(weights_of(folder), "2 key(s) missing from the weights, first 'conv_out.weight'"):
        load_module(folder)


def test_unexpected_keys(tmp_path, tiny, no_heavy_work):
    config, state = tiny
    extra = {**state, "time_embedding.linear_1.weight": torch.zeros(4, 16),
             "down_blocks.0.resnets.0.time_emb_proj.weight": torch.zeros(16, 4)}
    folder = write_released_folder(tmp_path, "m", config, extra)
    first = "down_blocks.0.resnets.0.time_emb_proj.weight"  # safetensors stores keys sorted
    with raises_naming(weights_of(folder), f"2 unexpected key(s) in the weights, first '{first}'") as error:
        load_module(folder)
    assert "a UNet with time conditioning, not an OMS module" in str(error.value)


def test_wrong_shape(tmp_path, tiny, no_heavy_work):
    config, state = tiny
    folder = write_released_folder(tmp_path, "m", {**config, "cross_attention_dim": 768}, state)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with raises_naming(weights_of(folder), f"tensor '{key}' has shape (32, 1024) but the config needs (32, 768)"):
        load_module(folder)


def test_not_a_module_file(tmp_path, no_heavy_work):
    path = tmp_path / "notes.txt"
    path.write_text("x")
    with raises_naming(path, "expected a .safetensors file or a module folder"):
        load_module(path)


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite(tmp_path, tiny, monkeypatch, fp16, bad):
    """A corrupt file whose header is sound: only its values tell, so the check runs on the read tensors, before the
    network is built (in the WebUI, NaN weights would otherwise surface as the WebUI's own NaN error in its UNet)."""
    config, state = tiny
    key = "up_blocks.1.attentions.0.proj_out.weight"
    broken = {**state, key: state[key].clone().index_fill_(0, torch.tensor([3]), bad)}
    folder = write_released_folder(tmp_path, "m", config, broken, fp16=fp16)
    monkeypatch.setattr(modules.OMSUNet, "from_state_dict", lambda *a, **k: pytest.fail("built from bad weights"))
    weights = folder / "oms_module" / ("diffusion_pytorch_model.fp16.safetensors" if fp16 else "diffusion_pytorch_model"
                                       ".safetensors")
    with raises_naming(weights, f"tensor '{key}' holds NaN or infinite values"):
        load_module(folder, dtype=torch.float16 if fp16 else torch.float32)
