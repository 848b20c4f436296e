"""The README's pictures of the WebUI, taken from a real WebUI in headless Chromium (gated: skipped unless
OMS_SCREENSHOTS_DIR names the folder to write them to). To remake them, through the real-WebUI runner:

    OMS_SCREENSHOTS_DIR=docs/screenshots OMS_SCREENSHOTS_KIND=a1111 .venv-test/bin/python tests/webui/harness/run.py \
        --webui DIR --no-first-use -- -m screenshots

Writes ``<kind>-accordion.png`` (the accordion opened and ticked, an OMS prompt typed), ``<kind>-settings.png``
(Settings > One More Step) and ``<kind>-xyz-cfg.png`` (an X/Y/Z grid over OMS CFG made through the API), each under
200 kB. ``<kind>`` comes from OMS_SCREENSHOTS_KIND (the runner: a1111, forge-classic, forge-neo, ...).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import browser
import pytest
import webui_api as api
from PIL import Image
from test_webui_browser import UI_TIMEOUT_MS, control, open_accordion, tick
from test_webui_xyz_samplers import XYZ_SCRIPT, xyz_axis_index, xyz_script_args

FOLDER = os.environ.get("OMS_SCREENSHOTS_DIR", "")
KIND = os.environ.get("OMS_SCREENSHOTS_KIND", "webui")
MAX_BYTES = 200_000
pytestmark = [pytest.mark.screenshots,
              pytest.mark.skipif(not FOLDER, reason="OMS_SCREENSHOTS_DIR is not set: no screenshots asked for")]


def saved(png: bytes, name: str) -> Path:
    """The picture (PNG bytes or an image) in the folder, as a PNG of at most MAX_BYTES (colours reduced, then made
    smaller, until it fits)."""
    image = Image.open(io.BytesIO(png)).convert("RGB") if isinstance(png, bytes) else png
    path = Path(FOLDER) / f"{KIND}-{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        image.quantize(colors=128).save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            return path
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4))


@pytest.fixture(scope="module")
def page():
    with browser.opened(api.BASE_URL, "#script_txt2img_one_more_step_enabled", UI_TIMEOUT_MS) as page:
        page.wait_for_selector("#txt2img_generate", timeout=UI_TIMEOUT_MS)
        yield page


def test_screenshot_of_the_accordion(page):
    tick(page, True)
    open_accordion(page)
    control(page, "prompt").locator("textarea").fill("night, very dark")
    page.wait_for_timeout(1500)  # the WebUI's tooltip pass
    path = saved(control(page, "enabled").screenshot(), "accordion")
    assert path.stat().st_size <= MAX_BYTES


def test_screenshot_of_the_settings(page):
    page.locator("#tabs > .tab-nav button", has_text="Settings").first.click()
    page.locator("#settings .tab-nav button, #settings_nav button", has_text="One More Step").first.click()
    section = page.locator("#settings_oms")
    section.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    path = saved(section.screenshot(), "settings")
    assert path.stat().st_size <= MAX_BYTES


def test_screenshot_of_an_xyz_grid_over_oms_cfg(generate, script_info):
    """The grid with its legend, as a user makes it (the test checkpoint's random weights draw noise, not a scene)."""
    args = xyz_script_args(script_info, xyz_axis_index(script_info, api.AXIS_CFG), "1, 1.5, 2, 3",
                           options={"Draw legend": True})
    plot = generate(api.payload({"enabled": True, "prompt": "night, very dark"}, script_name=XYZ_SCRIPT,
                                script_args=args, width=128, height=128))
    grid = Image.fromarray(plot.all_images[0])  # the grid comes first
    path = saved(grid, "xyz-cfg")
    assert path.stat().st_size <= MAX_BYTES
