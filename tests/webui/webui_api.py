"""A tiny HTTP client for a running AUTOMATIC1111 WebUI (``--api``) and the extension's public API contract.

Only the standard library talks to the server; Pillow and numpy decode images so that comparisons are on pixels
(the PNG bytes carry the infotext, which differs between otherwise identical images).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
from PIL import Image

BASE_URL = os.environ.get("SD_WEBUI_URL", "").rstrip("/")
# Generous: a 64x64 image takes seconds, but the first OMS call loads the module and the text encoder on CPU.
TIMEOUT_S = float(os.environ.get("SD_WEBUI_TIMEOUT", "900"))

# The public API of the extension, as API users write it (positional order = ui() order, dict keys, infotext keys,
# X/Y/Z axis labels). Changing any of these breaks callers: these tests pin them.
SCRIPT_TITLE = "One More Step"
ARG_NAMES = ("enabled", "module", "prompt", "negative_prompt", "cfg", "solver")
ARG_LABELS = ("One More Step", "OMS module", "OMS prompt", "OMS negative prompt", "OMS CFG", "OMS solver")
ARG_DEFAULTS = (False, "Automatic", "", "", 1.0, "SDE")
INFOTEXT_KEYS = ("OMS", "OMS module", "OMS prompt", "OMS negative prompt", "OMS CFG", "OMS solver", "OMS skipped",
                 "OMS first pass only")
# The variation strength's infotext key: A1111 and Forge write the first, SD.Next the second.
VARIATION_STRENGTH_KEYS = ("Variation seed strength", "Variation strength")
AXIS_CFG = "[OMS] CFG"
AXIS_ENABLED = "[OMS] Enabled"

# The server's console output (stdout and stderr) as a file the harness writes, for what only the console shows.
CONSOLE_LOG = os.environ.get("SD_WEBUI_LOG", "")

# The released SD1.x/SD2.x module name the test server holds (random weights, released folder layout).
DEFAULT_MODULE = os.environ.get("SD_WEBUI_OMS_MODULE", "oms_b_openclip_15_21")
# A module the harness makes corrupt on purpose (see test_failed_loads_release_what_they_read).
BROKEN_MODULE = "broken_for_tests"

BASE_PAYLOAD = {
    "prompt": "a photo of a cat in a dark room",
    "negative_prompt": "",
    "seed": 1234,
    "subseed": 1,
    "steps": 2,
    "width": 64,
    "height": 64,
    "cfg_scale": 7.0,
    "sampler_name": "Euler a",
    "scheduler": "Automatic",
    "batch_size": 1,
    "n_iter": 1,
    "save_images": False,
    "send_images": True,
}


@dataclass
class Reply:
    status: int
    body: object  # parsed JSON, or the raw text when the body is not JSON

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)


def request(method: str, path: str, payload: dict | None = None) -> Reply:
    """One HTTP call; error statuses come back as a Reply instead of raising."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(BASE_URL + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return Reply(status, json.loads(text))
    except ValueError:
        return Reply(status, text)


def get(path: str) -> Reply:
    return request("GET", path)


def is_sdnext() -> bool:
    """Whether the server is SD.Next: its /sdapi/v1/scripts lists the scripts of a third tab, "control", beside
    txt2img and img2img (the A1111 family's lists those two)."""
    reply = get("/sdapi/v1/scripts")
    assert reply.status == 200, reply.text[:500]
    return "control" in reply.body


def server_rss() -> int:
    """The server process's resident memory in bytes (GET /sdapi/v1/memory: ram.used is psutil's RSS)."""
    reply = get("/sdapi/v1/memory")
    assert reply.status == 200 and "used" in reply.body.get("ram", {}), reply.text[:500]
    return int(reply.body["ram"]["used"])


def positional_args(**values) -> list:
    """The script's positional args: every value in ui() order, defaults where not given."""
    unknown = set(values) - set(ARG_NAMES)
    assert not unknown, f"not an OMS argument: {unknown}"
    return [values.get(name, default) for name, default in zip(ARG_NAMES, ARG_DEFAULTS, strict=True)]


def payload(oms_args: list | dict | None = None, **fields) -> dict:
    """A txt2img request: BASE_PAYLOAD with ``fields`` replaced; ``oms_args`` positional list or a dict (sent as the
    single first arg), None for no ``alwayson_scripts`` entry at all."""
    body = {**BASE_PAYLOAD, **fields}
    if oms_args is not None:
        args = [oms_args] if isinstance(oms_args, dict) else list(oms_args)
        body["alwayson_scripts"] = {SCRIPT_TITLE: {"args": args}}
    return body


@dataclass
class Generation:
    """A successful txt2img reply: the generated images (grids left out unless asked for) and the parsed info."""

    images: list[np.ndarray]
    all_images: list[np.ndarray]
    info: dict

    @property
    def infotexts(self) -> list[str]:
        return self.info["infotexts"]

    @property
    def extra(self) -> dict:
        return self.info["extra_generation_params"]

    def params(self, index: int = 0) -> dict[str, str]:
        """The generation parameters of the ``index``-th image (first = first non-grid image), parsed from the
        infotext's last line as the WebUI's paste parser reads it."""
        return parse_infotext(self.infotexts[self.info["index_of_first_image"] + index])


def decode(image_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB"))


def generate(mode: str, body: dict) -> Generation:
    """POST /sdapi/v1/<mode> ("txt2img" or "img2img"), asserting success."""
    return generation(mode, request("POST", f"/sdapi/v1/{mode}", body))


def generation(mode: str, reply: Reply) -> Generation:
    """The images and info of a txt2img/img2img reply, asserting success."""
    assert reply.status == 200, f"{mode} failed with HTTP {reply.status}: {reply.text[:2000]}"
    info = json.loads(reply.body["info"])
    images = [decode(b64) for b64 in reply.body["images"]]
    return Generation(images[info["index_of_first_image"]:], images, info)


def txt2img(body: dict) -> Generation:
    return generate("txt2img", body)


# The WebUI's own key/value syntax (modules/infotext_utils.py: re_param_code), re-written here.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(infotext: str) -> dict[str, str]:
    """Key/value pairs of the infotext's parameter line (values unquoted when JSON-quoted)."""
    params = {}
    for key, value in _PARAM.findall(infotext.strip().split("\n")[-1]):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        params[key.strip()] = value
    return params


def oms_keys(params: dict) -> set[str]:
    return {key for key in params if key in INFOTEXT_KEYS or key.startswith("OMS")}


def same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def changed_pixels(a: np.ndarray, b: np.ndarray) -> int:
    """How many pixels differ in any channel."""
    return int((a != b).any(axis=-1).sum())


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


class Console:
    """The server's console output from a point on: ``mark()`` before a request, ``since(mark)`` after it."""

    def __init__(self, path: str):
        self.path = path

    def mark(self) -> int:
        return os.path.getsize(self.path)

    def since(self, mark: int) -> str:
        with open(self.path, "rb") as handle:
            handle.seek(mark)
            return handle.read().decode("utf-8", errors="replace")
