"""The helper scripts of the real-WebUI tests (tests/webui/), checked without a WebUI."""

import os
import sys
from pathlib import Path

import pytest

from lib_oms.module_files import describe_module, find_modules, load_module
from tests.factories import tiny_unet_config
from tests.webui_fakes import ROOT

sys.path.insert(0, str(ROOT / "tests" / "webui"))
import seams_files  # noqa: E402


def test_seams_files_are_what_the_seam_tests_expect(tmp_path):
    webui = tmp_path / "webui"
    encoder = webui / "models" / "oms" / "text_encoder" / "model.safetensors"
    encoder.parent.mkdir(parents=True)
    encoder.write_bytes(b"the harness's text encoder")
    checkpoint = tmp_path / "sd15.safetensors"
    checkpoint.write_bytes(b"checkpoint")
    for _ in range(2):  # the harness may run it again on the same folder
        seams_files.main(["--webui", str(webui), "--checkpoint", str(checkpoint)])
    oms = webui / "models" / "oms"
    assert (oms / seams_files.TEXT_ENCODER_FILE).read_bytes() == encoder.read_bytes()
    assert [entry.name for entry in find_modules([oms])] == [seams_files.WIDTH_MISMATCH_MODULE]
    module_path = oms / seams_files.WIDTH_MISMATCH_MODULE
    described = describe_module(module_path)
    assert (described.latent_space, described.text_encoder) == ("sd", "openclip-h")  # what the files say ...
    assert load_module(module_path).text_width == tiny_unet_config()["cross_attention_dim"] == 32  # ... and read
    refiner = webui / "models" / "Stable-diffusion" / f"{seams_files.REFINER}.safetensors"
    assert refiner.read_bytes() == b"checkpoint"


def test_seams_files_need_the_text_encoder_in_place(tmp_path):
    with pytest.raises(SystemExit, match="text_encoder"):
        seams_files.write(tmp_path, tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# sdxl_end_to_end.py (the checkpoint's key names against A1111's SDXL config need sgm: its "keys" command)

import sdxl_end_to_end  # noqa: E402


def test_streamed_checkpoint_is_a_safetensors_file_with_every_tensor(tmp_path):
    import torch
    from safetensors.torch import load_file

    from lib_oms.module_files import read_safetensors_header

    model = torch.nn.Module()
    model.text = torch.nn.Module()
    model.text.embeddings = torch.nn.Embedding(5, 3)
    model.text.register_buffer("position_ids", torch.arange(7).expand(1, -1))
    model.proj = torch.nn.Linear(3, 4)
    model.norm = torch.nn.LayerNorm(4)
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    entries = sdxl_end_to_end.checkpoint_tensors(model)
    assert entries["text.position_ids"] == ((1, 7), torch.int64) and entries["proj.weight"] == ((4, 3), torch.float16)
    made = {}

    def make(name, shape, dtype):
        made[name] = sdxl_end_to_end.random_tensor(name, shape, dtype, torch.Generator().manual_seed(len(made)))
        return made[name]

    path = tmp_path / "x.safetensors"
    size = sdxl_end_to_end.write_safetensors_streaming(path, entries, make)
    assert size == path.stat().st_size and set(read_safetensors_header(path).shapes) == set(entries)
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[name], made[name]) for name in entries)
    assert torch.equal(loaded["text.position_ids"], torch.arange(7).expand(1, -1))
    assert loaded["norm.weight"].float().sub(1).abs().max() < 0.2 and loaded["proj.bias"].abs().max() < 0.2
    assert 0.3 < loaded["proj.weight"].float().std() * 3 ** 0.5 < 3  # ~ N(0, 1/fan_in)


