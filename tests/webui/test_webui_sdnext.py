"""One More Step in SD.Next through its API, where SD.Next differs from the A1111 family (the rest of tests/webui runs
there too; conftest.py's NOT_ON_SDNEXT says which tests do not apply, and why). Skipped on other WebUIs.

SD.Next runs diffusers pipelines: OMS hands a text-to-image generation its start as ``p.init_latent``; img2img,
inpainting and control start from their image there, so OMS skips them, saying so. SD.Next shows a script's errors
and goes on, so after an error during the OMS step the script makes the generation's result itself: no image (HTTP
200 without images; the error is said in the server's console). Its X/Y/Z grid is the always-visible "xyz grid"
script, whose axes come from GET /sdapi/v1/xyz-grid and are named by label.
"""

from __future__ import annotations

import pytest
import webui_api as api
from seams_files import WIDTH_MISMATCH_MODULE
from test_webui_img2img_hires import img2img, mask_image, png_b64

XYZ_GRID = "xyz grid"
OMS_AXES = ("[OMS] Enabled", "[OMS] Module", "[OMS] Prompt", api.AXIS_CFG, "[OMS] Solver")
ERROR_LINE = "[One More Step] error: "


@pytest.fixture(autouse=True)
def only_on_sdnext(on_sdnext):
    if not on_sdnext:
        pytest.skip("SD.Next only: the server is not SD.Next")


def said(text: str) -> str:
    """Console text with its lines joined: SD.Next's console wraps what it logs at the terminal's width."""
    return " ".join(text.split())


def xyz_grid_args(x_axis: str, x_values: str = "", x_dropdown: list | None = None) -> list:
    """The 26 arguments of SD.Next's "xyz grid" (scripts/xyz_grid_on.py ui() order): enabled, the X axis by label,
    no Y or Z, then its options: no legend, the grid and each cell returned, no video, stop at an error."""
    nothing = ["Nothing", "", []]
    return [True, x_axis, x_values, x_dropdown or [], *nothing, *nothing,
            False, False, False,  # text inputs, legend, random seeds
            True, False, True,  # main grid, sub grids, images
            False, False, 0,  # time, text, margins
            False, "None", 2.0, True, 1, 0,  # video
            False]  # continue on error


def with_xyz_grid(oms_args, x_axis: str, x_values: str = "", x_dropdown: list | None = None) -> dict:
    body = api.payload(oms_args)
    body.setdefault("alwayson_scripts", {})[XYZ_GRID] = {"args": xyz_grid_args(x_axis, x_values, x_dropdown)}
    return body


def test_the_script_is_offered_for_txt2img_and_img2img_but_not_control(server):
    """SD.Next leaves external scripts out of its control tab."""
    listed = api.get("/sdapi/v1/scripts").body
    assert api.SCRIPT_TITLE.lower() in listed["txt2img"] and api.SCRIPT_TITLE.lower() in listed["img2img"]
    assert api.SCRIPT_TITLE.lower() not in listed["control"]


def test_the_oms_axes_are_in_the_xyz_grid(server):
    reply = api.get("/sdapi/v1/xyz-grid")
    assert reply.status == 200, reply.text[:500]
    axes = {axis["label"]: axis for axis in reply.body}
    assert set(OMS_AXES) <= set(axes), sorted(axes)
    assert axes[api.AXIS_CFG]["type"] == "float" and axes["[OMS] Module"]["choices"] is True


def test_an_oms_cfg_axis_runs_through_the_xyz_grid(generate, oms_on):
    """OMS unticked ([False]): the [OMS] CFG axis alone turns OMS on in its cells, each the image made with that
    OMS CFG directly."""
    plot = generate(with_xyz_grid([False], api.AXIS_CFG, "1, 3"))
    assert len(plot.all_images) == 3, "expected the grid and two cells"
    cells = [api.parse_infotext(text) for text in plot.infotexts[1:]]
    assert [(p["OMS"], float(p["OMS CFG"])) for p in cells] == [("True", 1.0), ("True", 3.0)]
    direct_cfg3 = generate(api.payload(api.positional_args(enabled=True, cfg=3.0)))
    assert api.same_pixels(plot.all_images[1], oms_on.images[0])
    assert api.same_pixels(plot.all_images[2], direct_cfg3.images[0])


def test_an_off_cell_after_an_on_cell_carries_no_oms_infotext(generate, baseline):
    oms_args = {"enabled": True, "prompt": "night"}
    plot = generate(with_xyz_grid(oms_args, "[OMS] Enabled", x_dropdown=["True", "False"]))
    on_params, off_params = (api.parse_infotext(text) for text in plot.infotexts[1:])
    assert on_params["OMS"] == "True" and on_params["OMS prompt"] == "night"
    assert api.same_pixels(plot.all_images[1], generate(api.payload(oms_args)).images[0])
    assert not api.oms_keys(off_params), off_params
    assert api.same_pixels(plot.all_images[2], baseline.images[0])


