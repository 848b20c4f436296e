"""What the runner needs to know about a WebUI that someone installed: its kind, the flags it takes, and whether a run
left its folder as it found it. Pure functions over the folder's files; nothing here starts or changes anything.

The kind is judged by what the folder has (the flags its argument parsers define, the packages beside ``modules/``),
not by a version number, so a fork the runner has not seen still gets the flags it understands.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
EXTENSION_NAME = "sd-webui-one-more-step"
# Files of a WebUI whose content is hashed for the before/after check; bigger ones (checkpoints) by size and mtime.
HASHED_UP_TO_BYTES = 16 * 2**20
# Written by Python itself, not by the WebUI or the runner.
NOT_THE_USERS = {"__pycache__"}
# Folders a WebUI writes in its own tree whatever --data-dir says (Forge Classic updates config_states/cache.db at
# every start): the runner puts them back as it found them.
IN_TREE_STATE = ("config_states",)
# Archives a WebUI may ship and unpack into its own folder on its first start, whatever --data-dir says (Forge Neo:
# backend/huggingface/*.tokenizer.json.xz into nine tokenizer/tokenizer.json files), by how each is opened.
ARCHIVE_OPENERS = {".xz": lzma.open, ".lzma": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
# The test sets of tests/webui (markers from tests/webui/conftest.py).
ALL_TESTS: tuple[str, ...] = ()
SMOKE_XYZ_AND_BROWSER = ("-m", "smoke or xyz or browser or fakes")
# The argument-parser files where WebUIs of the A1111 family define their command-line flags.
FLAG_FILES = ("modules/cmd_args.py", "modules/paths_internal.py", "backend/args.py",
              "ldm_patched/modules/args_parser.py")
# SD.Next (vladmandic/sdnext) has the A1111 layout's launch.py and modules/scripts.py, but runs diffusers pipelines
# (modules/processing_diffusers.py) and its own installer (installer.py, which defines launch.py's install flags:
# --skip-all); told by these files, its flags read from modules/cmd_args.py and installer.py.
SDNEXT_FILES = ("installer.py", "modules/processing_diffusers.py", "modules/scripts_manager.py")
SDNEXT_FLAG_FILES = ("modules/cmd_args.py", "installer.py")
# SD.Next's start takes 80–150 s on 2 busy cores (its libraries, a Triton self-test, then the model in the
# background), up to several times that while other WebUIs run beside it.
SDNEXT_START_TIMEOUT_S = 1800


def log(message: str) -> None:
    print(f"[runner] {message}", flush=True)


@dataclass(frozen=True)
class Kind:
    name: str  # for the report: "A1111 1.10.1", "Forge Neo", …
    forge_family: bool
    flags: frozenset[str]  # every flag the WebUI's parsers define
    can_make_checkpoint: bool  # has the ldm package and configs/v1-inference.yaml that make_checkpoint.py uses
    options: dict = field(default_factory=dict)  # settings the scratch config.json starts with
    sdnext: bool = False  # SD.Next: diffusers models, its own installer flags, another X/Y/Z and UI
    ztsnr_key: bool = False  # a checkpoint's "ztsnr" key turns on a zero-terminal-SNR schedule (Forge Neo's loader)

    def cpu_flags(self) -> tuple[str, ...]:
        """How this WebUI is told to run everything on the CPU, in full precision."""
        if self.sdnext:  # no such flag (--use-cpu is accepted and ignored): it picks the CPU when torch has no GPU
            return ()
        if "--always-cpu" in self.flags:  # Forge, reForge, Forge Classic
            return ("--always-cpu",)
        if "--cpu" in self.flags:  # Forge Neo
            return ("--cpu",)
        return ("--use-cpu", "all", "--no-half", "--precision", "full")  # A1111

    def start_flags(self) -> tuple[str, ...]:
        """Offline start with the API on the loopback; only flags the WebUI has (Neo dropped several)."""
        if self.sdnext:  # --skip-all: no pip or git at start (the API is always on; "--api" would be ambiguous)
            return ("--skip-all", "--server-name", "127.0.0.1", *self.cpu_flags())
        wanted = ("--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-python-version-check",
                  "--skip-version-check", "--no-download-sd-model")
        return (*(flag for flag in wanted if flag in self.flags), "--api", "--server-name", "127.0.0.1",
                *self.cpu_flags())

    def own_files_flags(self, folder: Path) -> tuple[str, ...]:
        """Lets the WebUI serve its own scripts while ``--data-dir`` is elsewhere: Forge Neo (gradio 4) serves files
        only from gradio's allowed paths, which default to the data folder, and answers 403 for every script of its
        own otherwise (its UI then has no hints, no paste, no input accordions)."""
        return ("--gradio-allowed-path", str(folder)) if "--gradio-allowed-path" in self.flags else ()

    def data_flags(self, data: Path) -> tuple[str, ...]:
        """Flags naming files in the scratch data folder: SD.Next writes its log to sdnext.log in its own folder
        unless --log names another file."""
        return ("--log", str(data / "sdnext.log")) if self.sdnext else ()

    @property
    def start_timeout_s(self) -> float:
        return SDNEXT_START_TIMEOUT_S if self.sdnext else 900

    def test_set(self) -> tuple[str, ...]:
        """A1111 runs all of tests/webui; the Forge family the smoke, X/Y/Z (their X/Y/Z is their own copy), browser
        (their UI is their own too) and fakes (test_webui_fakes_match.py) sets. SD.Next runs all of it: the tests that
        do not apply there skip themselves, saying why (tests/webui/conftest.py), and test_webui_sdnext.py covers what
        is its own."""
        return SMOKE_XYZ_AND_BROWSER if self.forge_family else ALL_TESTS


def defined_flags(folder: Path, files: tuple[str, ...] = FLAG_FILES) -> frozenset[str]:
    found = set()
    for name in files:
        path = folder / name
        if path.is_file():
            found.update(re.findall(r"add_argument\(\s*[\"'](--[a-z0-9-]+)[\"']", path.read_text(errors="replace")))
    return frozenset(found)


def _heading(folder: Path) -> str:
    readme = folder / "README.md"
    if not readme.is_file():
        return ""
    for line in readme.read_text(errors="replace").splitlines():
        text = re.sub(r"<[^>]+>|^#+", "", line).strip()
        if text:
            return text
    return ""


def a1111_version(folder: Path) -> str:
    """The newest release in CHANGELOG.md ("## 1.10.1"), which is the release a tag's tree is."""
    changelog = folder / "CHANGELOG.md"
    if changelog.is_file():
        found = re.search(r"^## (\d+\.\d+\.\d+)", changelog.read_text(errors="replace"), re.MULTILINE)
        if found:
            return found.group(1)
    return "unknown version"