def test_sdxl_end_to_end_arguments(tmp_path, monkeypatch):
    webui = tmp_path / "webui"
    (webui / sdxl_end_to_end.SDXL_CONFIG).parent.mkdir(parents=True)
    (webui / sdxl_end_to_end.SDXL_CONFIG).write_text("model: {}")
    monkeypatch.chdir(tmp_path)
    args = sdxl_end_to_end.parse_args(["--webui", "webui", "--python", "venv/bin/python", "--port", "7999"])
    assert (args.command, args.port, args.keep, args.work) == (None, 7999, False, tmp_path / "sdxl_end_to_end")
    # absolute, since the server runs in the WebUI's folder; a venv's python is a link and is not resolved
    assert (args.webui, args.python) == (webui, str(tmp_path / "venv" / "bin" / "python"))
    assert sdxl_end_to_end.parse_args(["build", "--webui", str(webui), "--out", "c.safetensors"]).command == "build"
    for bad in (["--webui", str(webui)], ["--webui", str(tmp_path), "--python", "py"]):
        with pytest.raises(SystemExit):
            sdxl_end_to_end.parse_args(bad)
    command = sdxl_end_to_end.server_command("py", tmp_path / "c.safetensors", 7999, tmp_path / "oms")
    assert command[:2] == ["py", "launch.py"] and "--oms-models-dir" in command and "--api" in command


def test_sdxl_end_to_end_modules_are_sdxl_modules(tmp_path, monkeypatch):
    from lib_oms.module_files import describe_module

    monkeypatch.setattr(sdxl_end_to_end, "MODULES", {"oms_tiny_openclip_xl": ("openclip-h", 1024),
                                                     "oms_tiny_mixclip_xl": ("sdxl-mixclip", 2048)})
    sdxl_end_to_end.write_modules(tmp_path, lambda width: tiny_unet_config(cross_attention_dim=width))
    assert [entry.name for entry in find_modules([tmp_path])] == ["oms_tiny_mixclip_xl", "oms_tiny_openclip_xl"]
    described = describe_module(tmp_path / "oms_tiny_mixclip_xl")
    assert (described.latent_space, described.text_encoder) == ("sdxl", "sdxl-mixclip")
    assert load_module(tmp_path / "oms_tiny_openclip_xl").text_width == 1024


# ---------------------------------------------------------------------------------------------------------------
# The fake prompt parser of tests/webui_fakes.py against the WebUI's own, read from the folder SD_WEBUI_DIR names (the
# real-WebUI runner, tests/webui/harness/run.py, sets it to the WebUI it was given)

PROMPTS = ["a photo of a cat", "a [b:3]", "a [b: 3] c", "a [b:.5] c", "a [b : c : 1] d", "a [b:c:0] d",
           "a[b:[c:d:2]:1]e", "[(a:2):3]", "[in foreground::0.6] x", "[a|(b:1.1)]", "[fe|]male",
           "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "cat BREAK dog", "a cat AND a dog :1.2",
           r"\(literal\) \[x\]", "a (unbalanced", "style: photo | raw", "(a:b)", "[day:night:0.01]", "(dark:1.3) cave"]


