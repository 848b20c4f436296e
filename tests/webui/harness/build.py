"""Builds the test WebUIs from the offline archives and their layered Python environments.

Nothing is copied into the repository: every WebUI is unpacked into the work folder, with the helper repositories its
launcher would clone, and gets the extension as a link to this checkout. Packages come from the registry only.
A build is skipped when its stamp says it was made from the same recipe (re-runs in development are quick).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

from matrix import ENVS, UNIT_ENV, WEBUIS, PythonEnv, WebUI

REPO = Path(__file__).resolve().parents[3]
ARCHIVES = Path(os.environ.get("OMS_WEBUI_ARCHIVES", REPO.parent / "shared" / "webui"))
EXTENSION_NAME = "sd-webui-one-more-step"
STAMP = ".oms-harness-stamp.json"


def log(message: str) -> None:
    print(f"[harness] {message}", flush=True)


def run(cmd: list[str]) -> None:
    """Runs a build command, its output shown except pip's notes about this machine's absent local indexes."""
    log("$ " + " ".join(str(c) for c in cmd))
    process = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if not line.startswith("WARNING: Location 'file:"):
            print(line, end="", flush=True)
    if process.wait():
        raise subprocess.CalledProcessError(process.returncode, cmd)


def stamped(folder: Path, recipe: dict) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == recipe


def write_stamp(folder: Path, recipe: dict) -> None:
    (folder / STAMP).write_text(json.dumps(recipe, sort_keys=True))


def unpack(archive: str, top: str, dest: Path) -> None:
    """Unpacks the archive's top folder to ``dest`` (replacing whatever was there)."""
    path = ARCHIVES / archive
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the WebUI archives are expected in {ARCHIVES} "
                                "(set OMS_WEBUI_ARCHIVES to their folder)")
    shutil.rmtree(dest, ignore_errors=True)
    scratch = dest.with_name(dest.name + ".unpacking")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    with tarfile.open(path) as tar:
        tar.extractall(scratch, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(scratch)
    (scratch / top).rename(dest)
    scratch.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# Python environments

def env_dir(work: Path, name: str) -> Path:
    return REPO / ".venv" if name == UNIT_ENV else work / "envs" / name


def env_python(work: Path, name: str) -> Path:
    return env_dir(work, name) / "bin" / "python"


def site_packages(env: Path) -> Path:
    rel = Path(sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip("/"))
    return env / rel


def requirement_name(line: str) -> str:
    return re.split(r"[\s=<>!~\[;@]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(env: PythonEnv, work: Path) -> list[str]:
    """The WebUI's requirements_versions.txt (or a repository file) with this harness's replacements and extras."""
    if env.requirements_of:
        webui = WEBUIS[env.requirements_of]
        text = (webui_dir(work, webui) / "requirements_versions.txt").read_text()
    elif env.requirements_file:
        text = (REPO / env.requirements_file).read_text()
    else:
        text = ""
    lines = []
    for raw in text.replace("\r", "").splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        # a wheel named by URL (reForge's pydantic): its file name starts with the distribution name
        name = line.rsplit("/", 1)[-1].split("-")[0].lower() if "://" in line else requirement_name(line)
        lines.append(env.replace.get(name, line))
    overridden = {requirement_name(x) for x in env.extra}
    return [x for x in lines if requirement_name(x) not in overridden] + list(env.extra)


def build_env(work: Path, name: str) -> Path:
    """Makes (or reuses) the environment ``name`` and its bases; returns its python."""
    if name == UNIT_ENV:
        python = env_python(work, name)
        if not python.exists():
            raise FileNotFoundError(f"{python} is missing: run the README's test command first (it makes .venv)")
        return python
    env = ENVS[name]
    if env.base:
        build_env(work, env.base)
    if env.requirements_of:
        build_webui_tree(work, WEBUIS[env.requirements_of])
    folder = env_dir(work, name)
    recipe = {"requirements": requirements(env, work), "base": env.base}
    if stamped(folder, recipe):
        return env_python(work, name)
    shutil.rmtree(folder, ignore_errors=True)
    run([sys.executable, "-m", "venv", folder])
    if env.base:
        base_site = site_packages(env_dir(work, env.base))
        # addsitedir also reads the base's own .pth files, so layers chain (reforge -> a1111 -> .venv)
        pth = site_packages(folder) / "_oms_harness_base.pth"
        pth.write_text(f"import site; site.addsitedir({str(base_site)!r})\n")
    req_file = folder / "requirements-harness.txt"
    req_file.write_text("\n".join(recipe["requirements"]) + "\n")
    run([env_python(work, name), "-m", "pip", "install", "-q", "--no-cache-dir", "-r", req_file])
    write_stamp(folder, recipe)
    return env_python(work, name)


# ---------------------------------------------------------------------------------------------------------------
# WebUI trees

def webui_dir(work: Path, webui: WebUI) -> Path:
    return work / "webuis" / webui.name


def build_webui_tree(work: Path, webui: WebUI) -> Path:
    """The WebUI unpacked with its helper repositories (no Python environment yet)."""
    folder = webui_dir(work, webui)
    recipe = {"archive": webui.archive, "repositories": webui.repositories}
    if stamped(folder, recipe):
        return folder
    log(f"unpacking {webui.name}")
    unpack(webui.archive, webui.top, folder)
    for sub, archive in webui.repositories.items():  # each archive's top folder is named as its place here
        unpack(archive, sub, folder / "repositories" / sub)
    write_stamp(folder, recipe)
    return folder


def install_extension(folder: Path) -> Path:
    """The extension as the WebUI's Extensions tab leaves it: a folder in extensions/ (here a link to this checkout)."""
    link = folder / "extensions" / EXTENSION_NAME
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(REPO, target_is_directory=True)
    return link


def build_webui(work: Path, webui: WebUI) -> tuple[Path, Path]:
    """The WebUI ready to start: its tree, its environment and the extension. Returns (folder, python)."""
    folder = build_webui_tree(work, webui)
    python = build_env(work, webui.env)
    install_extension(folder)
    return folder, python


def disk_usage(path: Path) -> int:
    """Bytes under ``path`` (links not followed, each file counted once)."""
    total, seen = 0, set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
