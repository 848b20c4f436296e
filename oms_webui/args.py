"""Every user-facing argument of the WebUI extension, defined once: UI label, default, range or choices,
infotext key, API name and X/Y/Z axis label, plus parsing of positional and dict API arguments and infotext. Ranges,
choices and help come from ``lib_oms.options``, which every host shares.

No WebUI imports: the glue in ``scripts/`` builds its components, infotext fields and axes from ``ARGS``.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from lib_oms.errors import OMSError
from lib_oms.options import AUTOMATIC, CFG, HELP, SOLVER_NAMES, SOLVERS

TITLE = "One More Step"  # the script's title, which is also its name in the API's alwayson_scripts
INFOTEXT_SKIPPED = "OMS skipped"
# the passes that continue from the corrected first pass as they are (hires fix second pass, refiner)
INFOTEXT_FIRST_PASS_ONLY = "OMS first pass only"
# "name [hash]" as asked (a pasted infotext) when the local file of that name has another hash
INFOTEXT_MODULE_REQUESTED = "OMS module requested"


class ArgumentError(OMSError):
    """A bad One More Step argument (API call, X/Y/Z cell or pasted infotext); the message names the field."""


@dataclass(frozen=True)
class Arg:
    """One argument. ``name`` is the API dict key and the position is its index in ``ARGS`` (= ``ui()`` order)."""

    name: str
    label: str
    default: object
    infotext: str
    axis: str | None
    kind: str  # "bool" | "text" | "number" | "choice" | "module"
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def help(self) -> str:
        """Its tooltip: the help every host shares, and what is the WebUI's own."""
        return f"{HELP[self.name]} {WEBUI_HELP[self.name]}" if self.name in WEBUI_HELP else HELP[self.name]


ARGS: tuple[Arg, ...] = (
    Arg("enabled", "One More Step", False, "OMS", "[OMS] Enabled", "bool"),
    Arg("module", "OMS module", AUTOMATIC, "OMS module", "[OMS] Module", "module"),
    Arg("prompt", "OMS prompt", "", "OMS prompt", "[OMS] Prompt", "text"),
    Arg("negative_prompt", "OMS negative prompt", "", "OMS negative prompt", None, "text"),
    Arg("cfg", "OMS CFG", CFG.default, "OMS CFG", "[OMS] CFG", "number", CFG.minimum, CFG.maximum, CFG.step),
    Arg("solver", "OMS solver", SOLVER_NAMES[0], "OMS solver", "[OMS] Solver", "choice", choices=SOLVER_NAMES),
)
ARG_BY_NAME = {arg.name: arg for arg in ARGS}
# What the tooltips add in the WebUI, where OMS reads each image's own prompt and settings choose the module.
WEBUI_HELP = {
    "enabled": "Applies to txt2img (the first pass) and to inpainting from latent noise or latent nothing at "
               "denoising strength 1.",
    "module": f"{AUTOMATIC}: the one set in Settings > {TITLE} first.",
    "prompt": "Empty: each image's own prompt (prompt editing at its first step, emphasis and LoRA tags removed).",
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
# "name [0123456789]": the module label written to infotext (lib_oms.runtime.module_label; the hash tells which file
# made the image).
_MODULE_LABEL = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]+)\]$")


@dataclass(frozen=True)
class OMSArgs:
    """The validated arguments of one generation (or one X/Y/Z cell)."""

    enabled: bool = False
    module: str = AUTOMATIC
    prompt: str = ""
    negative_prompt: str = ""
    cfg: float = CFG.default
    solver: str = SOLVER_NAMES[0]


def _bad(arg: Arg, expected: str, value: object) -> ArgumentError:
    return ArgumentError(f"One More Step: argument '{arg.name}' ({arg.label}) must be {expected}, got {value!r}")


def module_name(label: str) -> str:
    """The module name in a label "name [hash]" as written to infotext (a bare name is returned as is)."""
    match = _MODULE_LABEL.match(label.strip())
    return match.group("name") if match else label.strip()


def module_hash(label: str) -> str | None:
    """The file hash in a label "name [hash]" (lower case), or None for a bare name."""
    match = _MODULE_LABEL.match(label.strip())
    return match.group("hash").lower() if match else None


