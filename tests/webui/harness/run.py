"""Runs tests/webui against a WebUI that is already installed, without touching anything of its user's.

    .venv-test/bin/python tests/webui/harness/run.py --webui ~/stable-diffusion-webui [--python PY] [--work DIR]
                                                [--checkpoint FILE] [--all] [--no-first-use] [--beside FOLDER]
                                                [-- PYTEST_ARGS]

Run it with the repository's test environment (.venv-test, made by the README's test command). ``--python`` is the
Python the WebUI runs with (default: its ``venv/bin/python``); it needs the extension's requirements
(requirements.txt), which the extension's install.py installs on a normal start. The runner

1. recognises the WebUI (A1111 1.6–1.10, Forge, reForge, Forge Classic, Forge Neo, SD.Next) from the flags it defines
   and the folders it has (host.py);
2. makes the random test files in the work folder (assets.py): OMS modules in the released layout, an OpenCLIP-H text
   encoder, a CLIP-L tokenizer cache, and a random SD 1.5 checkpoint from the WebUI's own configs/v1-inference.yaml
   (or ``--checkpoint``; Forge Neo has no ldm to make one, so a checkpoint an earlier run made is reused); for SD.Next,
   which loads diffusers folders, a small random SD 1.5-shaped diffusers model made with its own diffusers;
3. starts the WebUI on 127.0.0.1 with ``--data-dir`` set to a scratch folder in the work folder, whose extensions/
   links to this checkout and whose models/ hold the test files, and with HF_HOME set to the work folder: the
   WebUI's own models, extensions, config.json, ui-config.json and the user's Hugging Face cache are not read or
   written. Beside the extension, the tests phase links the extensions named by ``--beside`` (for
   test_webui_beside_extensions.py) and the test-only probe extension (tests/webui/probe/), which
   records what the WebUI really has where tests/webui_fakes.py stands in for it (logs/fakes-probe.json), for
   test_webui_fakes_match.py;
4. runs the tests/webui set that fits the kind (all for A1111; smoke, X/Y/Z, browser and the fakes check for the
   Forge family; ``--all`` for everything), then, as on a user's first day, starts it again with an empty models/oms
   and tests/fake_hub.py as the hub for test_webui_first_use.py, and the prompt-parser agreement test against the
   WebUI's source;
5. stops the server (also when a test or the server fails), checks that the WebUI's folder is byte-identical to
   before (Python's __pycache__ aside; what it writes in its own config_states/ is put back) and prints the counts.
   A file the WebUI unpacked on its first start from an archive of its own already in its folder (Forge Neo's
   tokenizer.json files) is named as the WebUI's own and not counted as a change; any other file is. Exits non-zero
   if anything failed or changed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import host  # noqa: E402
from assets import (  # noqa: E402
    EXTRA_MODULE_NAME,
    first_use_repos,
    make_checkpoint,
    make_clip_l_cache,
    make_oms_folders,
    make_ztsnr_checkpoint,
)
from host import EXTENSION_NAME, REPO, SDNEXT_MODEL, Kind, log  # noqa: E402
from server import Server  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "webui"))
import seams_files  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.fake_hub import FakeHub  # noqa: E402

# Not a hidden folder: the WebUIs' gradio refuses to serve files (their own JavaScript too) under a ".name" folder.
WORK_FOLDER = "test-webuis"
CHECKPOINT_NAME = "sd15_random.safetensors"
ZTSNR_CHECKPOINT_NAME = "sd15_random_ztsnr.safetensors"
FIRST_USE_TESTS = "tests/webui/test_webui_first_use.py"
SOURCE_TESTS = "tests/test_webui_support.py::test_fake_prompt_parser_reads_the_first_step_as_the_webui"
PROBE = REPO / "tests" / "webui" / "probe"
PROBE_NAME = "oms-fakes-probe"
PROBE_FILE = "fakes-probe.json"  # in logs/
# What the extension needs in the WebUI's Python beyond what every WebUI has.
NEEDED_MODULES = ("torch", "safetensors", "transformers", "open_clip")


def pytest_counts(junit: Path) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if not junit.is_file():
        return counts
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        counts["failed"] += failed
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - skipped
    return counts


def run_pytest(args: list[str], env: dict, junit: Path) -> dict:
    started = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={junit}", *args]
    log("$ " + " ".join(cmd))
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    return {**pytest_counts(junit), "exit_code": code, "tests_s": time.monotonic() - started}


def missing_modules(python: Path) -> list[str]:
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    reply = subprocess.run([str(python), "-c", probe, *NEEDED_MODULES], capture_output=True, text=True)
    if reply.returncode:
        raise SystemExit(f"{python} does not run: {reply.stderr.strip()[-500:]}")
    return reply.stdout.split()


def python_prefix(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                               check=True).stdout.strip())


def link(target: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def data_folder(work: Path, name: str, kind: Kind, checkpoint: Path, oms: Path | None) -> Path:
    """A fresh ``--data-dir`` for one server start: the extension (a link to this checkout), the checkpoint, the
    OMS files (a folder of links, so that what the tests write there stays out of the shared files; ``None``: an
    empty models/oms, as on first use) and the settings the kind needs."""
    if kind.sdnext:
        return sdnext_data_folder(work, name, kind, checkpoint, oms)
    data = work / "data" / name
    if data.exists():
        shutil.rmtree(data)
    link(REPO, data / "extensions" / EXTENSION_NAME)
    link(checkpoint, data / "models" / "Stable-diffusion" / CHECKPOINT_NAME)
    (data / "models" / "oms").mkdir(parents=True)
    for entry in sorted(oms.iterdir()) if oms else ():
        link(entry, data / "models" / "oms" / entry.name)
    options = dict(kind.options)
    if "--ckpt" not in kind.flags:  # Neo has no --ckpt: the setting picks the checkpoint instead
        options["sd_model_checkpoint"] = CHECKPOINT_NAME
    (data / "config.json").write_text(json.dumps(options, indent=2))
    return data


def sdnext_data_folder(work: Path, name: str, kind: Kind, model: Path, oms: Path | None) -> Path:
    """data_folder for SD.Next: the diffusers model in models/Diffusers, chosen (with offline_mode) in config.json."""
    data = work / "data" / name
    if data.exists():
        shutil.rmtree(data)
    link(REPO, data / "extensions" / EXTENSION_NAME)
    link(model, data / "models" / "Diffusers" / SDNEXT_MODEL)
    (data / "models" / "oms").mkdir(parents=True)
    for entry in sorted(oms.iterdir()) if oms else ():
        link(entry, data / "models" / "oms" / entry.name)
    # SD.Next's offline mode sets HF_HUB_OFFLINE for its whole process when it loads a model, which rightly keeps One
    # More Step from downloading: the first-use phase (oms None, a fake hub on 127.0.0.1) runs without it.
    options = {**kind.options, "offline_mode": False} if oms is None else kind.options
    (data / "config.json").write_text(json.dumps(options, indent=2))
    return data


def serve_and_test(name: str, folder: Path, python: Path, kind: Kind, data: Path, checkpoint: Path, hf_home: Path,
                   work: Path, pytest_args: list[str], flags: tuple[str, ...] = (), server_env: dict | None = None,
                   test_env: dict | None = None) -> dict:
    """Starts the WebUI, runs pytest against it and stops it, whatever happens in between."""
    flags = ("--data-dir", str(data), *(("--ckpt", str(data / "models" / "Stable-diffusion" / CHECKPOINT_NAME))
                                        if "--ckpt" in kind.flags else ()), *kind.own_files_flags(folder),
             *kind.start_flags(), *flags)
    flags += kind.data_flags(data)
    server = Server(folder, python, flags, hf_home, work / "logs" / f"{name}.log", env_changes=server_env)
    result = {"phase": name}
    try:
        result["start_s"] = server.start(kind.start_timeout_s)
        env = {**os.environ, "SD_WEBUI_URL": server.url, "SD_WEBUI_LOG": str(server.log_path), **(test_env or {})}
        result.update(run_pytest(pytest_args, env, work / "logs" / f"{name}.junit.xml"))
    except Exception as error:  # a server that does not start fails its phase; the folder check still runs
        log(f"{name}: {error}")
        result.update(exit_code=1, error=str(error)[-2000:])
    finally:
        server.stop()
    return result


def first_use(folder: Path, python: Path, kind: Kind, work: Path, checkpoint: Path, hf_home: Path, oms: Path,
              extra_pytest: list[str]) -> dict:
    """The WebUI as on a user's first day: an empty models/oms, no OMS setting, a fake hub serving the SD module and
    the first text-encoder mirror as HF_ENDPOINT, HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE unset (either makes
    huggingface_hub, and so the extension, offline). The hub writes every request to logs/first-use-hub.jsonl."""
    data = data_folder(work, "first-use", kind, checkpoint, None)
    hub_log = work / "logs" / "first-use-hub.jsonl"
    hub_log.unlink(missing_ok=True)
    with FakeHub(log_path=hub_log) as hub:
        for repo, files in first_use_repos(oms).items():
            hub.add(repo, files)
        result = serve_and_test("first-use", folder, python, kind, data, checkpoint, hf_home, work,
                                [FIRST_USE_TESTS, *extra_pytest],
                                server_env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": None,
                                            "TRANSFORMERS_OFFLINE": None},
                                test_env={"SD_WEBUI_FAKE_HUB": hub.url, "SD_WEBUI_FAKE_HUB_LOG": str(hub_log),
                                          "SD_WEBUI_OMS_DIR": str(data / "models" / "oms")})
    if result["exit_code"] == 0:  # the downloaded copies are kept only to look into a failure
        shutil.rmtree(data)
    return result


def the_checkpoint(args, kind: Kind, folder: Path, python: Path, assets: Path, hf_home: Path) -> Path:
    if args.checkpoint:
        return args.checkpoint.resolve()
    if kind.sdnext:
        from assets import make_diffusers_model

        return make_diffusers_model(assets / SDNEXT_MODEL, python, hf_home)
    made = assets / CHECKPOINT_NAME
    if made.is_file() or kind.can_make_checkpoint:
        return make_checkpoint(made, python, folder, hf_home)
    raise SystemExit(f"{kind.name} has no ldm package to make a random SD 1.5 checkpoint with: pass --checkpoint "
                     f"FILE, or run the runner once against an A1111 WebUI, which leaves one in {made}")


def report(kind: Kind, folder: Path, results: list[dict], changed: list[str], total_s: float,
           own: dict[str, str] | None = None) -> None:
    commit = host.commit_of(folder)
    print(f"\n{kind.name}{f' ({commit})' if commit else ''} in {folder}: {total_s / 60:.1f} min")
    print("| phase | start | tests | passed | failed | skipped |\n|---|---|---|---|---|---|")
    for r in results:
        times = [f"{r[k]:.0f} s" if k in r else "-" for k in ("start_s", "tests_s")]
        print(f"| {r['phase']} | {' | '.join(times)} | {r.get('passed', '-')} | "
              f"{r.get('failed', '-') if 'error' not in r else 'server failed'} | {r.get('skipped', '-')} |")
    if own:
        print(f"\nthe WebUI unpacked {len(own)} files of its own on its first start (not counted as changes):\n  "
              + "\n  ".join(f"{path} (from {archive})" for path, archive in sorted(own.items())))
    if changed:
        print(f"\nthe WebUI's folder changed ({len(changed)} files):\n  " + "\n  ".join(changed[:50]))
    elif own:
        print("\nbesides those, the WebUI's folder is byte-identical to before the run")
    else:
        print("\nthe WebUI's folder is byte-identical to before the run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", type=Path, required=True, help="the installed WebUI's folder")
    parser.add_argument("--python", type=Path, help="the Python the WebUI runs with (default: WEBUI/venv/bin/python)")
    parser.add_argument("--work", type=Path, default=REPO / WORK_FOLDER,
                        help="where the random files and the scratch data folders go (default: test-webuis/)")
    parser.add_argument("--checkpoint", type=Path, help="an SD 1.5 checkpoint to test with instead of a random one")
    parser.add_argument("--all", action="store_true", help="all of tests/webui whatever the kind")
    parser.add_argument("--no-first-use", action="store_true", help="skip the first-use phase")
    parser.add_argument("--first-use-only", action="store_true", help="only the first-use phase")
    parser.add_argument("--beside", type=Path, action="append", default=[], metavar="FOLDER",
                        help="an installed extension to link beside this one for the tests phase "
                             "(test_webui_beside_extensions.py); repeatable")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments for tests/webui (after --)")
    args = parser.parse_args(argv)

    folder = args.webui.expanduser().resolve()
    try:
        kind = host.detect(folder)
    except ValueError as error:
        parser.error(str(error))
    python = (args.python or folder / "venv" / "bin" / "python").expanduser()
    if not python.is_file():
        parser.error(f"{python} does not exist: pass the WebUI's Python with --python")
    missing = missing_modules(python)
    if missing:
        parser.error(f"{python} lacks {', '.join(missing)}: install the extension's requirements into it "
                     f"({python} -m pip install -r {REPO / 'requirements.txt'}), as its install.py does on a "
                     "normal start")
    started = time.monotonic()
    work = args.work.expanduser().resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log(f"{kind.name} in {folder}, Python {python}; work folder {work}")
    before = host.snapshot(folder, skip=(python_prefix(python),))

    with host.kept_as_found(folder, work / "kept"):
        assets = work / "assets"
        hf_home = make_clip_l_cache(assets / "hf")
        oms, extra_oms = make_oms_folders(assets)
        checkpoint = the_checkpoint(args, kind, folder, python, assets, hf_home)
        tests = list(host.ALL_TESTS if args.all else kind.test_set())
        results = []
        if not args.first_use_only:
            data = data_folder(work, "tests", kind, checkpoint, oms)
            seams_files.write(data, checkpoint)
            if not kind.sdnext:  # the probe records what tests/webui_fakes.py copies: the A1111 family's objects
                link(PROBE, data / "extensions" / PROBE_NAME)
            for other in args.beside:
                link(other.expanduser(), data / "extensions" / other.expanduser().resolve().name)
            ztsnr_env = {}
            if kind.ztsnr_key:
                link(make_ztsnr_checkpoint(assets / ZTSNR_CHECKPOINT_NAME, checkpoint),
                     data / "models" / "Stable-diffusion" / ZTSNR_CHECKPOINT_NAME)
                ztsnr_env = {"SD_WEBUI_ZTSNR_CHECKPOINT": ZTSNR_CHECKPOINT_NAME}
            probe_file = work / "logs" / PROBE_FILE
            probe_file.unlink(missing_ok=True)
            results.append(serve_and_test("tests", folder, python, kind, data, checkpoint, hf_home, work,
                                          ["tests/webui", *tests, *args.pytest_args],
                                          flags=("--oms-models-dir", str(extra_oms)),
                                          server_env={"OMS_FAKES_PROBE": str(probe_file)},
                                          test_env={"SD_WEBUI_OMS_EXTRA_MODULE": EXTRA_MODULE_NAME,
                                                    "SD_WEBUI_PROBE": str(probe_file), "SD_WEBUI_KIND": kind.name,
                                                    **ztsnr_env}))
            if kind.sdnext:
                log("no prompt-parser comparison: SD.Next's modules/prompt_parser.py imports its modules.shared and "
                    "compel, so it loads only inside SD.Next (test_webui_api.py sends OMS prompts in that syntax "
                    "instead)")
            else:
                results.append({"phase": "WebUI source", **run_pytest(
                    [SOURCE_TESTS], {**os.environ, "SD_WEBUI_DIR": str(folder)}, work / "logs" / "source.junit.xml")})
        if not args.no_first_use:
            results.append(first_use(folder, python, kind, work, checkpoint, hf_home, oms, args.pytest_args))
    after = host.snapshot(folder, skip=(python_prefix(python),))
    own = host.own_unpacked(folder, before, after)
    changed = host.changes(before, after, exempt=frozenset(own))
    report(kind, folder, results, changed, time.monotonic() - started, own)
    return 0 if all(r["exit_code"] == 0 for r in results) and not changed else 1


if __name__ == "__main__":
    sys.exit(main())
