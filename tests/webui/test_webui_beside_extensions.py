"""One More Step beside other extensions that change the noise or the denoiser, in the same WebUI.

Each case runs when the WebUI lists that extension's script (the runner's ``--beside FOLDER`` links an installed
extension into its scratch data folder); otherwise it skips, saying so. For each extension, turned on so that it
changes the image:

- with One More Step off (its arguments given, unticked) the image is the very image of that extension alone;
- with One More Step on, both act: the image differs from the extension alone and from One More Step alone, and
  the infotext carries both;
- nothing fails: every request is answered with an image.

Arguments as the extensions' own ``ui()`` returns them: Dynamic Thresholding (mcmonkeyprojects/sd-dynamic-thresholding,
"Dynamic Thresholding (CFG Scale Fix)", 12 values) and Vectorscope CC (Haoming02/sd-webui-vectorscope-cc,
"Vectorscope CC", 13 values).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import webui_api as api


@dataclass(frozen=True)
class Beside:
    title: str  # the script's title(), its key in alwayson_scripts
    args: list  # values that make it change the image
    infotext_key: str  # what it writes into the infotext when it acts
    fields: dict  # request fields it needs to act


EXTENSIONS = {
    # enabled, mimic scale 7, top percentile 100, constant schedules, separate channels, MEAN, AD, phi 1: at a CFG
    # scale of 20 it clamps toward what CFG 7 would give.
    "dynamic-thresholding": Beside("Dynamic Thresholding (CFG Scale Fix)",
                                   [True, 7.0, 100.0, "Constant", 0.0, "Constant", 0.0, 4.0, True, "MEAN", "AD", 1.0],
                                   "Dynamic thresholding enabled", {"cfg_scale": 20}),
    # enabled, on the denoised latent, brightness -3, contrast 1, saturation 1.5, a red shift, its default noise
    # method and flat scaling.
    "vectorscope-cc": Beside("Vectorscope CC",
                             [True, False, -3.0, 1.0, 1.5, 1.0, 0.0, 0.0, False, False, False, "Straight Abs.", "Flat"],
                             "Vec CC Enabled", {}),
}


def with_beside(extension: Beside, oms_args: dict | None) -> dict:
    body = api.payload(oms_args, **extension.fields)
    body.setdefault("alwayson_scripts", {})[extension.title] = {"args": extension.args}
    return body


@pytest.fixture(params=sorted(EXTENSIONS))
def extension(request, script_info) -> Beside:
    chosen = EXTENSIONS[request.param]
    listed = {entry["name"] for entry in script_info if not entry.get("is_img2img")}
    if chosen.title.lower() not in listed:
        pytest.skip(f"{chosen.title} is not installed in this WebUI (the runner's --beside links it)")
    return chosen


def test_oms_off_leaves_the_other_extensions_image_as_it_is(extension, generate):
    alone = generate(with_beside(extension, None))
    oms_off = generate(with_beside(extension, {"enabled": False}))
    plain = generate(api.payload(**extension.fields))
    assert extension.infotext_key in alone.params(), alone.infotexts[0]
    assert not api.same_pixels(alone.images[0], plain.images[0]), f"{extension.title} did not change the image"
    assert api.same_pixels(oms_off.images[0], alone.images[0]), (
        f"OMS off changed {extension.title}'s image: max {api.max_abs_diff(oms_off.images[0], alone.images[0])}")
    assert not api.oms_keys(oms_off.params())


def test_oms_on_and_the_other_extension_both_act(extension, generate):
    alone = generate(with_beside(extension, None))
    oms_alone = generate(api.payload({"enabled": True}, **extension.fields))
    both = generate(with_beside(extension, {"enabled": True}))
    params = both.params()
    assert params.get("OMS") == "True" and "OMS skipped" not in params, both.infotexts[0]
    assert extension.infotext_key in params, both.infotexts[0]
    for other, name in ((alone, f"{extension.title} alone"), (oms_alone, "One More Step alone")):
        assert api.mean_abs_diff(both.images[0], other.images[0]) > 0.5, f"the image is {name}'s"