def settings_version(folder: Path) -> dict:
    """The settings version a WebUI writes into a new config.json and waits at start-up for Enter when another
    config.json lacks it (Forge Neo: VERSION_UID in modules/launch_utils.py), so that the scratch config.json has it."""
    source = folder / "modules" / "launch_utils.py"
    found = re.search(r"^VERSION_UID\b[^=\n]*=\s*[\"']([^\"']+)[\"']", source.read_text(errors="replace"),
                      re.MULTILINE) if source.is_file() else None
    return {"VERSION_UID": found.group(1)} if found else {}


def detect(folder: Path) -> Kind:
    """The WebUI in ``folder``; raises ValueError, saying what is missing, for a folder that is not one."""
    if not (folder / "launch.py").is_file() or not (folder / "modules" / "scripts.py").is_file():
        raise ValueError(f"{folder} is not an A1111-family WebUI: it has no launch.py and modules/scripts.py")
    if all((folder / name).is_file() for name in SDNEXT_FILES):
        return detect_sdnext(folder)
    flags = defined_flags(folder)
    if "--data-dir" not in flags:
        raise ValueError(f"{folder}: the WebUI has no --data-dir flag, so the runner cannot keep its files apart")
    forge_family = (folder / "modules_forge").is_dir()
    heading = _heading(folder)
    if not forge_family:
        name = f"A1111 {a1111_version(folder)}"
    elif "Neo" in heading:
        name = "Forge Neo"
    elif "reForge" in heading:
        name = "reForge"
    elif (folder / "extensions-builtin" / "xyz").is_dir():  # Classic moved the X/Y/Z plot there
        name = "Forge Classic"
    else:
        name = "Forge"
    options = {"live_previews_enable": False} if name == "reForge" else {}  # its live preview would download a model
    options.update(settings_version(folder))
    ldm = folder / "repositories" / "stable-diffusion-stability-ai" / "ldm"
    loader = folder / "backend" / "loader.py"
    ztsnr_key = loader.is_file() and '"ztsnr" in' in loader.read_text(errors="replace")
    return Kind(name, forge_family, flags, ldm.is_dir() and (folder / "configs" / "v1-inference.yaml").is_file(),
                options, ztsnr_key=ztsnr_key)


# What the runner names SD.Next's test model: <data-dir>/models/Diffusers/<this>, which SD.Next lists as
# "Diffusers/<this>".
SDNEXT_MODEL = "sd15-tiny-random"


def detect_sdnext(folder: Path) -> Kind:
    """SD.Next. Its settings keep it offline (offline_mode: no pip call, models loaded from local files only) and
    choose the test model, a diffusers folder (its --ckpt fails for a folder: the runner never passes it)."""
    flags = defined_flags(folder, SDNEXT_FLAG_FILES)
    for needed in ("--data-dir", "--skip-all", "--log"):
        if needed not in flags:
            raise ValueError(f"{folder}: SD.Next without its {needed} flag, which the runner needs")
    options = {"offline_mode": True, "sd_model_checkpoint": f"Diffusers/{SDNEXT_MODEL}"}
    return Kind("SD.Next", False, frozenset(flags - {"--ckpt"}), False, options, sdnext=True)


