"""What One More Step works with, named once: the latent spaces, the authors' released modules and where they are
published, the text encoders a module reads prompts with, and the file formats that are never loaded."""

from __future__ import annotations

from dataclasses import dataclass

# The latent spaces OMS modules are made for, as users name them.
LATENT_SPACES = {"sd": "SD1.x/SD2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class ReleasedModule:
    """A module the authors released on the Hugging Face hub."""

    repo: str
    fits: str  # which checkpoints it serves, in words

    @property
    def folder(self) -> str:
        """The folder it is placed in, named as its repository."""
        return self.repo.split("/")[1]

    def describe(self) -> str:
        return f"{self.repo} ({self.fits})"


RELEASED_MODULES = {
    "sd": ReleasedModule("h1t/oms_b_openclip_15_21", "SD1.5 / SD2.1 and their fine-tunes, LoRAs, LCM"),
    "sdxl": ReleasedModule("h1t/oms_b_openclip_xl", "SDXL and its fine-tunes, LoRAs"),
}

# The text encoders an OMS module can read prompts with: OpenCLIP ViT-H/14 as SD 2.x runs it (the released modules),
# and SDXL's own CLIP-L + OpenCLIP bigG ("mixclip", the authors' SDXL-only variant).
OPENCLIP_H = "openclip-h"
SDXL_MIXCLIP = "sdxl-mixclip"
TEXT_ENCODER_BY_WIDTH = {1024: OPENCLIP_H, 2048: SDXL_MIXCLIP}

# Files that can run code when loaded (pickles): refused everywhere, found on disk or offered by the hub.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
