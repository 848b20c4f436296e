"""Installs what One More Step needs and the WebUI lacks (run by the WebUI's launcher unless --skip-install).

A1111 1.6–1.10, Forge, reForge and Forge Classic already ship safetensors, transformers, open-clip-torch and
huggingface_hub: nothing is installed there; Forge Neo lacks open-clip-torch. A missing package is installed with a
lower bound only, so no pin of the WebUI is changed.

ComfyUI-Manager runs install.py too (after installing requirements.txt itself): without the WebUI's ``launch``
module this does nothing.
"""

try:
    import launch
except ImportError:
    launch = None

# (distribution name, lowest version the extension works with)
REQUIREMENTS = (
    ("safetensors", "0.3.1"),
    ("transformers", "4.30.2"),
    ("open-clip-torch", "2.20.0"),
    ("huggingface_hub", "0.17.0"),  # downloads on first use (lib_oms/download.py)
)


def missing() -> list[str]:
    return [f"{name}>={version}" for name, version in REQUIREMENTS if not launch.is_installed(name)]


if launch is not None and not getattr(launch.args, "skip_install", False):
    for requirement in missing():
        launch.run_pip(f'install "{requirement}"', f"{requirement} for One More Step")
