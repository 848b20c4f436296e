"""ComfyUI's entry point for the One More Step nodes (``oms_comfyui/``) and their frontend script (``web/``); the
AUTOMATIC1111 family reads ``scripts/`` and ``javascript/``.

Outside ComfyUI (pytest collects the repository root as a package and imports this file) there is nothing to load.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("folder_paths") is not None:  # ComfyUI's own module: this is ComfyUI
    if str(Path(__file__).parent) not in sys.path:  # the nodes import lib_oms as a top-level package
        sys.path.insert(0, str(Path(__file__).parent))
    from oms_comfyui.nodes import comfy_entrypoint

    WEB_DIRECTORY = "web"  # the frontend script that shows each node's text in the node (ComfyUI serves it)
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
