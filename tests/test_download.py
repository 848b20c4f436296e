"""lib_oms.download against a fake hub on 127.0.0.1, with the pinned hub client (huggingface_hub in .venv-test).

The other client versions the WebUIs ship are run in subprocesses by tests/test_hub_clients.py.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import urllib.error

import pytest
import torch

from lib_oms import download
from lib_oms.catalog import OPENCLIP_H, RELEASED_MODULES
from lib_oms.errors import DownloadError, ModuleMissingError, TextEncoderMissingError
from lib_oms.module_files import find_modules, load_module
from lib_oms.sources import EncoderSource, resolve_text_encoder
from lib_oms.text_encoders import load_openclip_text_encoder
from tests.factories import TEST_WORDS
from tests.fake_hub import FakeHub
from tests.hub_fixtures import (
    MODULE_WEIGHTS,
    TINY_H,
    laion_repo,
    module_repo,
    populate,
    text_encoder_mirror,
    write_openclip_checkpoint,
)

SD_REPO, XL_REPO = RELEASED_MODULES["sd"].repo, RELEASED_MODULES["sdxl"].repo
MIRROR, MIRROR_BASE = download.TEXT_ENCODER_REPOS


@pytest.fixture
def hub(monkeypatch):
    """A running fake hub; the hub client's endpoint (HF_ENDPOINT as read at import) points at it."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        yield server


@pytest.fixture
def models(tmp_path):
    return tmp_path / "models" / "oms"


def no_bar(plan, **kwargs):
    return download.fetch(plan, console=False, **kwargs)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged_files(models):
    return sorted(p.relative_to(models).as_posix() for p in (models / download.STAGING).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# What is fetched


def test_module_plan_takes_the_three_files_and_prefers_fp16(hub, models):
    populate(hub)
    plan = download.module_plan("sd", models)
    files = module_repo("sd")
    assert [f.target for f in plan.files] == ["model_index.json", "oms_module/config.json", MODULE_WEIGHTS]
    assert plan.folder == models / "oms_b_openclip_15_21" and plan.size == sum(len(files[f.target]) for f in plan.files)
    weights = plan.files[2]
    assert weights.sha256 == sha256(files[MODULE_WEIGHTS]) and weights.git_blob is None
    assert plan.files[0].git_blob is not None and plan.files[0].sha256 is None  # small files: the git blob id
    # listing only, nothing downloaded (huggingface_hub >= 2 also asks, once a day, for its list of AI-agent tools)
    assert [r.path for r in hub.requests if r.path != "/api/agent-harnesses"] == [f"/api/models/{SD_REPO}"]


def test_module_repo_without_safetensors_is_refused_before_any_download(hub, models):
    files = {k: v for k, v in module_repo("sd").items() if not k.endswith(".safetensors")}
    hub.add(SD_REPO, {**files, "oms_module/diffusion_pytorch_model.bin": b"pickle"})
    with pytest.raises(DownloadError, match=r"no oms_module/\*.safetensors.*_model.bin.*never fetched"):
        download.module_plan("sd", models)
    assert hub.content_requests() == []


def test_fetch_places_a_module_that_loads(hub, models):
    populate(hub)
    said = []
    folder = no_bar(download.module_plan("sd", models), progress=said.append)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "model_index.json", "oms_module/config.json", MODULE_WEIGHTS]
    module = load_module(folder)
    assert module.latent_space == "sd" and module.text_encoder == "openclip-h"
    assert module.weights_path.read_bytes() == module_repo("sd")[MODULE_WEIGHTS]
    assert said and said[-1].startswith("One More Step: downloading the OMS module for SD1.x/SD2.x")
    assert staged_files(models) == [f"{download.STAGING}/oms_b_openclip_15_21.lock"]  # nothing partial left


def test_only_the_planned_files_are_requested(hub, models):
    populate(hub)
    no_bar(download.module_plan("sdxl", models))
    commit = hub.repos[XL_REPO].commit
    weights_sha = sha256(module_repo("sdxl")[MODULE_WEIGHTS])
    assert [r.path for r in hub.content_requests()] == [  # pinned to the listed commit; the LFS file via the CDN
        f"/{XL_REPO}/resolve/{commit}/model_index.json", f"/{XL_REPO}/resolve/{commit}/oms_module/config.json",
        f"/{XL_REPO}/resolve/{commit}/{MODULE_WEIGHTS}", f"/cdn/{weights_sha}"]