@pytest.fixture(scope="module")
def real_prompt_parser():
    import importlib.util

    webui = os.environ.get("SD_WEBUI_DIR")
    if not webui:
        pytest.skip("SD_WEBUI_DIR is not set: no WebUI source to compare the fake prompt parser with "
                    "(tests/webui/harness/run.py sets it)")
    path = Path(webui) / "modules" / "prompt_parser.py"
    if not path.is_file():
        pytest.fail(f"SD_WEBUI_DIR={webui} has no modules/prompt_parser.py")
    pytest.importorskip("lark", reason="the WebUI's prompt parser needs lark (pip install lark)")
    spec = importlib.util.spec_from_file_location("webui_prompt_parser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fake_prompt_parser_reads_the_first_step_as_the_webui(real_prompt_parser, prompt):
    from tests import webui_fakes as fake

    def first_step_words(parser):
        _, subprompts, _ = parser.get_multicond_prompt_list([prompt])
        steps = [parser.get_learned_conditioning_prompt_schedules([s], 20)[0][0][1] for s in subprompts]
        return subprompts, steps, ["".join(chunk for chunk, weight in parser.parse_prompt_attention(step)
                                           if (chunk, weight) != ("BREAK", -1)) for step in steps]

    assert first_step_words(fake) == first_step_words(real_prompt_parser)


# ---------------------------------------------------------------------------------------------------------------
# fakes_drift.py and the probe extension (tests/webui/probe/): what test_webui_fakes_match.py compares, on the fakes

import copy  # noqa: E402

import fakes_drift as drift  # noqa: E402

from tests.webui_fakes import FAKES_OWN, FAMILIES, REQUEST_FIELDS  # noqa: E402


@pytest.fixture(scope="module")
def fake_records(tmp_path_factory):
    return {family: drift.probe_the_fakes(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def every_drift(fake, host, family):
    read = drift.read_by_the_extension()
    return (drift.family_drift(family, host, FAMILIES) + drift.processing_drift(fake, host, read, REQUEST_FIELDS)
            + drift.sampler_and_model_drift(fake, host, read) + drift.shared_drift(fake, host, read)
            + drift.opts_drift(fake, host) + drift.modules_drift(fake, host, FAKES_OWN)
            + drift.manager_drift(fake, host) + drift.callbacks_drift(fake, host)
            + drift.script_and_xyz_drift(fake, host)
            + drift.elem_ids_drift(set(fake["elem_ids"]), set(host["elem_ids"])))


def test_the_extension_reads_what_the_fakes_must_offer():
    read = drift.read_by_the_extension()
    assert {"firstpass_image", "refiner_switch_at", "image_mask", "rng", "seeds"} <= read["p"]
    assert read["cmd_opts"] == {"oms_models_dir", "oms_no_download", "use_cpu"}
    assert read["state"] == {"interrupted", "skipped", "stopping_generation"}
    assert {"get_device_for", "dtype_unet", "torch_gc"} <= read["devices"]
    assert {"funcname", "get_sigmas", "get_timesteps", "model_wrap"} <= read["sampler"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_probe_in_the_fakes_records_their_family(fake_records, family):
    record = fake_records[family]
    assert every_drift(record, record, family) == []
    assert sorted(record["generations"]) == sorted(drift.GENERATIONS)
    assert record["generations"]["txt2img DDIM"]["sampler"]["timesteps"]
    assert "script_img2img_one_more_step_enabled-checkbox" in record["elem_ids"]


def test_drift_names_each_difference(fake_records):
    fake = fake_records["a1111"]
    host = copy.deepcopy(fake)
    del host["state"]["defaults"]["stopping_generation"]
    host["processing"]["img2img"]["values"]["inpainting_fill"] = 3
    host["generations"]["txt2img Euler a"]["p"].remove("firstpass_image")
    host["modules"]["names"]["modules.rng"].remove("ImageRNG")
    host["modules"]["present"]["modules.lowvram"] = False
    host["xyz"]["axis_option"] = host["xyz"]["axis_option"][:-1]  # a WebUI without prepare
    host["callbacks"]["by_one_more_step"].pop("callbacks_before_ui")
    host["opts"]["randn_source"] = "CPU"
    host["elem_ids"] = [i.replace("script_txt2img_", "script_") for i in host["elem_ids"]]
    lines = every_drift(fake, host, "a1111")
    for words in ("shared.state.stopping_generation: the fake has it, the WebUI does not",
                  "StableDiffusionProcessingImg2Img.inpainting_fill: the WebUI's default is 3, the fake's 0",
                  "p (txt2img Euler a, at the first draw).firstpass_image: the fake has it, the WebUI does not",
                  "modules.rng.ImageRNG: the fake has it, the WebUI does not",
                  "modules.lowvram: the WebUI lacks it, the fake has it",
                  "FAMILIES['a1111'].has_lowvram is True; the WebUI lacks modules.lowvram",
                  "AxisOption parameters", "callbacks One More Step registered",
                  "shared.opts['randn_source']: the WebUI's default is 'CPU', the fake's 'GPU'",
                  "element id 'script_one_more_step_cfg': the WebUI makes it, the fakes do not",
                  "element id 'script_txt2img_one_more_step_cfg': the fakes make it, the WebUI does not"):
        assert any(words in line for line in lines), (words, lines)
