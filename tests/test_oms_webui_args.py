"""The extension's arguments: one definition, API parsing and validation, infotext that pastes back."""

import html
import json
import re
from dataclasses import fields

import pytest

from lib_oms.options import HELP, SOLVERS
from lib_oms.runtime import module_label
from oms_webui.args import (
    ARGS,
    AUTOMATIC,
    INFOTEXT_SKIPPED,
    ArgumentError,
    OMSArgs,
    alwayson_request,
    from_dict,
    hints_markup,
    infotext_keys,
    infotext_params,
    module_hash,
    module_name,
    parse_script_args,
    paste_value,
)

# The WebUI's infotext key/value regex (infotext_utils.re_param_code).
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def to_infotext(params: dict) -> str:
    """What the WebUI writes: "k: v" joined by ", ", values with , : or newline JSON-quoted (infotext_utils.quote)."""
    def quote(value):
        text = str(value)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text
    return ", ".join(f"{key}: {quote(value)}" for key, value in params.items())


def from_infotext(line: str) -> dict:
    """What the WebUI reads back (parse_generation_parameters for the last line)."""
    result = {}
    for key, value in RE_PARAM.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key] = value
    return result


def test_one_definition_in_ui_order():
    assert [arg.name for arg in ARGS] == [f.name for f in fields(OMSArgs)]
    assert [arg.name for arg in ARGS] == ["enabled", "module", "prompt", "negative_prompt", "cfg", "solver"]
    assert OMSArgs() == OMSArgs(**{arg.name: arg.default for arg in ARGS})
    assert ARGS[0].default is False  # the API runs every always-on script: the default must be off


def test_infotext_keys_parse_back():
    for key in infotext_keys():
        assert re.fullmatch(r"\w[\w \-/]+", key), key
    assert INFOTEXT_SKIPPED in infotext_keys()
    axes = [arg.axis for arg in ARGS if arg.axis]
    assert len(set(axes)) == len(axes) and all(axis.startswith("[OMS]") for axis in axes)


def test_positional_args_with_defaults_for_missing_trailing_ones():
    assert parse_script_args([True, "oms_b_openclip_15_21", "a dark cave", "", 1.5, "DDIM"]) == OMSArgs(
        True, "oms_b_openclip_15_21", "a dark cave", "", 1.5, "DDIM")
    assert parse_script_args([True]) == OMSArgs(enabled=True)
    assert parse_script_args([]) == OMSArgs()


def test_dict_form_and_values_after_it_ignored():
    args = parse_script_args([{"enabled": True, "cfg": 2, "solver": "ddim", "module": "automatic"}, "x", "", "", 9.0])
    assert args == OMSArgs(enabled=True, cfg=2.0, solver="DDIM", module=AUTOMATIC)


