"""X/Y/Z plot axes through the API, and every sampler family with One More Step on."""

from __future__ import annotations

import pytest
import webui_api as api

XYZ_SCRIPT = "x/y/z plot"


def xyz_axis_index(script_info, label: str) -> int:
    """Index of an axis in the txt2img X/Y/Z plot's axis list (the X type dropdown's choices, as the API sees them)."""
    entry = next(s for s in script_info if s["name"] == XYZ_SCRIPT and not s["is_img2img"])
    x_type = next(arg for arg in entry["args"] if arg["label"] == "X type")
    assert label in x_type["choices"], f"axis {label!r} not offered; axes: {x_type['choices']}"
    return x_type["choices"].index(label)


# Values for the plot's own options (by label): cells returned beside the grid, no legend, fixed seeds.
XYZ_OPTIONS = {"Draw legend": False, "Include Sub Images": True, "Include Sub Grids": False, "Keep -1 for seeds": False,
               "Vary seeds for X": False, "Vary seeds for Y": False, "Vary seeds for Z": False}


def xyz_script_args(script_info, x_type: int, x_values: str = "", x_dropdown: list | None = None, y_type: int = 0,
                    y_values: str = "", options: dict | None = None) -> list:
    """The plot's positional args: X, optionally Y (Z "Nothing"), then its options at XYZ_OPTIONS (updated by
    ``options``) or their defaults. Built from the plot's own argument list, whose length differs (A1111 1.10: 19,
    reForge: 21: more grid options)."""
    entry = next(s for s in script_info if s["name"] == XYZ_SCRIPT and not s["is_img2img"])
    args = [x_type, x_values, x_dropdown or [], y_type, y_values, [], 0, "", []]
    chosen = {**XYZ_OPTIONS, **(options or {})}
    return args + [chosen.get(arg["label"], arg.get("value")) for arg in entry["args"][len(args):]]


def xyz_cells(generate, script_info, oms_args, x_axis: str, x_values: str = "", x_dropdown=None,
              y_axis: str | None = None, y_values: str = "") -> api.Generation:
    """The plot's reply: ``all_images`` / ``infotexts`` hold the grid, then the cells (x fastest, then y)."""
    y_type = xyz_axis_index(script_info, y_axis) if y_axis else 0
    args = xyz_script_args(script_info, xyz_axis_index(script_info, x_axis), x_values, x_dropdown, y_type, y_values)
    return generate(api.payload(oms_args, script_name=XYZ_SCRIPT, script_args=args))


def test_oms_axes_are_offered(script_info):
    for label in (api.AXIS_CFG, api.AXIS_ENABLED, "[OMS] Module", "[OMS] Prompt", "[OMS] Solver"):
        xyz_axis_index(script_info, label)


def test_xyz_plot_over_oms_cfg(generate, script_info, oms_on):
    plot = xyz_cells(generate, script_info, {"enabled": True}, api.AXIS_CFG, "1, 3")
    assert len(plot.all_images) == 3, "expected the grid and two cells"
    cells = plot.all_images[1:]
    cell_params = [api.parse_infotext(text) for text in plot.infotexts[1:]]
    assert [float(p["OMS CFG"]) for p in cell_params] == [1.0, 3.0]
    assert all(p["OMS"] == "True" for p in cell_params)
    # Each cell is the image the same request makes with that OMS CFG directly.
    direct_cfg3 = generate(api.payload(api.positional_args(enabled=True, cfg=3.0)))
    assert api.same_pixels(cells[0], oms_on.images[0])
    assert api.same_pixels(cells[1], direct_cfg3.images[0])


def test_xyz_plot_over_oms_enabled(generate, script_info, baseline, oms_on):
    """The Enabled axis turns OMS on and off per cell, whatever the script's own checkbox says."""
    plot = xyz_cells(generate, script_info, [False], api.AXIS_ENABLED, x_dropdown=["False", "True"])
    off_cell, on_cell = plot.all_images[1:]
    assert api.same_pixels(off_cell, baseline.images[0])
    assert api.same_pixels(on_cell, oms_on.images[0])
    assert "OMS" not in api.parse_infotext(plot.infotexts[1])
    assert api.parse_infotext(plot.infotexts[2])["OMS"] == "True"


