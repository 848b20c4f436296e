"""The options every host shares (lib_oms.options): solvers, the OMS CFG range, help."""

import math

import pytest

from lib_oms.engine import SOLVER_STEPS
from lib_oms.options import CFG, HELP, SOLVER_NAMES, SOLVERS, check_cfg, solver_named
from oms_webui.args import ARGS


@pytest.mark.parametrize("name", ["SDE", "sde", " Ddim "])
def test_solvers_are_named_in_any_case(name):
    assert solver_named(name).name == name.strip().upper()


@pytest.mark.parametrize("name", ["euler", "", None, 1])
def test_an_unknown_solver_is_refused_naming_the_solvers(name):
    with pytest.raises(ValueError, match="OMS solver must be one of SDE, DDIM, got"):
        solver_named(name)


def test_every_solver_has_a_step_and_help():
    assert set(SOLVER_STEPS) == set(SOLVER_NAMES)
    assert [solver.draws_z for solver in SOLVERS] == [True, False]
    assert all(solver.help for solver in SOLVERS)


@pytest.mark.parametrize("cfg", [CFG.minimum, 1, 2.5, CFG.maximum])
def test_cfg_in_range(cfg):
    assert check_cfg(cfg) == float(cfg)


@pytest.mark.parametrize("cfg", [-0.1, CFG.maximum + 0.01, math.nan, math.inf, True, "2", None])
def test_cfg_out_of_range_or_not_a_number(cfg):
    with pytest.raises(ValueError, match=f"OMS CFG must be a number from 0 to {CFG.maximum:g}"):
        check_cfg(cfg)


def test_every_webui_argument_has_shared_help():
    assert {arg.name for arg in ARGS} <= set(HELP)
