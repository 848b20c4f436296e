"""Integration tests against a running AUTOMATIC1111 WebUI with this extension installed.

Skipped unless SD_WEBUI_URL names the server (e.g. http://127.0.0.1:7860; the full UI, not --nowebui, because the
X/Y/Z axes are added before the UI is built). The server needs an SD1 checkpoint, an OMS module for the SD latent space
in models/oms/ (SD_WEBUI_OMS_MODULE, default oms_b_openclip_15_21) and the OpenCLIP ViT-H/14 text encoder it reads
(models/oms/text_encoder/). Random weights are fine: the tests compare images and infotext, not what they show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webui_api as api

# The smoke set every WebUI runs (tests/webui/harness/host.py picks the set by kind; A1111 runs everything):
# listed, off bit-identical, on applied with its infotext, one k-diffusion and one DDIM-type sampler, errors (the
# API list check too), memory, and Forge Neo's own cases (test_webui_forge_neo.py).
SMOKE = {
    "test_script_is_listed",
    "test_disabled_is_bit_identical_to_a_request_without_the_script[positional-defaults]",
    "test_enabled_changes_the_image_and_writes_its_infotext",
    "test_sampler_runs_with_oms_and_differs_from_off[Euler a]",
    "test_sampler_runs_with_oms_and_differs_from_off[DDIM]",
    "test_bad_argument_is_an_error_response_naming_the_field[missing-module]",
    "test_bad_argument_is_an_error_response_naming_the_field[cfg-not-a-number]",
    "test_server_still_generates_after_an_error",
    "test_failed_loads_release_what_they_read",
    "test_an_error_while_sampling_stops_the_generation",
    "test_refused_arguments_answer_422_without_a_traceback",
    "test_alwayson_args_given_as_an_object_are_answered_with_a_message",  # Forge Neo lost it once (Starlette 0.50)
    "test_a_ztsnr_checkpoint_is_skipped_with_the_pixels_of_oms_off",  # Forge Neo's own; elsewhere they skip
    "test_api_mode_refuses_a_request_for_oms_saying_why",
}
# Added for the Forge family (Forge, reForge, Forge Classic, Forge Neo), whose X/Y/Z script is their own copy.
XYZ = {
    "test_oms_axes_are_offered",
    "test_xyz_plot_over_oms_cfg",
    "test_xyz_plot_over_oms_enabled",
    "test_xyz_off_cell_after_an_on_cell_carries_no_oms_infotext",
    "test_xyz_enabled_by_cfg_cells_describe_themselves",
}

# What does not apply to SD.Next, and why ("file::test", "file::test[parameters]" or a file name): these tests skip
# themselves there, saying so. test_webui_sdnext.py holds what SD.Next does instead.
SDNEXT_OWN = "test_webui_sdnext.py checks what SD.Next does instead"
SDNEXT_ERRORS = ("SD.Next answers an error during the OMS step with HTTP 200 and no image, not an error status: "
                 + SDNEXT_OWN)
SDNEXT_XYZ = ("SD.Next's X/Y/Z grid is its own script (\"xyz grid\", always visible, 26 arguments, axes named by "
              "label), not the A1111 X/Y/Z plot: " + SDNEXT_OWN)
SDNEXT_REFINER = ("SD.Next's refiner is a second model chosen in its settings: its API has no refiner_checkpoint or "
                  "refiner_switch_at")
NOT_ON_SDNEXT = {
    "test_webui_browser.py": "SD.Next's UI is its own: these tests drive the A1111 family's (its InputAccordion's "
                             "title checkbox, paste button and generation gallery)",
    "test_webui_fakes_match.py": "tests/webui_fakes.py stands in for the A1111 family; SD.Next's stand-ins are "
                                 "tests/sdnext_fakes.py, checked by " + SDNEXT_OWN.split(" checks")[0],
    "test_webui_api.py::test_batch_of_two_equals_two_single_images":
        "the OMS starts of a batch equal the single images' within float rounding (2.4e-7, measured in SD.Next "
        "058a7f0; test_sdnext.py checks it), but the tiny random diffusers model the runner makes turns that "
        "rounding into up to 13 grey levels in 2 steps, while its plain batch is bit-identical to single images",
    "test_webui_api.py::test_infotext_pastes_back_through_the_api": "SD.Next's API has no infotext field (it ignores "
                                                                     "it)",
    "test_webui_api.py::test_bad_argument_is_an_error_response_naming_the_field[module-of-another-latent-space]":
        SDNEXT_ERRORS,
    "test_webui_api.py::test_failed_loads_release_what_they_read": SDNEXT_ERRORS,
    "test_webui_seams.py::test_an_error_while_sampling_stops_the_generation": SDNEXT_ERRORS,
    "test_webui_img2img_hires.py::test_inpainting_from_latent_noise_gets_the_oms_start_inside_the_mask":
        "in SD.Next OMS applies to text-to-image only (inpainting starts from its image): " + SDNEXT_OWN,
    "test_webui_img2img_hires.py::test_hires_fix_corrects_only_the_first_pass":
        "SD.Next's hires fix takes other fields (hr_denoising_strength, its own upscaler names): " + SDNEXT_OWN,
    **{f"test_webui_seams.py::{name}": SDNEXT_REFINER for name in (
        "test_the_refiner_does_not_reload_the_module_or_text_encoder",
        "test_refiner_switch_at_null_is_the_webui_meaning", "test_a_none_refiner_is_no_refiner")},
    **{f"test_webui_xyz_samplers.py::{name}": SDNEXT_XYZ for name in (
        "test_oms_axes_are_offered", "test_xyz_plot_over_oms_cfg", "test_xyz_plot_over_oms_enabled",
        "test_xyz_off_cell_after_an_on_cell_carries_no_oms_infotext",
        "test_xyz_enabled_by_cfg_cells_describe_themselves", "test_xyz_rejects_a_bad_cfg_value_before_generating")},
    **{f"test_webui_seams.py::{name}": SDNEXT_XYZ for name in (
        "test_a_cell_of_an_oms_axis_turns_oms_on", "test_a_bad_xyz_value_gets_the_extensions_message")},
}


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: the real-WebUI smoke set every WebUI runs")
    config.addinivalue_line("markers", "xyz: the X/Y/Z plot tests the Forge family runs beside the smoke set")
    config.addinivalue_line("markers", "browser: the UI in a real browser (test_webui_browser.py), on every WebUI")
    config.addinivalue_line("markers", "fakes: tests/webui_fakes.py against the WebUI (test_webui_fakes_match.py), on "
                                       "every WebUI")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in SMOKE:
            item.add_marker(pytest.mark.smoke)
        if item.name in XYZ:
            item.add_marker(pytest.mark.xyz)
        if Path(item.path).name == "test_webui_browser.py":
            item.add_marker(pytest.mark.browser)
        if Path(item.path).name == "test_webui_fakes_match.py":
            item.add_marker(pytest.mark.fakes)
    if api.BASE_URL:
        return
    skip = pytest.mark.skip(reason="SD_WEBUI_URL is not set: no WebUI server to test against")
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def server():
    """Checks once that the server answers; returns its options."""
    reply = api.get("/sdapi/v1/options")
    if reply.status != 200:
        pytest.fail(f"WebUI at {api.BASE_URL} does not answer /sdapi/v1/options: HTTP {reply.status} "
                    f"{reply.text[:300]}")
    return reply.body


_SDNEXT: list[bool] = []  # asked once per session


def server_is_sdnext() -> bool:
    if not _SDNEXT:
        _SDNEXT.append(api.is_sdnext())
    return _SDNEXT[0]


@pytest.fixture(scope="session")
def on_sdnext(server) -> bool:
    """Whether the server is SD.Next (webui_api.is_sdnext)."""
    return server_is_sdnext()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Skips, saying why, a test that does not apply to the WebUI under test (NOT_ON_SDNEXT), before any of its
    fixtures is set up (the browser tests' page would open the WebUI's UI)."""
    if not api.BASE_URL or Path(item.path).parent != Path(__file__).parent:
        return
    file = Path(item.path).name
    keys = (f"{file}::{item.name}", f"{file}::{getattr(item, 'originalname', item.name)}", file)
    reason = next((NOT_ON_SDNEXT[key] for key in keys if key in NOT_ON_SDNEXT), None)
    if reason and server_is_sdnext():
        pytest.skip(f"not on SD.Next: {reason}")