# ---------------------------------------------------------------------------------------------------------------
# The text encoder's sources


def test_text_encoder_from_the_first_mirror(hub, models):
    populate(hub)
    plan, skipped = download.text_encoder_plan(models)
    assert skipped == [] and [f.target for f in plan.files] == ["config.json", "model.fp16.safetensors"]
    assert plan.files[1].repo == MIRROR
    folder = no_bar(plan)
    assert folder == models / "text_encoder"
    fp16 = text_encoder_mirror()["text_encoder/model.fp16.safetensors"]
    assert (folder / "model.fp16.safetensors").read_bytes() == fp16
    found = resolve_text_encoder(OPENCLIP_H, words=TEST_WORDS, module_dirs=[models], hub_dir=models / "none")
    assert found == EncoderSource("file", folder)
    encoder = load_openclip_text_encoder(found.path, spec=TINY_H)
    assert encoder.encode(["a dark alley"]).shape == (1, 77, TINY_H.width)


def test_first_mirror_missing_then_the_next(hub, models):
    populate(hub, mirrors=[MIRROR_BASE])
    plan, skipped = download.text_encoder_plan(models)
    assert skipped == [f"{MIRROR}: repository not found"] and plan.files[1].repo == MIRROR_BASE
    no_bar(plan)
    assert download.text_encoder_present(models / "text_encoder")


def test_laion_text_tensors_by_range_requests(hub, models, tmp_path):
    populate(hub, mirrors=[])
    plan, skipped = download.text_encoder_plan(models)
    assert [s.split(":")[0] for s in skipped] == [MIRROR, MIRROR_BASE]
    (extract,) = plan.files
    full = laion_repo()[download.OPENCLIP_FILE]
    assert extract.target == download.OPENCLIP_FILE and extract.size < len(full)
    folder = no_bar(plan)
    ranges = [r.range for r in hub.content_requests("/cdn/" + sha256(full))]
    assert len(ranges) == 2 + 3  # the header length, the header, then three runs of text tensors (gaps skipped)
    assert all(r and r.startswith("bytes=") for r in ranges)
    reference = load_openclip_text_encoder(write_openclip_checkpoint(tmp_path / "full.safetensors"), spec=TINY_H)
    extracted = load_openclip_text_encoder(folder, spec=TINY_H)
    prompts = ["a dark alley at night!", ""]
    assert torch.equal(extracted.encode(prompts), reference.encode(prompts))


def test_no_source_at_all_says_each_reason(hub, models):
    with pytest.raises(download.NoTextEncoderSource, match="no source of the text encoder") as error:
        download.text_encoder_plan(models)
    for repo in (MIRROR, MIRROR_BASE, download.OPENCLIP_REPO):
        assert f"{repo}: repository not found" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Broken transfers


def test_a_connection_cut_mid_file_resumes(hub, models):
    populate(hub)
    weights = module_repo("sd")[MODULE_WEIGHTS]
    hub.cut[(SD_REPO, MODULE_WEIGHTS)] = 100_000
    folder = no_bar(download.module_plan("sd", models))
    assert (folder / MODULE_WEIGHTS).read_bytes() == weights
    ranges = [r.range for r in hub.content_requests("/cdn/" + sha256(weights))]
    assert ranges == [f"bytes=0-{len(weights) - 1}", f"bytes=100000-{len(weights) - 1}"]


def test_a_busy_server_is_asked_again(hub, models):
    populate(hub)
    weights = module_repo("sd")[MODULE_WEIGHTS]
    hub.busy.add((SD_REPO, MODULE_WEIGHTS))
    folder = no_bar(download.module_plan("sd", models))
    assert (folder / MODULE_WEIGHTS).read_bytes() == weights
    assert len(hub.content_requests("/cdn/" + sha256(weights))) == 2


def test_an_interrupted_download_resumes_in_the_next_attempt(hub, models, monkeypatch):
    populate(hub)
    weights = module_repo("sd")[MODULE_WEIGHTS]
    monkeypatch.setattr(download, "ATTEMPTS", 1)
    hub.cut[(SD_REPO, MODULE_WEIGHTS)] = 300_000
    plan = download.module_plan("sd", models)
    with pytest.raises(DownloadError, match="next attempt resumes"):
        no_bar(plan)
    assert not plan.folder.exists() and find_modules([models]) == []  # a partial is never taken for a module
    partial = [p for p in staged_files(models) if p.endswith(download.INCOMPLETE)]
    assert len(partial) == 1 and (models / partial[0]).stat().st_size == 300_000
    no_bar(download.module_plan("sd", models))
    assert load_module(plan.folder).weights_path.read_bytes() == weights
    assert hub.content_requests("/cdn/" + sha256(weights))[-1].range == f"bytes=300000-{len(weights) - 1}"


