"""Seams between the extension and a real WebUI, through its HTTP API.

Needs, besides what conftest.py says:
- the files ``python tests/webui/seams_files.py --webui <webui> --checkpoint <checkpoint>`` writes before the server
  starts: ``models/oms/sd21_text_encoder.safetensors`` (a text encoder beside the modules),
  ``models/oms/oms_z_width_mismatch_15_21/`` (a module that fails while sampling) and
  ``models/Stable-diffusion/oms_refiner_copy.safetensors`` (a second checkpoint, used as the refiner);
- for the console checks, SD_WEBUI_LOG naming the file that receives the server's stdout and stderr (start the
  server with PYTHONUNBUFFERED=1 so that lines arrive as they are printed); they are skipped without it.
"""

from __future__ import annotations

import pytest
import webui_api as api
from seams_files import REFINER, TEXT_ENCODER_FILE, WIDTH_MISMATCH_MODULE
from test_webui_xyz_samplers import XYZ_SCRIPT, xyz_axis_index, xyz_script_args

LONG_PROMPT = "a very dark cave at night, " * 12  # 96 CLIP tokens: more than the 75 the OMS text encoder reads


def module_choices(script_info) -> list[str]:
    entry = next(s for s in script_info if s["name"] == api.SCRIPT_TITLE.lower() and not s["is_img2img"])
    return entry["args"][api.ARG_NAMES.index("module")]["choices"]


def refused(body: dict) -> api.Reply:
    reply = api.request("POST", "/sdapi/v1/txt2img", body)
    assert reply.status == 422, f"expected HTTP 422, got {reply.status}: {reply.text[:1000]}"
    return reply


# 1. Module list ------------------------------------------------------------------------------------------------

def test_a_text_encoder_beside_the_modules_is_not_offered(script_info, oms_on):
    choices = module_choices(script_info)
    assert WIDTH_MISMATCH_MODULE in choices, "seams_files.py was not run for this server"
    assert TEXT_ENCODER_FILE.removesuffix(".safetensors") not in choices, choices
    assert oms_on.params()["OMS module"].startswith(api.DEFAULT_MODULE + " [")  # "Automatic" still chooses it


# 2. Errors while sampling ---------------------------------------------------------------------------------------

def test_an_error_while_sampling_stops_the_generation(server):
    """The module loads, then its network cannot read the text encoder's features: on 1.10+ the WebUI used to make
    the image without OMS (it only reports errors of its sampling hook)."""
    reply = refused(api.payload({"enabled": True, "module": WIDTH_MISMATCH_MODULE}))
    assert "32-wide" in reply.text and WIDTH_MISMATCH_MODULE in reply.text, reply.text[:1000]
    assert "images" not in reply.body


# 3. Caches ------------------------------------------------------------------------------------------------------

def test_the_refiner_does_not_reload_the_module_or_text_encoder(generate, console):
    """Each generation with a refiner loads the refiner and then the base model again (model_loaded callbacks)."""
    body = api.payload({"enabled": True}, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    first = generate(body, fresh=True)
    # "Refiner" is written when the WebUI switches to the refiner checkpoint (sd_samplers_common.apply_refiner)
    assert first.params()["OMS first pass only"] == "refiner" and first.params()["Refiner"].startswith(REFINER)
    mark = console.mark()
    again = generate(body, fresh=True)
    said = console.since(mark)
    assert api.same_pixels(again.images[0], first.images[0])
    assert "[One More Step] module:" not in said and "[One More Step] text encoder:" not in said, said[-2000:]


# 4. Crashes and silent choices ----------------------------------------------------------------------------------

def test_refiner_switch_at_null_is_the_webui_meaning(generate):
    """The API's "refiner_switch_at": null (the WebUI then switches at the first step) used to crash the script."""
    made = generate(api.payload({"enabled": True}, refiner_checkpoint=REFINER, refiner_switch_at=None))
    assert made.params()["OMS"] == "True" and made.params()["OMS first pass only"] == "refiner"


def test_a_none_refiner_is_no_refiner(generate, oms_on):
    made = generate(api.payload({"enabled": True}, refiner_checkpoint="None", refiner_switch_at=0.8))
    assert "OMS first pass only" not in made.params()
    assert api.same_pixels(made.images[0], oms_on.images[0])


def test_alwayson_args_given_as_an_object_are_answered_with_a_message(server):
    body = api.payload()
    body["alwayson_scripts"] = {api.SCRIPT_TITLE: {"args": {"enabled": True, "cfg": 1.5}}}
    reply = refused(body)
    assert "must be a list" in reply.text and api.SCRIPT_TITLE in reply.text, reply.text[:1000]


def test_a_pasted_module_hash_of_another_file_is_said(generate, oms_on, console):
    asked = f"{api.DEFAULT_MODULE} [0000000000]"
    mark = console.mark()
    made = generate(api.payload({"enabled": True, "module": asked}), fresh=True)
    assert made.params()["OMS module requested"] == asked
    assert made.params()["OMS module"] == oms_on.params()["OMS module"]
    assert api.same_pixels(made.images[0], oms_on.images[0])
    assert console.since(mark).count("not 0000000000 as asked") == 1


def test_a_prompt_longer_than_the_encoder_reads_is_said_once(generate, console):
    mark = console.mark()
    made = generate(api.payload({"enabled": True}, prompt=LONG_PROMPT, batch_size=2, n_iter=2), fresh=True)
    assert len(made.images) == 4 and made.params()["OMS"] == "True"
    assert console.since(mark).count("longer than the 75 tokens the OMS text encoder reads") == 1


# 5. What WebUI users expect ---------------------------------------------------------------------------------------

def test_a_cell_of_an_oms_axis_turns_oms_on(generate, script_info, oms_on):
    """The accordion is unticked ([False]); the [OMS] CFG axis alone turns OMS on in its cells."""
    body = api.payload([False], script_name=XYZ_SCRIPT,
                       script_args=xyz_script_args(script_info, xyz_axis_index(script_info, api.AXIS_CFG), "1, 3"))
    plot = generate(body)
    cells = [api.parse_infotext(text) for text in plot.infotexts[1:]]
    assert [(p["OMS"], float(p["OMS CFG"])) for p in cells] == [("True", 1.0), ("True", 3.0)]
    assert api.same_pixels(plot.all_images[1], oms_on.images[0])


@pytest.mark.parametrize("axis, values, dropdown, named", [
    pytest.param(api.AXIS_CFG, "1, strong", None, "'cfg'", id="cfg-not-a-number"),
    pytest.param(api.AXIS_CFG, "1, 99", None, "'cfg'", id="cfg-out-of-range"),
    pytest.param("[OMS] Module", "", ["no_such_module"], "no_such_module", id="missing-module"),
])
def test_a_bad_xyz_value_gets_the_extensions_message(script_info, axis, values, dropdown, named):
    body = api.payload({"enabled": True}, script_name=XYZ_SCRIPT,
                       script_args=xyz_script_args(script_info, xyz_axis_index(script_info, axis), values, dropdown))
    reply = refused(body)
    assert named in reply.text and api.SCRIPT_TITLE in reply.text, reply.text[:1000]


def test_refused_arguments_answer_422_without_a_traceback(server, console):
    mark = console.mark()
    reply = refused(api.payload({"enabled": True, "cfg": "lots"}))
    assert "'cfg'" in reply.text
    assert "Traceback" not in console.since(mark)
