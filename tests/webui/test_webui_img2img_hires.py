"""Where OMS applies besides plain txt2img: the hires-fix first pass only, inpainting from latent noise at
denoising strength 1 only; every other case is skipped with a reason in the infotext and leaves the image untouched."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import webui_api as api
from PIL import Image

SIZE = api.BASE_PAYLOAD["width"]
# The masked square (white = repaint), away from the borders.
MASK_BOX = (16, 16, 48, 48)


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def init_image() -> np.ndarray:
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([rows * 4, cols * 4, np.full_like(rows, 96)], axis=-1).astype(np.uint8)


def mask_image() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    x0, y0, x1, y1 = MASK_BOX
    mask[y0:y1, x0:x1] = 255
    return mask


def img2img(oms_args, **fields) -> api.Generation:
    defaults = {"init_images": [png_b64(init_image())], "denoising_strength": 1.0, "mask_blur": 0,
                "inpaint_full_res": False, "inpainting_mask_invert": 0, "resize_mode": 0}
    body = api.payload(oms_args, **{**defaults, **fields})
    return api.generate("img2img", body)


@pytest.fixture(scope="module")
def inpaint_runs(server):
    """Inpainting with 'latent noise' fill at denoising strength 1, OMS off and on."""
    fields = {"mask": png_b64(mask_image()), "inpainting_fill": 2}
    return img2img(None, **fields), img2img({"enabled": True}, **fields)


def test_inpainting_from_latent_noise_gets_the_oms_start_inside_the_mask(inpaint_runs):
    off, on = inpaint_runs
    params = on.params()
    assert params["OMS"] == "True" and "OMS skipped" not in params, params
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    x0, y0, x1, y1 = MASK_BOX
    inside[y0:y1, x0:x1] = True
    # Outside the mask the WebUI pastes the original back; inside, the OMS start changes what is painted.
    assert np.array_equal(on.images[0][~inside], off.images[0][~inside])
    assert api.mean_abs_diff(on.images[0][inside], off.images[0][inside]) > 1.0


@pytest.mark.parametrize("case, fields", [
    pytest.param("inpaint", {"inpainting_fill": 1}, id="inpaint-original-fill"),
    pytest.param("inpaint", {"inpainting_fill": 2, "denoising_strength": 0.6}, id="inpaint-strength-below-1"),
    pytest.param("plain", {"denoising_strength": 0.6}, id="plain-img2img"),
])
def test_img2img_that_keeps_the_input_is_skipped_and_untouched(server, case, fields):
    if case == "inpaint":
        fields = {**fields, "mask": png_b64(mask_image())}
    off = img2img(None, **fields)
    on = img2img({"enabled": True}, **fields)
    params = on.params()
    assert "OMS skipped" in params and params["OMS skipped"], params
    assert "OMS" not in params
    if not api.same_pixels(on.images[0], off.images[0]):
        # Forge Classic and Forge Neo make a plain img2img right after an inpainting differently from the same
        # request made again (measured without this extension): the skipped image must then be that repeat's.
        again = img2img(None, **fields)
        if api.same_pixels(on.images[0], again.images[0]):
            return
        pytest.fail(f"the skipped request differs from the one without OMS by up to "
                    f"{api.max_abs_diff(on.images[0], off.images[0])} grey levels in "
                    f"{api.changed_pixels(on.images[0], off.images[0])} pixels; the request without OMS, made again, "
                    f"differs from itself by up to {api.max_abs_diff(again.images[0], off.images[0])} in "
                    f"{api.changed_pixels(again.images[0], off.images[0])} of {off.images[0][..., 0].size}")


def hires_upscaler() -> str:
    """An upscaler the WebUI lists that needs no model file: its first latent mode ("Latent" on A1111 and Forge
    Classic), else the first of /sdapi/v1/upscalers without a model file, "None" last (it resizes the image plainly;
    Forge Neo 5692d2d lists no latent mode and only "None" and ESRGAN, whose model is downloaded)."""
    modes = api.get("/sdapi/v1/latent-upscale-modes")
    assert modes.status == 200, modes.text[:300]
    if modes.body:
        return modes.body[0]["name"]
    upscalers = api.get("/sdapi/v1/upscalers")
    assert upscalers.status == 200, upscalers.text[:300]
    plain = sorted((u["name"] for u in upscalers.body if not u.get("model_path")), key=lambda name: name == "None")
    assert plain, f"the WebUI lists no upscaler that needs no model file: {upscalers.text[:500]}"
    return plain[0]


def test_hires_fix_corrects_only_the_first_pass(generate, baseline):
    # hr_additional_modules: the Forge family's own field; Forge Neo 5692d2d's API leaves it None, which its hires pass
    # cannot read (TypeError). The other WebUIs' APIs ignore a field they do not have.
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": hires_upscaler(), "hr_second_pass_steps": 1,
             "denoising_strength": 0.5, "hr_additional_modules": ["Use same choices"]}
    off = generate(api.payload(**hires))
    on = generate(api.payload({"enabled": True}, **hires))
    params = on.params()
    assert params["OMS"] == "True"
    assert "hires" in params.get("OMS first pass only", "").lower(), params  # the untouched second pass is said
    assert on.images[0].shape == (128, 128, 3)
    assert api.mean_abs_diff(on.images[0], off.images[0]) > 1.0