def test_interrupt_stops_the_download_and_keeps_the_bytes(hub, models):
    populate(hub)
    plan = download.module_plan("sd", models)
    stop = threading.Event()
    with pytest.raises(DownloadError, match="stopped"):
        no_bar(plan, progress=lambda text: stop.set(), should_stop=stop.is_set)
    assert not plan.folder.exists()
    no_bar(plan)
    assert download.module_present(plan.folder)


def test_a_corrupt_file_is_refused_and_not_left_as_a_module(hub, models):
    populate(hub)
    hub.corrupt.add((SD_REPO, MODULE_WEIGHTS))
    plan = download.module_plan("sd", models)
    with pytest.raises(DownloadError, match="does not match the hub's SHA-256"):
        no_bar(plan)
    assert not plan.folder.exists() and find_modules([models]) == []
    assert not any(p.endswith((".safetensors", download.INCOMPLETE)) for p in staged_files(models))
    no_bar(plan)  # served right this time
    assert load_module(plan.folder).latent_space == "sd"


def test_free_disk_space_is_checked_first(hub, models, monkeypatch):
    populate(hub)
    plan = download.module_plan("sd", models)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10 << 20})())
    with pytest.raises(DownloadError, match=r"not enough free disk space.*GB needed"):
        no_bar(plan)
    assert hub.content_requests() == []


def test_two_downloads_of_one_folder_fetch_it_once(hub, models):
    populate(hub)
    plan = download.module_plan("sd", models)
    results, errors = [], []

    def run():
        try:
            results.append(no_bar(plan))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [plan.folder, plan.folder]
    assert len(hub.content_requests("/cdn/" + sha256(module_repo("sd")[MODULE_WEIGHTS]))) == 1


# ---------------------------------------------------------------------------------------------------------------
# First use: allowed, refused, offline, nothing missing


def test_obtain_downloads_what_is_missing(hub, models):
    populate(hub)
    folder = download.obtain_module("sd", models, ModuleMissingError("no module"))
    assert download.module_present(folder)
    requests = len(hub.requests)
    assert download.obtain_module("sd", models, ModuleMissingError("no module")) == folder
    assert len(hub.requests) == requests  # present: no network


@pytest.mark.parametrize("how", ["refused", "offline"])
def test_no_download_names_the_files_urls_and_folders(hub, models, monkeypatch, how):
    populate(hub)
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused = "downloading is off (--oms-no-download)" if how == "refused" else None
    with pytest.raises(ModuleMissingError) as error:
        download.obtain_module("sdxl", models, ModuleMissingError("no OMS module for sdxl"), refused=refused)
    message = str(error.value)
    assert message.startswith("no OMS module for sdxl. Not downloaded: ")
    assert ("--oms-no-download" if how == "refused" else "HF_HUB_OFFLINE is set") in message
    for path in ("model_index.json", "oms_module/config.json", MODULE_WEIGHTS):
        assert f"{hub.url}/{XL_REPO}/resolve/main/{path}" in message
    assert str(models / "oms_b_openclip_xl") in message
    with pytest.raises(TextEncoderMissingError) as error:
        download.obtain_text_encoder(models, TextEncoderMissingError("no text encoder"), setting="the setting",
                                     refused=refused)
    assert f"{hub.url}/{MIRROR}/resolve/main/text_encoder/model.fp16.safetensors" in str(error.value)
    assert str(models / "text_encoder") in str(error.value)
    assert hub.requests == []


def test_a_failed_download_says_why_and_how_to_place_by_hand(hub, models):
    hub.add(SD_REPO, {"README.md": b"nothing here"})
    with pytest.raises(ModuleMissingError, match=r"the download failed: .*no oms_module/config.json.*place it by hand"):
        download.obtain_module("sd", models, ModuleMissingError("no module"))


# ---------------------------------------------------------------------------------------------------------------
# python -m lib_oms.download