def convert(arg: Arg, value: object) -> object:
    """``value`` checked and converted to the type of ``arg``; raises ArgumentError naming the field."""
    if arg.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _bad(arg, "true or false", value)
    if arg.kind == "number":
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _bad(arg, f"a number from {arg.minimum:g} to {arg.maximum:g}", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not arg.minimum <= value <= arg.maximum:
            raise _bad(arg, f"a number from {arg.minimum:g} to {arg.maximum:g}", value)
        return float(value)
    if value is None and arg.kind == "text":
        return ""
    if not isinstance(value, str):
        raise _bad(arg, "a string", value)
    if arg.kind == "choice":
        for choice in arg.choices:
            if value.strip().lower() == choice.lower():
                return choice
        raise _bad(arg, "one of " + ", ".join(repr(c) for c in arg.choices), value)
    if arg.kind == "module":  # a pasted "name [hash]" keeps its hash: the glue says when the local file differs
        name = module_name(value)
        if not name:
            raise _bad(arg, f"{AUTOMATIC!r} or the name of an OMS module", value)
        return AUTOMATIC if name.lower() == AUTOMATIC.lower() else value.strip()
    return value


def from_dict(values: Mapping[str, object], base: OMSArgs | None = None) -> OMSArgs:
    """Arguments from a dict keyed by API names; missing keys keep ``base`` (default: the defaults)."""
    unknown = [key for key in values if key not in ARG_BY_NAME]
    if unknown:
        raise ArgumentError(f"One More Step: unknown argument {unknown[0]!r}; the arguments are "
                            + ", ".join(ARG_BY_NAME))
    current = {f.name: getattr(base or OMSArgs(), f.name) for f in fields(OMSArgs)}
    current.update({key: convert(ARG_BY_NAME[key], value) for key, value in values.items()})
    return OMSArgs(**current)


def parse_script_args(args: Sequence[object]) -> OMSArgs:
    """Arguments as the WebUI passes them to the script: positional in ``ARGS`` order, or a dict first.

    The API accepts ``"args": [true, "Automatic", "", "", 1.5, "SDE"]`` (missing trailing values keep their defaults)
    or ``"args": [{"enabled": true, "cfg": 1.5}]``; with a dict first, the values after it (UI defaults the API
    fills in) are ignored.
    """
    if args and isinstance(args[0], Mapping):
        return from_dict(args[0])
    if len(args) > len(ARGS):
        raise ArgumentError(f"One More Step: got {len(args)} positional arguments, expected at most {len(ARGS)}: "
                            + ", ".join(ARG_BY_NAME))
    for arg, value in zip(ARGS, args, strict=False):  # missing trailing values keep their defaults
        if isinstance(value, Mapping):
            raise ArgumentError(f"One More Step: a dict of arguments must come first, found one at argument "
                                f"'{arg.name}'")
    return from_dict({arg.name: value for arg, value in zip(ARGS, args, strict=False)})


def infotext_params(args: OMSArgs, module: str) -> dict[str, object]:
    """``extra_generation_params`` entries for an applied OMS step; ``module`` is the "name [hash]" label.

    Prompts are written only when set, so an image made with each image's own prompt pastes back to an empty field.
    """
    params: dict[str, object] = {"OMS": True, "OMS module": module}
    if args.prompt:
        params["OMS prompt"] = args.prompt
    if args.negative_prompt:
        params["OMS negative prompt"] = args.negative_prompt
    params["OMS CFG"] = args.cfg
    params["OMS solver"] = args.solver
    return params


def infotext_keys() -> tuple[str, ...]:
    """Every key this extension may write to infotext."""
    return tuple(arg.infotext for arg in ARGS) + (INFOTEXT_SKIPPED, INFOTEXT_FIRST_PASS_ONLY, INFOTEXT_MODULE_REQUESTED)


def paste_value(arg: Arg, params: Mapping[str, str]) -> object:
    """The value a pasted infotext gives ``arg``, or None to leave the control as it is.

    The enable flag follows the presence of "OMS" (pasting an image made without OMS turns it off); in an OMS
    infotext an absent prompt means "each image's own prompt" (empty); unreadable values are left alone.
    """
    oms_used = str(params.get(ARGS[0].infotext, "False")).lower() not in _FALSE
    if arg.kind == "bool":
        return oms_used
    raw = params.get(arg.infotext)
    if raw is None:
        return "" if arg.kind == "text" and oms_used else None
    try:
        return convert(arg, raw)
    except ArgumentError:
        return None


def requested(args, overrides: Mapping[str, object] | None = None) -> bool:
    """Whether OMS is asked for (by the script's arguments, or an X/Y/Z cell's ``overrides``), before validating
    anything else: a disabled script stays untouched whatever its other arguments say."""
    overrides = overrides or {}
    if "enabled" in overrides:
        raw = overrides["enabled"]
    elif args and isinstance(args[0], Mapping):
        raw = args[0].get("enabled", False)
    else:
        raw = args[0] if args else False
    try:
        return bool(convert(ARG_BY_NAME["enabled"], raw))
    except ArgumentError:
        return True  # unreadable: let the validation name the field


def alwayson_request(body: bytes, title: str) -> OMSArgs | str | None:
    """This script's arguments in an API request's ``alwayson_scripts``, checked as the script will check them: the
    arguments when they ask for OMS, a sentence saying what is wrong with them, or None (not asked for, or not a
    request the API can read: it answers those itself).

    The WebUI's API copies ``args`` by position into the script arguments, so an object there answers ``KeyError: 0``.
    """
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    scripts = request.get("alwayson_scripts") if isinstance(request, dict) else None
    if not isinstance(scripts, dict):
        return None
    for name, entry in scripts.items():
        if name.lower() != title.lower() or not isinstance(entry, dict) or "args" not in entry:
            continue
        args = entry["args"]
        if not isinstance(args, list):
            return (f'{title}: "args" must be a list, got {type(args).__name__} '
                    f'{json.dumps(args)[:100]}: write "args": [true, "Automatic", "", "", 1.5, "SDE"] '
                    '(positional) or "args": [{"enabled": true, "cfg": 1.5}] (a dict as the first item)')
        if not requested(args):
            return None
        try:
            return parse_script_args(args)
        except ArgumentError as error:
            return str(error)
    return None


def hints_markup() -> str:
    """The tooltips of the controls (by label) and of the solver's choices, as a hidden element that
    javascript/oms_hints.js reads: the words live here, once."""
    hints = {"labels": {arg.label: arg.help for arg in ARGS}, "choices": {s.name: s.help for s in SOLVERS}}
    return f'<div data-oms-hints="{html.escape(json.dumps(hints), quote=True)}"></div>'
