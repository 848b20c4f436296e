"""Run in a subprocess by tests/test_hub_clients.py, with one huggingface_hub version first on PYTHONPATH and
HF_ENDPOINT pointing at the test's fake hub (the client reads it at import). Prints one JSON line of results.

Usage: python -m tests.hub_client_check MODELS_DIR CACHE_DIR
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants

from lib_oms import download
from lib_oms.catalog import RELEASED_MODULES
from lib_oms.errors import ModuleMissingError
from tests.hub_fixtures import MODULE_WEIGHTS


def cli(*args: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = download.main(list(args))
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def refuse_network(*args, **kwargs):
    raise ConnectionRefusedError("the network is blocked here")


def main() -> None:
    models, cache = Path(sys.argv[1]), Path(sys.argv[2])
    repo = RELEASED_MODULES["sd"].repo
    result = {"version": huggingface_hub.__version__, "endpoint": huggingface_hub.constants.ENDPOINT}
    # lib_oms.download through this client: dry run, a corrupt file refused, the whole set.
    result["dry_run"] = cli("--models-dir", str(models), "--dry-run", "all")
    result["corrupt"] = cli("--models-dir", str(models), "sdxl")
    result["xl_after_corrupt"] = (models / "oms_b_openclip_xl").exists()
    result["all"] = cli("--models-dir", str(models), "all")
    # The fake hub as the client's own calls see it.
    result["hf_hub_download"] = huggingface_hub.hf_hub_download(repo, MODULE_WEIGHTS, cache_dir=cache)
    result["snapshot_download"] = huggingface_hub.snapshot_download(repo, cache_dir=cache / "snapshot")
    result["list_repo_files"] = huggingface_hub.list_repo_files(repo)
    # Everything there: nothing to fetch, with the network blocked; offline, the placement error.
    socket.socket.connect = refuse_network
    result["again_offline"] = cli("--models-dir", str(models), "all")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        download.obtain_module("sd", models.parent / "empty", ModuleMissingError("no module"))
    except ModuleMissingError as error:
        result["offline_error"] = str(error)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
