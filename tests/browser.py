"""Headless Chromium for the UI tests against real hosts (tests/webui/test_webui_browser.py, tests/comfyui): they are
skipped, saying what is missing, without Python's playwright package or a Chromium (Debian's chromium, or
SD_WEBUI_BROWSER naming one)."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
expect = sync_api.expect  # waits for the value (5 s): what a click changes reaches the page in later events

# As this machine kind's probe starts Chromium: without the background-networking flags its calls out are refused
# by the closed network, many at a time.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def executable() -> str:
    found = os.environ.get("SD_WEBUI_BROWSER", "") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium: install Debian's chromium or set SD_WEBUI_BROWSER")
    return found


@contextlib.contextmanager
def opened(url: str, ready: str, timeout_ms: float, own_script: str | None = None):
    """A page at ``url`` once ``ready`` (a selector) is in it. ``page.errors``: the script errors whose stack names
    ``own_script``, this project's script on that page (a host's own errors are the host's)."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable(), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            page.errors = []
            if own_script:
                page.on("pageerror", lambda error: page.errors.append(error.stack)
                        if own_script in (error.stack or "") else None)
            page.goto(url, timeout=timeout_ms)
            page.wait_for_selector(ready, state="attached", timeout=timeout_ms)
            yield page
        finally:
            browser.close()
