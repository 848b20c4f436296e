"""What the One More Step accordion and settings show a user in the WebUI (fake ``modules``, as tests/test_script.py
drives them): where OMS applies in img2img, a WebUI that cannot run it, and the settings' own category."""

from __future__ import annotations

import html
import sys
import types

from tests.test_script import make_webui, write_models


def notes(component_tree) -> list[str]:
    return [html.unescape(c.value) for c in component_tree if "oms-note" in c.kwargs.get("elem_classes", [])]


def built(webui, is_img2img: bool) -> list:
    """Every component the script's ui() makes, in order (the fake gradio records them)."""
    made = []
    gr = sys.modules["gradio"]
    for name in ("HTML",):
        real = getattr(gr, name)
        setattr(gr, name, type(name, (real,), {"__init__": lambda self, *a, _real=real, **k: (
            _real.__init__(self, *a, **k), made.append(self))[0]}))
    webui.script().ui(is_img2img)
    return made


def test_img2img_says_where_oms_applies_and_txt2img_says_nothing(monkeypatch, tmp_path):
    webui = make_webui(monkeypatch, write_models(tmp_path))
    (img2img_note,) = notes(built(webui, True))
    assert "inpainting with 'latent noise' or 'latent nothing' fill at denoising strength 1" in img2img_note
    assert "parameters say why" in img2img_note
    assert notes(built(webui, False)) == []


def test_a_webui_in_forge_neos_api_mode_says_in_the_accordion_that_oms_cannot_run(monkeypatch, tmp_path):
    webui = make_webui(monkeypatch, write_models(tmp_path), opts={"forge_model_mode": "api"})
    (note,) = notes(built(webui, False))
    assert "cannot run while Forge Neo is in API mode" in note


def test_the_settings_get_a_category_of_their_own_where_the_webui_has_categories(monkeypatch, tmp_path):
    """A1111 1.7+ (modules.options.categories, OptionInfo's category_id): otherwise they show as "Uncategorized"."""
    webui = make_webui(monkeypatch, write_models(tmp_path))
    registered = {}
    options = types.ModuleType("modules.options")
    options.categories = types.SimpleNamespace(mapping=registered, register_category=lambda key, label: registered
                                               .__setitem__(key, label))
    monkeypatch.setitem(sys.modules, "modules.options", options)

    class OptionInfo:  # A1111 1.10.1's signature: category_id is a keyword
        def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                     section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                     restrict_api=False, category_id=None):
            self.default, self.section, self.category_id = default, section, category_id

    webui.modules["shared"].OptionInfo = OptionInfo
    (callback,) = webui.modules["script_callbacks"].registered["ui_settings"]
    callback()
    added = webui.opts.added
    assert registered == {"one_more_step": "One More Step"}
    assert {info.category_id for info in added.values()} == {"one_more_step"}
    assert {info.section for info in added.values()} == {("oms", "One More Step")}


def test_a_checkpoint_that_turns_on_zero_terminal_snr_itself_is_skipped_before_loading(monkeypatch, tmp_path):
    """Forge Neo turns zero-terminal SNR on when the checkpoint's state dict has a "ztsnr" key (its model config says
    so), whatever the Noise schedule setting says, and rescales the sigmas before sampling (modules/processing.py,
    exo101/sd-webui-forge-neo-v3 5692d2d): OMS is skipped at once, says why, and the start is the one without it."""
    import torch

    from tests.test_script import OFF, ON, txt2img
    from tests.webui_fakes import FakeSDModel, KDiffusionSampler

    webui = make_webui(monkeypatch, write_models(tmp_path), family="forge-neo")
    model = FakeSDModel()
    model.model_config = types.SimpleNamespace(ztsnr=True)
    rescaled = torch.tensor([4518.76, 1.0, 0.0])  # Neo's rescale_zero_terminal_snr_sigmas: the first sigma explodes
    loads = []
    monkeypatch.setattr("lib_oms.module_files.load_module", lambda *a, **k: loads.append(a))
    p = txt2img(KDiffusionSampler(sigmas=rescaled), sd_model=model)
    start = webui.run(p, ON)[0]
    plain = webui.run(txt2img(KDiffusionSampler(sigmas=rescaled), sd_model=model), OFF)[0]
    assert torch.equal(start, plain) and loads == [] and webui.errors == []
    assert "its ztsnr key" in p.extra_generation_params["OMS skipped"]