def commit_of(folder: Path) -> str | None:
    """The checked-out commit when the folder is a git clone (read from .git, no git needed)."""
    head = folder / ".git" / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text().strip()
    if not ref.startswith("ref: "):
        return ref[:12]
    ref_file = folder / ".git" / ref[5:]
    if ref_file.is_file():
        return ref_file.read_text().strip()[:12]
    packed = folder / ".git" / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            if line.endswith(" " + ref[5:]):
                return line[:12]
    return None


def snapshot(folder: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every file under ``folder`` (links not followed) with its size and content hash, or its size and mtime when it
    is big, so that a later snapshot shows what changed. ``skip``: folders left out (the WebUI's own venv)."""
    skipped = {p.resolve() for p in skip}
    state = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in NOT_THE_USERS and (Path(root) / d).resolve() not in skipped]
        for name in files:
            path = Path(root) / name
            st = path.lstat()
            if path.is_symlink():
                state[str(path.relative_to(folder))] = ("link", os.readlink(path))
            elif st.st_size <= HASHED_UP_TO_BYTES:
                state[str(path.relative_to(folder))] = (st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                state[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return state


@contextlib.contextmanager
def kept_as_found(folder: Path, spare: Path, names: tuple[str, ...] = IN_TREE_STATE):
    """The folders ``names`` of the WebUI put back as they were when the block ends, however it ends: copied into
    ``spare`` first, then restored (or removed, when there was none). Says which ones the WebUI changed."""
    if spare.exists():
        shutil.rmtree(spare)
    spare.mkdir(parents=True)
    kept = {}
    for name in names:
        path = folder / name
        kept[name] = path.is_dir()
        if kept[name]:
            shutil.copytree(path, spare / name, symlinks=True)
    before = {name: snapshot(folder / name) for name in names}
    try:
        yield
    finally:
        for name, existed in kept.items():
            path = folder / name
            if snapshot(path) == before[name] and path.is_dir() == existed:
                continue
            log(f"the WebUI changed its own {name}/ (it writes there whatever --data-dir says): putting it back")
            if path.is_dir():
                shutil.rmtree(path)
            if existed:
                shutil.copytree(spare / name, path, symlinks=True)
        shutil.rmtree(spare)


def changes(before: dict[str, tuple], after: dict[str, tuple], exempt: frozenset[str] = frozenset()) -> list[str]:
    """What differs between two snapshots, one line per file: "added x", "removed y", "changed z". ``exempt``: added
    files that are not reported (the WebUI's own first-start files, ``own_unpacked``)."""
    lines = [f"added {p}" for p in sorted(after.keys() - before.keys() - exempt)]
    lines += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines


def _archive_of(archive: Path, name: str) -> bool:
    """Whether ``archive`` is named as an archive of a file called ``name`` ("wan.tokenizer.json.xz")."""
    return archive.suffix in ARCHIVE_OPENERS and archive.name.endswith(name + archive.suffix)


def _digest_of_unpacked(archive: Path) -> str | None:
    opener = ARCHIVE_OPENERS[archive.suffix]
    digest = hashlib.sha256()
    try:
        with opener(archive, "rb") as stream:
            for chunk in iter(lambda: stream.read(2**20), b""):
                digest.update(chunk)
    except (OSError, EOFError, lzma.LZMAError):
        return None
    return digest.hexdigest()


def own_unpacked(folder: Path, before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, str]:
    """The files a run added to the WebUI's folder that the WebUI unpacked from an archive of its own: {file: archive}.

    A file counts only when an archive that was in the folder before the run, unchanged since, lies in the file's
    own folder or a folder above it (within the WebUI's folder), is named after the file (``*tokenizer.json.xz`` for
    ``tokenizer.json``) and unpacks to exactly the file's bytes. Every other added file is a change."""
    unpacked: dict[Path, str | None] = {}
    found = {}
    for added in sorted(after.keys() - before.keys()):
        path = folder / added
        if after[added][0] == "link" or not path.is_file():
            continue
        content = None
        for parent in Path(added).parents:
            candidates = [name for name in before if Path(name).parent == parent and _archive_of(Path(name), path.name)
                          and after.get(name) == before[name]]
            for archive in sorted(candidates):
                if archive not in unpacked:
                    unpacked[archive] = _digest_of_unpacked(folder / archive)
                if content is None:
                    content = hashlib.sha256(path.read_bytes()).hexdigest()
                if unpacked[archive] == content:
                    found[added] = archive
                    break
            if added in found:
                break
    return found
