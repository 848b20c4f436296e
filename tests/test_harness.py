"""The real-WebUI harness's own logic (tests/webui/harness/): what it installs for each WebUI, read from the archives'
requirements as CI reads them. Building and starting the WebUIs is what `.ci/run` does; this checks the recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent / "webui" / "harness"
sys.path.insert(0, str(HARNESS))

import build  # noqa: E402
from matrix import ENVS, SETUPTOOLS, UNIT_ENV, WEBUIS, PythonEnv  # noqa: E402


@pytest.fixture
def work(tmp_path):
    return tmp_path


def write_requirements(work: Path, webui: str, text: str) -> None:
    folder = build.webui_dir(work, WEBUIS[webui])
    folder.mkdir(parents=True)
    (folder / "requirements_versions.txt").write_bytes(text.encode())


def test_requirements_take_the_webuis_pins_with_the_harness_replacements(work):
    write_requirements(work, "reforge", "setuptools==69.5.1  # temp fix\r\nGitPython==3.1.32\r\n# a comment\r\n"
                       "torch\r\nhttps://github.com/x/y/releases/download/main_v1/pydantic-1.10.15-py3-none-any.whl\r\n"
                       "open-clip-torch==2.30.0\r\n")
    assert build.requirements(ENVS["reforge"], work) == [SETUPTOOLS, "GitPython==3.1.32", "torch", "pydantic==1.10.15",
                                                         "open-clip-torch==2.30.0"]


def test_extras_replace_the_webuis_own_pin(work):
    """A1111 1.6.0's torch is unpinned in its file; the harness installs 2.0.1, as its launcher does."""
    write_requirements(work, "a1111-1.6.0", "torch\nnumpy==1.23.5\nhttpcore==0.15\n")
    got = build.requirements(ENVS["a1111-1.6"], work)
    assert got[:2] == ["numpy==1.23.5", "httpcore==0.15"]
    assert {"torch==2.0.1", "torchvision==0.15.2", "httpx==0.24.1"} <= set(got)
    assert "torch" not in got


def test_every_environment_layers_on_one_that_exists():
    """torch is installed once per version: every environment but A1111 1.6's sees the unit tests' .venv."""
    for env in ENVS.values():
        chain = []
        while env.base is not None and env.base in ENVS:
            chain.append(env.base)
            env = ENVS[env.base]
        assert env.base in (None, UNIT_ENV) and len(chain) < len(ENVS)
    assert {name for name, env in ENVS.items() if env.base is None} == {"a1111-1.6"}
    assert all(webui.env in ENVS for webui in WEBUIS.values())


def test_repository_requirements_file_is_read(work):
    env = PythonEnv("oldest-unit", None, requirements_file="requirements-test-oldest.txt")
    got = build.requirements(env, work)
    assert "torch==2.0.1" in got and "safetensors==0.3.1" in got and "numpy==1.23.5" in got


def test_a_stamp_records_the_recipe(work):
    recipe = {"requirements": ["a==1"], "base": None}
    assert not build.stamped(work, recipe)
    build.write_stamp(work, recipe)
    assert build.stamped(work, recipe) and not build.stamped(work, {**recipe, "base": "unit"})
