"""One More Step in ComfyUI: the nodes (``nodes``, which imports ComfyUI) and their decisions on plain values
(``logic``, which does not)."""
