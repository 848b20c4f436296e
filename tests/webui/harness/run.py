"""Builds the real WebUIs from ../shared/webui/, starts each offline and runs tests/webui against it.

    .venv/bin/python tests/webui/harness/run.py [--only a1111-1.10.1,forge] [--work test-webuis] [--no-oldest-unit]
                                                [--first-use-only]

Run with the repository's test environment (.venv, made by the README's test command). For each WebUI of the matrix
(matrix.py) it unpacks the archive and the helper repositories its launcher would clone, builds its layered Python
environment from the registry, links this checkout in as the extension, starts the server on 127.0.0.1 with a random
SD 1.5 checkpoint and random OMS files (assets.py), runs its share of tests/webui, and stops it. After A1111 1.10.1's
run comes its first-use phase: the same WebUI started again with an empty models/oms and a fake Hugging Face hub
(tests/fake_hub.py) as HF_ENDPOINT, for test_webui_first_use.py. Then it runs the unit suite on the oldest supported
stack (A1111 1.6.0's torch 2.0.1). Prints minutes, disk and test counts per WebUI; exits non-zero if anything failed.
Everything goes to the work folder (default test-webuis/ in the checkout, ignored by git); a second run reuses what is
already built.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from assets import EXTRA_MODULE_NAME, first_use_repos, make_checkpoint, make_clip_l_cache, make_oms_folders  # noqa: E402
from build import REPO, build_env, build_webui, disk_usage, env_dir, log  # noqa: E402
from matrix import WEBUIS, WebUI  # noqa: E402
from server import Server  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "webui"))
import seams_files  # noqa: E402
from fake_hub import FakeHub  # noqa: E402

# Not a hidden folder: the WebUIs' gradio refuses to serve files (their own JavaScript too) under a ".name" folder.
WORK_FOLDER = "test-webuis"
CHECKPOINT_WEBUI = "a1111-1.10.1"  # whose ldm and v1-inference.yaml make the shared checkpoint
OLDEST_UNIT_ENV = "oldest-unit"
FIRST_USE_WEBUI = "a1111-1.10.1"
FIRST_USE_TESTS = "tests/webui/test_webui_first_use.py"


def pytest_counts(junit: Path) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if not junit.is_file():
        return counts
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        tests, failures = int(suite.get("tests", 0)), int(suite.get("failures", 0))
        errors, skipped = int(suite.get("errors", 0)), int(suite.get("skipped", 0))
        counts["failed"] += failures
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += tests - failures - errors - skipped
    return counts


def run_pytest(python: Path, args: list[str], env: dict, junit: Path) -> tuple[int, float]:
    started = time.monotonic()
    cmd = [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={junit}", *args]
    log("$ " + " ".join(cmd))
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    return code, time.monotonic() - started


def link_models(webui_folder: Path, oms: Path) -> None:
    """<webui>/models/oms is where users put modules: here a link to the shared random files."""
    target = webui_folder / "models" / "oms"
    target.parent.mkdir(exist_ok=True)
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.symlink_to(oms, target_is_directory=True)


def serve_and_test(result: dict, webui: WebUI, folder: Path, python: Path, flags: tuple[str, ...], checkpoint: Path,
                   hf_home: Path, work: Path, pytest_args: list[str], server_env: dict | None = None,
                   test_env: dict | None = None) -> None:
    """Starts the WebUI, runs pytest against it and stops it; the times, counts and exit code go into ``result``."""
    log_name = result["webui"].replace(" ", "-")
    server = Server(folder, python, flags, checkpoint, hf_home, work / "logs" / f"{log_name}.log", webui.options,
                    env_changes=server_env)
    try:
        result["start_s"] = server.start()
        env = {**os.environ, "SD_WEBUI_URL": server.url, "SD_WEBUI_NAME": webui.name,
               "SD_WEBUI_LOG": str(server.log_path), **(test_env or {})}
        junit = work / "logs" / f"{log_name}.junit.xml"
        code, result["tests_s"] = run_pytest(REPO / ".venv" / "bin" / "python", pytest_args, env, junit)
        result.update(pytest_counts(junit), exit_code=code)
    finally:
        server.stop()


def test_webui(name: str, work: Path, checkpoint: Path, hf_home: Path, oms: Path, extra_oms: Path,
               extra_pytest: list[str]) -> dict:
    webui = WEBUIS[name]
    result = {"webui": name}
    started = time.monotonic()
    try:
        folder, python = build_webui(work, webui)
        link_models(folder, oms)
        seams_files.write(folder, checkpoint)
        result["build_s"] = time.monotonic() - started
        serve_and_test(result, webui, folder, python, (*webui.flags, "--oms-models-dir", str(extra_oms)), checkpoint,
                       hf_home, work, ["tests/webui", *webui.pytest_args, *extra_pytest],
                       test_env={"SD_WEBUI_OMS_EXTRA_MODULE": EXTRA_MODULE_NAME})
    except Exception as error:  # a WebUI that does not build or start fails its row; the others still run
        log(f"{name}: {error}")
        result.update(exit_code=1, error=str(error)[:2000])
    return result


@contextlib.contextmanager
def oms_settings_unset(folder: Path):
    """The WebUI's config.json without the extension's settings while in the block, as before its first start (a text
    encoder path that another run set would be used instead of a download); put back as it was afterwards."""
    config = folder / "config.json"
    saved = config.read_text() if config.is_file() else None
    if saved is not None:
        settings = {key: value for key, value in json.loads(saved).items() if not key.startswith("oms_")}
        config.write_text(json.dumps(settings, indent=4))
    try:
        yield
    finally:
        if saved is None:
            config.unlink(missing_ok=True)
        else:
            config.write_text(saved)


def test_first_use(work: Path, checkpoint: Path, hf_home: Path, oms: Path, extra_pytest: list[str]) -> dict:
    """A1111 1.10.1 started again as on a user's first day: models/oms linked to an empty folder, no --oms-models-dir,
    no OMS setting, a fake hub serving the SD module and the first text-encoder mirror (assets.first_use_repos) as
    HF_ENDPOINT, and HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE unset (huggingface_hub, and so the extension, reads
    either as offline). The hub writes every request to logs/first-use-hub.jsonl for the tests. models/oms and the
    settings are put back afterwards, and the downloaded files removed when the phase passed."""
    webui = WEBUIS[FIRST_USE_WEBUI]
    result = {"webui": f"{FIRST_USE_WEBUI} first use", "of": FIRST_USE_WEBUI}
    started = time.monotonic()
    folder = None
    try:
        folder, python = build_webui(work, webui)
        empty = work / "first-use" / "oms"
        if empty.exists():
            shutil.rmtree(empty)
        empty.mkdir(parents=True)
        link_models(folder, empty)
        hub_log = work / "logs" / "first-use-hub.jsonl"
        hub_log.unlink(missing_ok=True)
        with FakeHub(log_path=hub_log) as hub, oms_settings_unset(folder):
            for repo, files in first_use_repos(oms).items():
                hub.add(repo, files)
            result["build_s"] = time.monotonic() - started
            serve_and_test(result, webui, folder, python, webui.flags, checkpoint, hf_home, work,
                           [FIRST_USE_TESTS, *extra_pytest],
                           server_env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None},
                           test_env={"SD_WEBUI_FAKE_HUB": hub.url, "SD_WEBUI_FAKE_HUB_LOG": str(hub_log),
                                     "SD_WEBUI_OMS_DIR": str(folder / "models" / "oms")})
    except Exception as error:
        log(f"{result['webui']}: {error}")
        result.update(exit_code=1, error=str(error)[:2000])
    finally:
        if folder is not None:
            link_models(folder, oms)
    if result.get("exit_code") == 0:  # the downloaded copies (0.7 GB) are kept only to look into a failure
        shutil.rmtree(work / "first-use")
    result["phase_s"] = time.monotonic() - started
    log(f"{result['webui']}: {result['phase_s']:.0f} s in all")
    return result


def test_oldest_unit(work: Path) -> dict:
    started = time.monotonic()
    python = build_env(work, OLDEST_UNIT_ENV)
    result = {"webui": "unit suite, oldest stack", "build_s": time.monotonic() - started}
    junit = work / "logs" / "oldest-unit.junit.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_URL", "VIRTUAL_ENV")}
    code, result["tests_s"] = run_pytest(python, [], env, junit)
    result.update(pytest_counts(junit), exit_code=code)
    return result


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f}"


def report(results: list[dict], work: Path, total_s: float) -> None:
    print("\n| WebUI | build | start | tests | passed | failed | skipped | WebUI folder GiB | env GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        name, of = r["webui"], r.get("of", r["webui"])
        folder = work / "webuis" / of
        env = env_dir(work, WEBUIS[of].env) if of in WEBUIS else env_dir(work, OLDEST_UNIT_ENV)
        row = [name, *(f"{r[k]:.0f} s" if k in r else "-" for k in ("build_s", "start_s", "tests_s")),
               str(r.get("passed", "-")), str(r.get("failed", 0) + r.get("errors", 0)), str(r.get("skipped", "-")),
               gib(disk_usage(folder)) if folder.is_dir() else "-", gib(disk_usage(env)) if env.is_dir() else "-"]
        r["webui_gib"], r["env_gib"] = row[-2], row[-1]
        print("| " + " | ".join(row) + " |")
    work_bytes, venv_bytes = disk_usage(work), disk_usage(REPO / ".venv")
    print(f"\nwork folder {work}: {gib(work_bytes)} GiB; .venv (shared torch 2.14.1): {gib(venv_bytes)} GiB; "
          f"total {gib(work_bytes + venv_bytes)} GiB; {total_s / 60:.1f} min")
    (work / "report.json").write_text(json.dumps({"results": results, "work_gib": gib(work_bytes),
                                                  "venv_gib": gib(venv_bytes), "total_s": total_s}, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("OMS_WEBUI_WORK", REPO / WORK_FOLDER)))
    parser.add_argument("--only", default=",".join(WEBUIS), help="comma-separated WebUIs (default: all): "
                        + ", ".join(WEBUIS))
    parser.add_argument("--no-oldest-unit", action="store_true", help="skip the unit suite on the oldest stack")
    parser.add_argument("--first-use-only", action="store_true",
                        help=f"run only {FIRST_USE_WEBUI}'s first-use phase (no other test run, no oldest-stack suite)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments for tests/webui (after --)")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WEBUIS]
    if unknown:
        parser.error(f"unknown WebUI {unknown}: choose from {list(WEBUIS)}")

    started = time.monotonic()
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    assets = work / "assets"
    hf_home = make_clip_l_cache(assets / "hf")
    oms, extra_oms = make_oms_folders(assets)
    folder, python = build_webui(work, WEBUIS[CHECKPOINT_WEBUI])
    checkpoint = make_checkpoint(assets, python, folder, hf_home)
    # the shared set-up: random files, A1111 1.10.1's tree and environment, the checkpoint made with its ldm
    results = [{"webui": "set-up (shared files, A1111 1.10.1 build)", "of": CHECKPOINT_WEBUI, "exit_code": 0,
                "build_s": time.monotonic() - started}]
    for name in [] if args.first_use_only else names:
        results.append(test_webui(name, work, checkpoint, hf_home, oms, extra_oms, args.pytest_args))
        if name == FIRST_USE_WEBUI:
            results.append(test_first_use(work, checkpoint, hf_home, oms, args.pytest_args))
    if args.first_use_only:
        results.append(test_first_use(work, checkpoint, hf_home, oms, args.pytest_args))
    elif not args.no_oldest_unit:
        results.append(test_oldest_unit(work))
    report(results, work, time.monotonic() - started)
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
