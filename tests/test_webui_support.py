"""The helper scripts of the real-WebUI tests (tests/webui/), checked without a WebUI."""

import sys

import pytest

from lib_oms.modules import describe_module, find_modules, load_module
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
    assert describe_module(module_path) == ("sd", "openclip-h")  # what the files say ...
    assert load_module(module_path).text_width == tiny_unet_config()["cross_attention_dim"] == 32  # ... and read
    refiner = webui / "models" / "Stable-diffusion" / f"{seams_files.REFINER}.safetensors"
    assert refiner.read_bytes() == b"checkpoint"


def test_seams_files_need_the_text_encoder_in_place(tmp_path):
    with pytest.raises(SystemExit, match="text_encoder"):
        seams_files.write(tmp_path, tmp_path / "x.safetensors")