@pytest.mark.parametrize("values, field", [
    ({"cfg": "strong"}, "cfg"),
    ({"cfg": 11}, "cfg"),
    ({"cfg": -0.5}, "cfg"),
    ({"cfg": float("nan")}, "cfg"),
    ({"cfg": True}, "cfg"),
    ({"enabled": "maybe"}, "enabled"),
    ({"enabled": 2}, "enabled"),
    ({"solver": "euler"}, "solver"),
    ({"module": ""}, "module"),
    ({"module": 3}, "module"),
    ({"prompt": ["a"]}, "prompt"),
    ({"guidance": 1.5}, "guidance"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ArgumentError, match=f"'{field}'"):
        parse_script_args([values])


def test_positional_errors():
    with pytest.raises(ArgumentError, match="at most 6"):
        parse_script_args([True, AUTOMATIC, "", "", 1.0, "SDE", "extra"])
    with pytest.raises(ArgumentError, match="'cfg'"):
        parse_script_args([True, AUTOMATIC, "", "", "x"])
    with pytest.raises(ArgumentError, match="must come first"):
        parse_script_args([True, {"cfg": 1.0}])


def test_lenient_but_exact_conversions():
    args = parse_script_args([{"enabled": "true", "cfg": " 1.25 ", "negative_prompt": None, "solver": " SDE"}])
    assert args == OMSArgs(enabled=True, cfg=1.25, negative_prompt="", solver="SDE")
    assert from_dict({"enabled": 0}).enabled is False


def test_module_label_round_trip():
    assert module_label("oms_b_openclip_15_21", "0123456789") == "oms_b_openclip_15_21 [0123456789]"
    assert module_name("oms_b_openclip_15_21 [0123456789]") == "oms_b_openclip_15_21"
    assert module_name("my [module] v2") == "my [module] v2"  # brackets without a hex hash are part of the name
    assert module_hash("oms_b_openclip_15_21 [0123456789]") == "0123456789" and module_hash("my [module] v2") is None
    # the hash of a pasted label is kept, so the glue can say when the local file is another one
    assert parse_script_args([{"module": "x [abcdef0123]"}]).module == "x [abcdef0123]"
    assert parse_script_args([{"module": " automatic [abcdef0123]"}]).module == AUTOMATIC


@pytest.mark.parametrize("args", [
    OMSArgs(enabled=True),
    OMSArgs(True, "oms_b_openclip_xl", 'a "dark", moody: cave\nat night', "bright, white", 2.5, "DDIM"),
])
def test_infotext_round_trip(args):
    params = infotext_params(args, module_label(args.module, "0123456789"))
    line = "Steps: 20, Sampler: Euler, " + to_infotext(params) + ", Version: v1.10.1"
    parsed = from_infotext(line)
    assert {arg.name: paste_value(arg, parsed) for arg in ARGS} == {
        f.name: getattr(args, f.name) for f in fields(OMSArgs)} | {
        "module": args.module if args.module == AUTOMATIC else module_label(args.module, "0123456789")}


def test_infotext_only_what_was_set():
    params = infotext_params(OMSArgs(enabled=True), "m [0123456789]")
    assert params == {"OMS": True, "OMS module": "m [0123456789]", "OMS CFG": 1.0, "OMS solver": "SDE"}


def test_paste_without_oms_turns_it_off_and_leaves_the_rest():
    parsed = from_infotext("Steps: 20, Sampler: Euler, CFG scale: 7")
    values = {arg.name: paste_value(arg, parsed) for arg in ARGS}
    assert values == {"enabled": False, "module": None, "prompt": None, "negative_prompt": None, "cfg": None,
                      "solver": None}


def test_paste_of_a_skipped_generation_does_not_enable():
    parsed = from_infotext(to_infotext({INFOTEXT_SKIPPED: "img2img starts from the input image"}))
    assert paste_value(ARGS[0], parsed) is False


def test_unreadable_pasted_value_is_left_alone():
    parsed = from_infotext("OMS: True, OMS CFG: lots, OMS solver: Euler")
    values = {arg.name: paste_value(arg, parsed) for arg in ARGS}
    assert values["enabled"] is True and values["cfg"] is None and values["solver"] is None
    assert values["prompt"] == ""


@pytest.mark.parametrize("body, problem", [
    ({"alwayson_scripts": {"One More Step": {"args": {"enabled": True}}}}, "must be a list"),
    ({"alwayson_scripts": {"one more step": {"args": "true"}}}, "must be a list"),  # the WebUI ignores title case
    ({"alwayson_scripts": {"One More Step": {}}}, None),
    ({"alwayson_scripts": {"Other": {"args": {"x": 1}}}}, None),  # not ours to judge
    ({"prompt": "x"}, None),
    ([1, 2], None),
])
def test_alwayson_args_must_be_a_list(body, problem):
    """The WebUI's API indexes ``args`` by position: an object answers ``KeyError: 0``."""
    found = alwayson_request(json.dumps(body).encode(), "One More Step")
    assert (found is None) if problem is None else (problem in found and "[{\"enabled\": true" in found)
    assert alwayson_request(b"not json", "One More Step") is None  # the API answers malformed JSON itself


@pytest.mark.parametrize("args, found", [
    ([{"enabled": True, "cfg": 1.5}], OMSArgs(enabled=True, cfg=1.5)),
    ([True, "Automatic", "", "", 2, "ddim"], OMSArgs(True, AUTOMATIC, "", "", 2.0, "DDIM")),
    ([{"enabled": True, "cfg": "strong"}], "argument 'cfg' (OMS CFG) must be a number from 0 to 10, got 'strong'"),
    ([{"enabled": True, "guidance": 2}], "unknown argument 'guidance'"),
    ([True, "Automatic", "", "", 1.0, "euler"], "argument 'solver' (OMS solver) must be one of 'SDE', 'DDIM'"),
    ([{"enabled": False, "cfg": "not checked when off"}], None),  # a disabled script stays untouched
    ([False, "Automatic", "", "", "x"], None),
])
def test_an_api_request_asking_for_oms_is_checked_as_the_script_checks_it(args, found):
    """Checked before the WebUI reads the request, so a host that shows script errors and goes on (SD.Next) still
    answers 422 with the message."""
    got = alwayson_request(json.dumps({"alwayson_scripts": {"One More Step": {"args": args}}}).encode(),
                           "One More Step")
    assert got == found if not isinstance(found, str) else found in got


def test_the_hints_carry_every_label_and_solver_choice_with_the_shared_help():
    """javascript/oms_hints.js reads these from the page: the words are declared once, in Python."""
    markup = hints_markup()
    carried = json.loads(html.unescape(re.fullmatch(r'<div data-oms-hints="([^"]*)"></div>', markup).group(1)))
    assert carried["labels"] == {arg.label: arg.help for arg in ARGS}
    assert carried["choices"] == {solver.name: solver.help for solver in SOLVERS}
    assert carried["labels"]["OMS CFG"] == HELP["cfg"]
    assert carried["labels"]["OMS prompt"].startswith(HELP["prompt"]) and "each image's own prompt" in \
        carried["labels"]["OMS prompt"]