def block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no network access expected")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_cli_fills_an_empty_folder_then_needs_no_network(hub, models, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    populate(hub, mirrors=[MIRROR_BASE])
    assert download.main(["--models-dir", str(models), "--dry-run", "all"]) == 0
    out = capsys.readouterr().out
    assert "oms_module/diffusion_pytorch_model.fp16.safetensors" in out and "not used: " + MIRROR in out
    assert not models.exists() and hub.content_requests() == []
    assert download.main(["--models-dir", str(models), "all"]) == 0
    assert sorted(entry.name for entry in find_modules([models])) == ["oms_b_openclip_15_21", "oms_b_openclip_xl"]
    assert [load_module(e.path).latent_space for e in find_modules([models])] == ["sd", "sdxl"]
    found = resolve_text_encoder(OPENCLIP_H, words=TEST_WORDS, module_dirs=[models], hub_dir=tmp_path / "x")
    assert found == EncoderSource("file", models / "text_encoder")
    load_openclip_text_encoder(found.path, spec=TINY_H)
    block_network(monkeypatch)
    assert download.main(["--models-dir", str(models), "all"]) == 0
    assert "already there" in capsys.readouterr().out


def test_cli_reports_errors_and_bad_arguments(hub, models, capsys, tmp_path):
    assert download.main(["--models-dir", str(models), "sdxl"]) == 1
    assert "error: " in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        download.main(["--models-dir", str(a_file), "sd"])
    with pytest.raises(SystemExit):
        download.main(["--models-dir", str(models), "sd3"])


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """The hub client's endpoint on a loopback port where nothing listens (as with no network: no answer at all)."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    return url


def test_cli_dry_run_without_the_hub_says_so_and_lists_what_it_would_fetch(no_hub, models, capsys):
    assert download.main(["--models-dir", str(models), "--dry-run", "all"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: the hub ({no_hub}) cannot be reached (Connection refused): nothing was listed\n"
    out = captured.out
    for item, repo in {space: module.repo for space, module in RELEASED_MODULES.items()}.items():
        assert f"{download.module_folder(item, models)}/ (about 294 MB)" in out and f"<- {repo}\n" in out
    assert out.count(download.WEIGHTS_CHOICES[0]) == 2
    assert f"{models / 'text_encoder'}/ (about 681 MB)" in out and "text_encoder/model.fp16.safetensors" in out
    assert all(repo in out for repo in (*download.TEXT_ENCODER_REPOS, download.OPENCLIP_REPO))
    assert "Error(" not in out + captured.err and not models.exists()


def test_cli_dry_run_in_offline_mode_lists_what_it_would_fetch(no_hub, models, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download.main(["--models-dir", str(models), "--dry-run", "sd"]) == 1
    captured = capsys.readouterr()
    assert "HF_HUB_OFFLINE is set" in captured.err
    assert RELEASED_MODULES["sd"].repo in captured.out and "text_encoder/config.json" in captured.out


def test_cli_text_encoder_without_the_hub_is_one_short_line(no_hub, models, capsys):
    assert download.main(["--models-dir", str(models), "text-encoder"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: the hub ({no_hub}) cannot be reached (Connection refused): nothing was downloaded\n"
    assert captured.out == ""


def test_cli_text_encoder_with_no_usable_source_says_each_on_a_line_of_its_own(hub, models, capsys, monkeypatch,
                                                                              tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    assert download.main(["--models-dir", str(models), "text-encoder"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: no source of the text encoder could be used:",
        *(f"  {repo}: repository not found" for repo in (MIRROR, MIRROR_BASE, download.OPENCLIP_REPO))]


def test_a_first_use_without_the_hub_says_it_cannot_be_reached(no_hub, models):
    with pytest.raises(ModuleMissingError, match=r"Not downloaded: the download failed: the hub \(http://127\.0\.0\.1:"
                       r"\d+\) cannot be reached \(Connection refused\)\. To place it by hand"):
        download.obtain_module("sd", models, ModuleMissingError("no module"))


def test_an_answer_of_the_hub_is_not_taken_for_no_answer(no_hub):
    import requests

    with pytest.raises(requests.ConnectionError) as refused:
        requests.get(no_hub, timeout=5)
    assert download.no_answer_reason(refused.value) == "Connection refused"
    assert download.no_answer_reason(TimeoutError()) == "timed out"
    http_error = urllib.error.HTTPError(no_hub, 404, "Not Found", {}, None)
    assert download.no_answer_reason(http_error) is None
    assert download.no_answer_reason(DownloadError("x")) is None
