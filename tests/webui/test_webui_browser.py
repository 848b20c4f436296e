"""The One More Step controls in a real browser, as a user works them (gated: needs SD_WEBUI_URL, Python's
playwright package and a Chromium; skipped, saying which is missing, without them).

    pip install playwright   # into the Python that runs the tests; the browser: Debian's chromium (tests/browser.py)

In txt2img: ticking the accordion's checkbox and typing an OMS prompt makes an image whose infotext says OMS did it;
unticked, the infotext has no OMS; pasting an infotext into the prompt and pressing the paste button sets every OMS
control (and an infotext without OMS unticks it); the controls carry the hints the extension declares, which
javascript/oms_hints.js puts on them.
"""

from __future__ import annotations

from pathlib import Path

import browser
import pytest
import webui_api as api

from lib_oms.options import SOLVERS
from oms_webui.args import ARGS

expect = browser.expect
REPO = Path(__file__).resolve().parents[2]
HINTS = REPO / "javascript" / "oms_hints.js"
UI_TIMEOUT_MS = 180_000
GENERATE_TIMEOUT_MS = api.TIMEOUT_S * 1000
OMS_PROMPT = "night, dark"


@pytest.fixture(scope="module")
def page(server):
    # Only the errors of this extension's script count: A1111 1.10.1 itself raises gradio's "Cannot read properties
    # of undefined (reading 'props')" when the width, height or steps are set, with or without this extension.
    with browser.opened(api.BASE_URL, "#script_txt2img_one_more_step_enabled", UI_TIMEOUT_MS, HINTS.name) as page:
        page.wait_for_selector("#txt2img_generate", timeout=UI_TIMEOUT_MS)
        yield page


def control(page, name: str):
    return page.locator(f"#script_txt2img_one_more_step_{name}")


def checkbox(page):
    """The checkbox in the accordion's title (the WebUI's InputAccordion shows it; its own checkbox is hidden)."""
    return page.locator("#script_txt2img_one_more_step_enabled-visible-checkbox")


def tick(page, on: bool) -> None:
    if checkbox(page).is_checked() != on:
        checkbox(page).click()
    expect(checkbox(page)).to_be_checked(checked=on)


def open_accordion(page) -> None:
    prompt = control(page, "prompt").locator("textarea")
    if not prompt.is_visible():
        control(page, "enabled").locator(".label-wrap").first.click()
    prompt.wait_for(state="visible")


def set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def info_text(page) -> str:
    return page.locator("#tab_txt2img #html_info_txt2img").first.inner_text()


def generate(page) -> str:
    """Presses Generate and returns the new image's infotext."""
    before = info_text(page)
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        """([before]) => { const info = document.querySelector('#tab_txt2img #html_info_txt2img');
                           return info && info.innerText !== before && info.innerText.includes('Steps: '); }""",
        arg=[before], timeout=GENERATE_TIMEOUT_MS)
    return info_text(page)


def small_txt2img(page) -> None:
    page.locator("#txt2img_prompt textarea").fill(api.BASE_PAYLOAD["prompt"])
    for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 2)):
        set_number(page, elem_id, value)


def test_browser_ticked_one_more_step_makes_an_image_whose_infotext_pastes_back(page):
    small_txt2img(page)
    tick(page, True)
    open_accordion(page)
    oms_prompt = control(page, "prompt").locator("textarea")
    oms_prompt.fill(OMS_PROMPT)
    info = generate(page)
    assert "OMS: True" in info and f'OMS prompt: "{OMS_PROMPT}"' in info and "OMS solver: SDE" in info, info
    tick(page, False)
    oms_prompt.fill("")
    assert "OMS" not in generate(page)
    pasted(page, info)  # the first image's infotext: OMS ticked again, its prompt back (it was quoted: a comma)
    expect(checkbox(page)).to_be_checked()
    expect(oms_prompt).to_have_value(OMS_PROMPT)
    assert not page.errors, page.errors


def pasted(page, infotext: str) -> None:
    """The infotext in the prompt box and the paste button pressed, as a user pastes an image's parameters."""
    page.locator("#txt2img_prompt textarea").fill(infotext)
    page.locator("#tab_txt2img #paste").click()


def test_browser_pasted_infotext_sets_every_oms_control(page):
    pasted(page, "a cat at night\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, OMS: True, "
                 f"OMS module: {api.DEFAULT_MODULE} [0123456789], OMS prompt: moonlight, "
                 "OMS negative prompt: daylight, OMS CFG: 2.5, OMS solver: DDIM")
    expect(checkbox(page)).to_be_checked()
    open_accordion(page)
    expect(control(page, "prompt").locator("textarea")).to_have_value("moonlight")
    expect(control(page, "negative").locator("textarea")).to_have_value("daylight")
    expect(control(page, "cfg").locator("input[type=number]")).to_have_value("2.5")
    expect(control(page, "solver").locator("input[value=DDIM]")).to_be_checked()
    # the pasted label keeps its hash: the extension says so when the local file differs
    expect(control(page, "module").locator("input").first).to_have_value(f"{api.DEFAULT_MODULE} [0123456789]")
    pasted(page, "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64")
    expect(checkbox(page)).not_to_be_checked()
    assert not page.errors, page.errors


def hints() -> dict[str, str]:
    """Label → hint and solver choice → hint, as the extension declares them (oms_webui.args, lib_oms.options) for
    javascript/oms_hints.js to put on the page."""
    return {**{arg.label: arg.help for arg in ARGS}, **{solver.name: solver.help for solver in SOLVERS}}


def test_browser_controls_carry_their_hints(page):
    """Every OMS label, and the solver's choices, carry the hint of javascript/oms_hints.js (the WebUI's tooltip
    pass puts them on after a change of the UI: opening the accordion is one)."""
    open_accordion(page)
    wanted = hints()
    assert {"One More Step", "OMS CFG", "SDE", "DDIM"} <= set(wanted)
    script = """([labels]) => { const titled = {};
        for (const e of document.querySelectorAll('#tab_txt2img span, #tab_txt2img input')) {
            const label = e.tagName === 'INPUT' ? e.value : e.textContent.trim();
            if (labels.includes(label) && e.title) titled[label] = e.title; }
        return titled; }"""
    titled = {}
    for _ in range(30):  # the WebUI's tooltip pass runs about a second after a change
        titled = page.evaluate(script, [list(wanted)])
        if titled == wanted:
            break
        page.wait_for_timeout(1000)
    assert titled == wanted