@pytest.fixture(scope="session")
def generate(server):
    """txt2img with memoisation: identical request bodies are sent once per session (a 64x64 image costs seconds
    on CPU). Pass ``fresh=True`` to force a new request (determinism checks)."""
    cache: dict[str, api.Generation] = {}

    def run(body: dict, fresh: bool = False) -> api.Generation:
        key = json.dumps(body, sort_keys=True)
        if fresh or key not in cache:
            cache[key] = api.txt2img(body)
        return cache[key]

    return run


@pytest.fixture(scope="session")
def baseline(generate):
    """The reference image: the base request without any alwayson_scripts entry."""
    return generate(api.payload())


@pytest.fixture(scope="session")
def oms_on(generate):
    """The same request with OMS enabled and every other OMS argument at its default."""
    return generate(api.payload(api.positional_args(enabled=True)))


@pytest.fixture(scope="session")
def script_info(server):
    reply = api.get("/sdapi/v1/script-info")
    assert reply.status == 200, reply.text[:500]
    return reply.body


@pytest.fixture(scope="session")
def console(server):
    """The server's console output (SD_WEBUI_LOG: the file the harness sends the server's stdout and stderr to)."""
    if not api.CONSOLE_LOG:
        pytest.skip("SD_WEBUI_LOG is not set: the server's console output is not available")
    return api.Console(api.CONSOLE_LOG)
