"""The extension's WebUI settings (Settings > One More Step), declared once: key, default, label and choices, the
section they are shown in, and reading them with their defaults. Imports the WebUI's ``modules.shared`` when a
function runs."""

from __future__ import annotations

from dataclasses import dataclass

from lib_oms.catalog import LATENT_SPACES
from lib_oms.options import AUTOMATIC, LAYERS, PRECISIONS
from oms_webui.args import TITLE

SECTION_ID = "oms"
CATEGORY_ID = "one_more_step"


@dataclass(frozen=True)
class Setting:
    key: str
    default: object
    label: str
    choices: tuple[str, ...] = ()  # a radio of these; () a checkbox or a text box, by the default's type
    modules: bool = False  # a dropdown of the module names found, with a refresh button


def module_setting_key(latent_space: str) -> str:
    return f"oms_module_{latent_space}"


SETTINGS = (
    *(Setting(module_setting_key(space), AUTOMATIC, f"Module used for {words} checkpoints when the module is "
              f"'{AUTOMATIC}'", modules=True) for space, words in LATENT_SPACES.items()),
    Setting("oms_auto_download", True, "Download missing OMS files automatically (the module for the checkpoint and "
            "the SD 2.x text encoder, from Hugging Face; --oms-no-download turns this off)"),
    Setting("oms_text_encoder_path", "", "OpenCLIP ViT-H/14 text encoder: file or folder (blank: automatic search)"),
    Setting("oms_text_encoder_layer", LAYERS[0], "Text encoder layer", choices=LAYERS),
    Setting("oms_keep_in_vram", True, "Keep the module and text encoder in VRAM between generations (always "
            "offloaded with --lowvram/--medvram)"),
    Setting("oms_precision", PRECISIONS[0], "Precision of the module and text encoder (Automatic: fp16 on a GPU "
            "unless the WebUI runs its model in fp32, e.g. A1111's --no-half or Forge's --all-in-fp32)",
            choices=PRECISIONS),
)
SETTING_BY_KEY = {setting.key: setting for setting in SETTINGS}
DOWNLOAD_SETTING = f"Settings > {TITLE} > Download missing OMS files automatically"


def setting(key: str):
    """The value of one of this extension's settings (its default until the user changes it)."""
    from modules import shared

    return shared.opts.data.get(key, SETTING_BY_KEY[key].default)


def automatic_modules() -> dict[str, str]:
    """Latent space -> the module set for it when the module is Automatic (Automatic: the first found)."""
    return {space: setting(module_setting_key(space)) for space in LATENT_SPACES}


def webui_option(key: str, default):
    """The value of one of the WebUI's own settings, with the default it has where the WebUI lacks it."""
    from modules import shared

    return shared.opts.data.get(key, default)


def own_category() -> dict:
    """The settings' own category in the Settings tab (A1111 1.7+, its forks), registered once: the OptionInfo
    argument that puts them there; nothing where the WebUI has no categories (they then show under its default)."""
    import inspect

    from modules import shared

    try:
        from modules.options import categories
    except ImportError:
        return {}
    if "category_id" not in inspect.signature(shared.OptionInfo).parameters:
        return {}
    if CATEGORY_ID not in categories.mapping:
        categories.register_category(CATEGORY_ID, TITLE)
    return {"category_id": CATEGORY_ID}


def on_ui_settings(module_choices) -> None:
    """Adds the settings to the WebUI's Settings tab; ``module_choices()`` lists the module names found."""
    import gradio as gr
    from modules import shared

    placed = {"section": (SECTION_ID, TITLE), **own_category()}
    for item in SETTINGS:
        if item.modules:
            info = shared.OptionInfo(item.default, item.label, gr.Dropdown, lambda: {"choices": module_choices()},
                                     refresh=lambda: None, **placed)
        elif item.choices:
            info = shared.OptionInfo(item.default, item.label, gr.Radio, {"choices": list(item.choices)}, **placed)
        else:
            info = shared.OptionInfo(item.default, item.label, **placed)
        shared.opts.add_option(item.key, info)
