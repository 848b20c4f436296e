"""Files the real-WebUI seam tests (test_webui_seams.py) need beside the harness's usual ones. The harness
(tests/webui/harness/run.py) writes them for each WebUI it starts; for a WebUI set up by hand, run once before starting:

    python tests/webui/seams_files.py --webui <data folder> --checkpoint <the SD1 checkpoint the server loads>

(the data folder is the WebUI's ``--data-dir``, by default its own folder). It writes, under ``<data folder>/models``:

- ``oms/sd21_text_encoder.safetensors``: a text encoder beside the modules, as models/README.md suggests (a link to
  ``oms/text_encoder/model.safetensors``, which the harness already places): it must not be offered as a module.
- ``oms/oms_z_width_mismatch_15_21/``: a tiny SD module whose files say "openclip-h" but whose network reads 32-wide
  text features, so the OMS step fails *while sampling* (the error must stop the generation).
- ``Stable-diffusion/oms_refiner_copy.safetensors``: a link to the checkpoint, to use as the refiner (every
  generation then loads two models, as with the SDXL refiner).

Random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lib_oms import save_module  # noqa: E402
from tests.factories import random_state_dict, tiny_unet_config  # noqa: E402

TEXT_ENCODER_FILE = "sd21_text_encoder.safetensors"
WIDTH_MISMATCH_MODULE = "oms_z_width_mismatch_15_21"
REFINER = "oms_refiner_copy"


def link(target: Path, link_path: Path) -> None:
    if link_path.is_symlink() or link_path.exists():
        link_path.unlink()
    link_path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.resolve(), link_path)


def write(webui: Path, checkpoint: Path) -> None:
    oms = webui / "models" / "oms"
    encoder = oms / "text_encoder" / "model.safetensors"
    if not encoder.is_file():
        raise SystemExit(f"{encoder} is missing: place the OpenCLIP-H text encoder first")
    link(encoder, oms / TEXT_ENCODER_FILE)
    config = tiny_unet_config()  # cross_attention_dim 32
    save_module(oms / WIDTH_MISMATCH_MODULE, random_state_dict(config, seed=8), config, latent_space="sd",
                text_encoder="openclip-h", overwrite=True)
    if checkpoint.is_file():  # not for a diffusers folder (SD.Next), whose refiner is set otherwise
        link(checkpoint, webui / "models" / "Stable-diffusion" / f"{REFINER}.safetensors")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", type=Path, required=True, help="the WebUI's data folder (--data-dir)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the server loads")
    args = parser.parse_args(argv)
    write(args.webui, args.checkpoint)


if __name__ == "__main__":
    main()
