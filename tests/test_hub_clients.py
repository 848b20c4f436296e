"""lib_oms.download with each huggingface_hub version the WebUIs ship, in a subprocess (the client reads HF_ENDPOINT
at import), against the fake hub: the fake's fidelity (hf_hub_download, snapshot_download, list_repo_files), the CLI
filling an empty folder (first mirror missing, a connection cut mid-file, a corrupt file refused), no network when
everything is there, and the placement error offline.

The pinned client (.venv-test's) always runs; the others need ``python -m tests.hub_clients`` (tests/hub_clients.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from lib_oms import download
from lib_oms.catalog import RELEASED_MODULES
from lib_oms.module_files import find_modules, load_module
from lib_oms.text_encoders import load_openclip_text_encoder
from tests import hub_clients
from tests.fake_hub import FakeHub
from tests.hub_fixtures import MODULE_WEIGHTS, TINY_H, module_repo, populate, text_encoder_mirror

SD_REPO, XL_REPO = RELEASED_MODULES["sd"].repo, RELEASED_MODULES["sdxl"].repo
PINNED = "0.25.2"
CUT_AT = 200_000


def client_path(version: str) -> list[str]:
    if version == PINNED:
        import huggingface_hub

        if huggingface_hub.__version__ != PINNED:  # e.g. the suite run on current releases
            pytest.skip(f"this environment has huggingface_hub {huggingface_hub.__version__}, not the pinned {PINNED}")
        return []
    if not hub_clients.installed(version):
        pytest.skip(f"huggingface_hub {version} is not prepared in {hub_clients.folder(version)}: run "
                    "`python -m tests.hub_clients` once (it pip-installs the tested versions there)")
    return [str(hub_clients.folder(version))]


@pytest.mark.parametrize("version", [PINNED, *hub_clients.VERSIONS])
def test_download_with_hub_client(version, tmp_path):
    extra = client_path(version)
    models, cache = tmp_path / "models" / "oms", tmp_path / "cache"
    with FakeHub() as hub:
        populate(hub, mirrors=[download.TEXT_ENCODER_REPOS[1]])  # the first mirror answers 404
        hub.corrupt.add((XL_REPO, MODULE_WEIGHTS))
        hub.cut[(SD_REPO, MODULE_WEIGHTS)] = CUT_AT
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": os.pathsep.join([*extra, str(hub_clients.ROOT)])}
        env.pop("HF_HUB_OFFLINE", None)
        run = subprocess.run([sys.executable, "-m", "tests.hub_client_check", str(models), str(cache)], env=env,
                             cwd=hub_clients.ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        requests = list(hub.requests)
    files = module_repo("sd")
    weights = files[MODULE_WEIGHTS]
    assert result["version"] == version and result["endpoint"].rstrip("/") == hub.url

    # The fake hub serves what the client's own downloads expect.
    with open(result["hf_hub_download"], "rb") as handle:
        assert handle.read() == weights
    snapshot = {path: open(os.path.join(result["snapshot_download"], path), "rb").read() for path in files}
    assert snapshot == files and sorted(result["list_repo_files"]) == sorted(files)

    # Dry run: files and sizes listed, nothing written.
    dry = result["dry_run"]
    assert dry["code"] == 0 and MODULE_WEIGHTS in dry["out"] and "model.fp16.safetensors" in dry["out"]
    assert f"not used: {download.TEXT_ENCODER_REPOS[0]}: repository not found" in dry["out"]

    # A corrupt file is refused and no module is left behind; the next run fetches it right.
    assert result["corrupt"]["code"] == 1 and "SHA-256" in result["corrupt"]["err"]
    assert result["xl_after_corrupt"] is False

    # The whole set, with the connection cut mid-file and resumed.
    assert result["all"]["code"] == 0, result["all"]["err"]
    sd_weights = hashlib.sha256(weights).hexdigest()
    ours = [r for r in requests if download.USER_AGENT_LIBRARY in r.user_agent]  # not the fidelity downloads
    ranges = [r.range for r in ours if r.path == f"/cdn/{sd_weights}"]
    assert ranges == [f"bytes=0-{len(weights) - 1}", f"bytes={CUT_AT}-{len(weights) - 1}"]
    assert [(e.name, load_module(e.path).latent_space) for e in find_modules([models])] == [
        ("oms_b_openclip_15_21", "sd"), ("oms_b_openclip_xl", "sdxl")]
    encoder = models / "text_encoder" / "model.fp16.safetensors"
    assert encoder.read_bytes() == text_encoder_mirror()["text_encoder/model.fp16.safetensors"]
    load_openclip_text_encoder(encoder.parent, spec=TINY_H)

    # Everything there: no network (the subprocess had blocked it), and offline the placement error.
    assert result["again_offline"]["code"] == 0 and "already there" in result["again_offline"]["out"]
    assert "HF_HUB_OFFLINE is set" in result["offline_error"]
    assert f"{hub.url}/{SD_REPO}/resolve/main/{MODULE_WEIGHTS}" in result["offline_error"]
