"""What Forge Neo does that no other WebUI does, against a real Forge Neo.

- A checkpoint whose state dict has a ``ztsnr`` key turns on Neo's zero-terminal-SNR schedule whatever the "Noise
  schedule" setting says (its backend/loader.py reads the key; processing rescales the sigmas). One More Step must
  skip there, say so, and leave the very pixels of a request without it. The runner puts such a checkpoint beside the
  test checkpoint and names it in SD_WEBUI_ZTSNR_CHECKPOINT.
- Neo's "API mode" (the option forge_model_mode = "api") makes process_images return before any script runs: a
  request that asks for One More Step there is refused with HTTP 422, saying why, instead of getting an image
  without it.

Elsewhere these tests skip themselves, saying why.
"""

from __future__ import annotations

import os

import pytest
import webui_api as api

ZTSNR_CHECKPOINT = os.environ.get("SD_WEBUI_ZTSNR_CHECKPOINT", "")


@pytest.fixture
def ztsnr_checkpoint(server):
    """The title of the checkpoint carrying the ztsnr key; the server's checkpoint is put back afterwards."""
    if not ZTSNR_CHECKPOINT:
        pytest.skip("SD_WEBUI_ZTSNR_CHECKPOINT is not set: the runner makes that checkpoint for Forge Neo only")
    titles = [entry["title"] for entry in api.get("/sdapi/v1/sd-models").body]
    title = next((t for t in titles if t.startswith(ZTSNR_CHECKPOINT)), None)
    assert title, f"the WebUI does not list {ZTSNR_CHECKPOINT}: {titles}"
    before = api.get("/sdapi/v1/options").body["sd_model_checkpoint"]
    yield title
    reply = api.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": before})
    assert reply.status == 200, reply.text[:500]


def test_a_ztsnr_checkpoint_is_skipped_with_the_pixels_of_oms_off(ztsnr_checkpoint, console):
    on_that_checkpoint = {"override_settings": {"sd_model_checkpoint": ztsnr_checkpoint},
                          "override_settings_restore_afterwards": False}
    off = api.txt2img(api.payload(**on_that_checkpoint))
    mark = console.mark()
    on = api.txt2img(api.payload(api.positional_args(enabled=True), **on_that_checkpoint))
    said = console.since(mark)
    assert api.same_pixels(on.images[0], off.images[0]), (
        f"a skipped OMS changed the image: max difference {api.max_abs_diff(on.images[0], off.images[0])}")
    skipped = on.params().get("OMS skipped", "")
    assert "zero-terminal" in skipped, on.infotexts[0]
    assert "OMS: True" not in on.infotexts[0]
    assert "zero-terminal" in said, said[-2000:]


@pytest.fixture
def api_mode(server):
    """Forge Neo switched to API mode for one test, and back to what it was."""
    if "forge_model_mode" not in server:
        pytest.skip("this WebUI has no forge_model_mode option (only Forge Neo has an API mode)")
    before = api.get("/sdapi/v1/options").body["forge_model_mode"]
    reply = api.request("POST", "/sdapi/v1/options", {"forge_model_mode": "api"})
    assert reply.status == 200, reply.text[:500]
    yield
    reply = api.request("POST", "/sdapi/v1/options", {"forge_model_mode": before})
    assert reply.status == 200, reply.text[:500]


def test_api_mode_refuses_a_request_for_oms_saying_why(api_mode, console):
    mark = console.mark()
    reply = api.request("POST", "/sdapi/v1/txt2img", api.payload(api.positional_args(enabled=True)))
    assert reply.status == 422, reply.text[:2000]
    assert "API mode" in reply.text, reply.text[:2000]
    assert "Traceback" not in console.since(mark)

