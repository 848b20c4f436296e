"""The OMS axes of the WebUI's X/Y/Z plot script: one per argument that has an axis label (oms_webui.args), each
value checked before the grid starts. A cell's values reach the script through ``p`` (``overrides``)."""

from __future__ import annotations

import functools
import inspect
import sys

from lib_oms.errors import ModuleFileError, OMSError
from lib_oms.options import AUTOMATIC
from lib_oms.sources import named_module
from oms_webui.api import refusal
from oms_webui.args import ARGS, ArgumentError, convert, module_name
from oms_webui.environment import WORDS, module_choices, module_dirs, module_entries

AXIS_PREFIX = "[OMS]"
CELL_VALUES = "_oms_xyz"  # the attribute of a cell's ``p`` holding its OMS axes' values


def overrides(p) -> dict:
    """The values of this X/Y/Z cell's OMS axes. A cell of any OMS axis turns OMS on, as an "[OMS] Enabled: True"
    cell does, unless an [OMS] Enabled axis says otherwise."""
    values = getattr(p, CELL_VALUES, {})
    return {"enabled": True, **values} if values else {}


def set_value(p, x, xs, *, name):
    setattr(p, CELL_VALUES, {**getattr(p, CELL_VALUES, {}), name: x})


def confirm_values(p, xs, *, arg):
    """Every value of an OMS axis checked before the grid starts (a missing module too)."""
    try:
        for x in xs:
            value = convert(arg, x)
            if arg.kind == "module" and value != AUTOMATIC:
                try:
                    named_module(module_name(value), module_entries(), module_dirs(), WORDS)
                except ModuleFileError as missing:
                    raise ArgumentError(f"One More Step: argument '{arg.name}' ({arg.label}): {missing}") from None
    except OMSError as error:
        raise refusal(error) from error


def prepare_number_values(text: str, *, xyz, arg) -> list[str]:
    """The X/Y/Z plot's own list and range parsing of a number axis, with the extension's message for a value that
    is neither a number nor a range (the plot alone says only "could not convert string to float")."""
    values = xyz.csv_string_to_list_strip(text)
    for value in values:
        if value and not (xyz.re_range_float.fullmatch(value) or xyz.re_range_count_float.fullmatch(value)):
            confirm_values(None, [value], arg=arg)
    return values


def find_xyz_module():
    """The module holding the X/Y/Z plot's axis list and its AxisOption: the A1111 family's xyz_grid script, or
    SD.Next's scripts.xyz.xyz_grid_classes (its plot reads the axes from there); None without a plot."""
    from modules import scripts

    for data in getattr(scripts, "scripts_data", []):
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    for name, module in list(sys.modules.items()):
        if name.endswith("xyz_grid_classes") and hasattr(module, "axis_options") and hasattr(module, "AxisOption"):
            return module
    return None


def register_axes() -> None:
    xyz = find_xyz_module()
    if xyz is None or any(opt.label.startswith(AXIS_PREFIX) for opt in xyz.axis_options):
        return
    types = {"bool": str, "number": float, "text": str, "choice": str, "module": str}
    choices = {"bool": lambda: ["True", "False"], "module": module_choices}
    has_prepare = "prepare" in inspect.signature(xyz.AxisOption).parameters  # A1111 >= 1.9, Forge, reForge
    for arg in ARGS:
        if arg.axis is None:
            continue
        arg_choices = choices.get(arg.kind) or ((lambda arg=arg: list(arg.choices)) if arg.choices else None)
        prepare = {"prepare": functools.partial(prepare_number_values, xyz=xyz, arg=arg)} \
            if arg.kind == "number" and has_prepare else {}
        xyz.axis_options.append(xyz.AxisOption(
            arg.axis, types[arg.kind], functools.partial(set_value, name=arg.name),
            confirm=functools.partial(confirm_values, arg=arg), choices=arg_choices,
            cost=0.5 if arg.kind == "module" else 0.0, **prepare))
