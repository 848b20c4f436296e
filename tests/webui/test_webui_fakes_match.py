"""tests/webui_fakes.py against the real WebUI: the element ids of One More Step's controls (the server's gradio
/config), and what the probe extension (probe/scripts/fakes_probe.py, linked beside One More Step by the runner)
recorded during three generations: the attributes the extension reads on ``p``, its sampler, the loaded model,
``shared.cmd_opts``, ``shared.state`` and ``devices``, their defaults, the modules and names the fakes offer, the
callbacks One More Step registered, the Forge family's memory manager and the X/Y/Z plot's AxisOption. Each test
fails naming every difference (fakes_drift.py): a fake that drifted from its WebUI shows the next time anyone runs
the runner.

Needs the runner (tests/webui/harness/run.py): it starts the server with the probe and OMS_FAKES_PROBE set, and
gives the tests SD_WEBUI_PROBE (the same file) and SD_WEBUI_KIND (the WebUI it recognised).
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import fakes_drift as drift
import numpy as np
import pytest
import webui_api as api
from PIL import Image

PROBE_FILE = os.environ.get("SD_WEBUI_PROBE", "")
KIND = os.environ.get("SD_WEBUI_KIND", "")


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def host(server):
    """The probe's record of the WebUI, made by three generations with One More Step on (drift.GENERATIONS)."""
    if not PROBE_FILE:
        pytest.skip("SD_WEBUI_PROBE is not set: the server was not started with the probe extension "
                    "(tests/webui/harness/run.py starts it so)")
    path = Path(PROBE_FILE)
    path.unlink(missing_ok=True)
    on = api.positional_args(enabled=True)
    for sampler in ("Euler a", "DDIM"):
        api.txt2img(api.payload(on, sampler_name=sampler, seed=4321))
    size = api.BASE_PAYLOAD["width"]
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    api.generate("img2img", api.payload(on, init_images=[png_b64(np.full((size, size, 3), 96, np.uint8))],
                                        mask=png_b64(mask), inpainting_fill=2, denoising_strength=1.0, mask_blur=0,
                                        inpaint_full_res=False, seed=4321))
    assert path.is_file(), f"the probe wrote nothing to {path}: see the server's console for '[fakes probe]'"
    import json

    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def family(host):
    """The webui_fakes.FAMILIES entry of the WebUI the runner recognised."""
    if not KIND:
        pytest.skip("SD_WEBUI_KIND is not set: the runner names the WebUI it recognised")
    return drift.family_of(KIND)


@pytest.fixture(scope="module")
def fake(family, tmp_path_factory):
    return drift.probe_the_fakes(family, tmp_path_factory.mktemp("fakes-probe"))


@pytest.fixture(scope="module")
def read():
    return drift.read_by_the_extension()


def no_drift(lines: list[str]) -> None:
    assert not lines, f"tests/webui_fakes.py differs from {KIND}:\n  " + "\n  ".join(lines)


def test_family_is_the_webuis(family, host):
    from tests.webui_fakes import FAMILIES

    no_drift(drift.family_drift(family, host, FAMILIES))


def test_elem_ids_are_the_webuis(fake):
    """Script.elem_id and the InputAccordion's ids: the browser tests and javascript/oms_hints.js select on them."""
    reply = api.get("/config")
    assert reply.status == 200, reply.text[:300]
    real = {str(c.get("props", {}).get("elem_id")) for c in reply.body["components"]}
    real = {elem_id for elem_id in real if elem_id.startswith("script_") and "one_more_step" in elem_id}
    no_drift(drift.elem_ids_drift(set(fake["elem_ids"]), real))


def test_processing_has_what_the_webui_has(fake, host, read):
    from tests.webui_fakes import REQUEST_FIELDS

    no_drift(drift.processing_drift(fake, host, read, REQUEST_FIELDS))


def test_sampler_and_model_have_what_the_webuis_have(fake, host, read):
    no_drift(drift.sampler_and_model_drift(fake, host, read))


def test_cmd_opts_and_state_are_the_webuis(fake, host, read):
    no_drift(drift.shared_drift(fake, host, read))


def test_settings_the_fakes_set_have_the_webuis_defaults(fake, host):
    no_drift(drift.opts_drift(fake, host))


def test_modules_the_fakes_offer_are_the_webuis(fake, host):
    from tests.webui_fakes import FAKES_OWN

    no_drift(drift.modules_drift(fake, host, FAKES_OWN))


def test_memory_manager_is_the_webuis(fake, host):
    no_drift(drift.manager_drift(fake, host))


def test_callbacks_are_the_webuis(fake, host):
    no_drift(drift.callbacks_drift(fake, host))


def test_script_base_and_xyz_axes_are_the_webuis(fake, host):
    no_drift(drift.script_and_xyz_drift(fake, host))