def test_xyz_off_cell_after_an_on_cell_carries_no_oms_infotext(generate, script_info, baseline):
    """Cells are shallow copies of one p sharing its extra_generation_params: an off cell made after an on cell must
    not show the on cell's OMS keys (here with an OMS prompt, so that key is written too), and is the image made
    without OMS."""
    oms_args = {"enabled": True, "prompt": "night"}
    plot = xyz_cells(generate, script_info, oms_args, api.AXIS_ENABLED, x_dropdown=["True", "False"])
    on_cell, off_cell = plot.all_images[1:]
    on_params, off_params = (api.parse_infotext(text) for text in plot.infotexts[1:])
    assert on_params["OMS"] == "True" and on_params["OMS prompt"] == "night"
    assert api.same_pixels(on_cell, generate(api.payload(oms_args)).images[0])
    assert not api.oms_keys(off_params), off_params
    assert api.same_pixels(off_cell, baseline.images[0])


def test_xyz_enabled_by_cfg_cells_describe_themselves(generate, script_info, baseline, oms_on):
    """X = Enabled (False, True) × Y = OMS CFG (1, 2): off cells, made after on cells of the row before, have no OMS
    keys and are the baseline image; on cells say their own CFG and are the images made with it directly."""
    plot = xyz_cells(generate, script_info, [False], api.AXIS_ENABLED, x_dropdown=["False", "True"],
                     y_axis=api.AXIS_CFG, y_values="1, 2")
    assert len(plot.all_images) == 5, "expected the grid and four cells"
    direct = {1.0: oms_on, 2.0: generate(api.payload(api.positional_args(enabled=True, cfg=2.0)))}
    for iy, cfg in enumerate((1.0, 2.0)):
        off, on = 1 + 2 * iy, 2 + 2 * iy
        off_params, on_params = api.parse_infotext(plot.infotexts[off]), api.parse_infotext(plot.infotexts[on])
        assert not api.oms_keys(off_params), (cfg, off_params)
        assert api.same_pixels(plot.all_images[off], baseline.images[0])
        assert on_params["OMS"] == "True" and float(on_params["OMS CFG"]) == cfg
        assert api.same_pixels(plot.all_images[on], direct[cfg].images[0])


def test_xyz_rejects_a_bad_cfg_value_before_generating(script_info, server):
    body = api.payload({"enabled": True}, script_name=XYZ_SCRIPT,
                       script_args=xyz_script_args(script_info, xyz_axis_index(script_info, api.AXIS_CFG), "1, 99"))
    reply = api.request("POST", "/sdapi/v1/txt2img", body)
    assert reply.status >= 400 and "cfg" in reply.text.lower(), reply.text[:1000]


# sampler name, scheduler, steps: one per family (ancestral k-diffusion, multistep k-diffusion with Karras sigmas,
# the timestep samplers DDIM and UniPC, and LCM). UniPC's default order 3 needs at least 3 steps.
SAMPLERS = [("Euler a", "Automatic", 2), ("DPM++ 2M", "Karras", 2), ("DDIM", "Automatic", 2), ("UniPC", "Automatic", 3),
            ("LCM", "Automatic", 2)]


@pytest.fixture(scope="module")
def sampler_names(server):
    reply = api.get("/sdapi/v1/samplers")
    assert reply.status == 200
    return {s["name"] for s in reply.body} | {alias for s in reply.body for alias in s.get("aliases", [])}


@pytest.mark.parametrize("sampler, scheduler, steps", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_sampler_runs_with_oms_and_differs_from_off(generate, sampler_names, sampler, scheduler, steps):
    if sampler not in sampler_names:
        pytest.skip(f"this WebUI has no {sampler} sampler")
    fields = {"sampler_name": sampler, "scheduler": scheduler, "steps": steps}
    off = generate(api.payload(**fields))
    on = generate(api.payload({"enabled": True}, **fields))
    params = on.params()
    assert params["OMS"] == "True" and "OMS skipped" not in params, params
    assert params["Sampler"] == sampler
    assert not api.same_pixels(on.images[0], off.images[0])
    assert api.mean_abs_diff(on.images[0], off.images[0]) > 1.0