@pytest.mark.parametrize("axis, values, dropdown, named", [
    pytest.param(api.AXIS_CFG, "1, 99", None, "'cfg'", id="cfg-out-of-range"),
    pytest.param("[OMS] Module", "", ["no_such_module"], "no_such_module", id="missing-module"),
])
def test_a_bad_xyz_value_is_said_and_no_grid_is_made(oms_on, console, axis, values, dropdown, named):
    """SD.Next's grid confirms its values before it starts, logs what the extension refused and makes the request's
    own image instead (a value that is not a number at all, "1, strong", SD.Next's grid itself drops)."""
    mark = console.mark()
    made = api.txt2img(with_xyz_grid({"enabled": True}, axis, values, dropdown))
    assert len(made.all_images) == 1 and api.same_pixels(made.images[0], oms_on.images[0])
    logged = said(console.since(mark))
    assert "invalid axis values One More Step: argument" in logged and named in logged, logged[-2000:]


@pytest.mark.parametrize("module, words", [
    pytest.param("oms_s_openclip_xl_test", "made for the 'sdxl' latent space", id="module-of-another-latent-space"),
    pytest.param(WIDTH_MISMATCH_MODULE, "32-wide", id="error-while-sampling"),
])
def test_an_error_during_the_oms_step_makes_no_image(console, module, words):
    """The module is refused when OMS prepares (another latent space) or while its start is made (a network that
    cannot read the text encoder's features): HTTP 200 with no image, and the error in the console; never the image
    without OMS."""
    reply, errors = failed_request(console, module)
    assert words in errors[0] and module in errors[0], errors


def failed_request(console, module: str) -> tuple[api.Reply, list[str]]:
    """An OMS request with ``module`` that SD.Next answers without an image; the extension's error lines."""
    mark = console.mark()
    reply = api.request("POST", "/sdapi/v1/txt2img", api.payload({"enabled": True, "module": module}))
    assert reply.status == 200, reply.text[:1000]
    assert reply.body["images"] == [], "an image was made although OMS failed"
    errors = [line for line in console.since(mark).splitlines() if line.startswith(ERROR_LINE)]
    assert len(errors) == 1, errors
    return reply, errors


def test_failed_loads_release_what_they_read(generate, oms_on, console):
    """test_webui_api.py's memory check with SD.Next's answer: three OMS requests that fail after reading the whole
    broken module (616 MB, its NaN found last) leave the server's memory where it was (300 MB bound), and the server
    still makes the normal OMS image."""

    def fail():
        _reply, errors = failed_request(console, api.BROKEN_MODULE)
        assert "NaN" in errors[0], (
            f"expected the NaN error of models/oms/{api.BROKEN_MODULE}.safetensors (placed by the harness): {errors}")

    fail()
    before = api.server_rss()
    for _ in range(3):
        fail()
    grown = api.server_rss() - before
    assert grown < 300 * 2**20, f"the server grew by {grown / 2**20:.0f} MB over three failed requests"
    again = generate(api.payload(api.positional_args(enabled=True)), fresh=True)
    assert api.same_pixels(again.images[0], oms_on.images[0])


def test_inpainting_from_latent_noise_is_skipped_and_untouched(server):
    """The case where OMS applies in the A1111 family's img2img: in SD.Next inpainting starts from its image."""
    fields = {"mask": png_b64(mask_image()), "inpainting_fill": 2}
    off, on = img2img(None, **fields), img2img({"enabled": True}, **fields)
    params = on.params()
    assert "text-to-image" in params.get("OMS skipped", ""), params
    assert "OMS" not in params
    assert api.same_pixels(on.images[0], off.images[0])


def test_hires_fix_corrects_only_the_first_pass(generate):
    """SD.Next's hires fix (resize mode 1: upscale; its latent upscaler; the second pass's own strength): the first
    pass starts from the OMS latent, the second continues from it, and the infotext says so."""
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_resize_mode": 1, "hr_upscaler": "Latent Nearest",
             "hr_second_pass_steps": 1, "hr_denoising_strength": 0.5}
    off = generate(api.payload(**hires))
    on = generate(api.payload({"enabled": True}, **hires))
    params = on.params()
    assert params["OMS"] == "True" and "OMS skipped" not in params, params
    assert "hires" in params.get("OMS first pass only", "").lower(), params
    assert on.images[0].shape == (96, 96, 3)
    assert api.mean_abs_diff(on.images[0], off.images[0]) > 1.0
