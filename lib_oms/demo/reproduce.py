"""Retrain the demo's shipped weights: ``python -m lib_oms.demo.reproduce --out FOLDER``.

1. the text encoder and the ε-prediction base denoiser, together, with SD's schedule (lib_oms.demo.base_training);
2. the OMS-S module with the project's trainer (lib_oms.train.train_oms) on world images encoded to latents, with
   the text encoder from step 1 frozen, saved in the released layout that lib_oms.load_module and the extension read.

Everything is seeded; with the same torch build and thread count the files come out bit-identical. The defaults are
the shipped weights' settings (about 15–20 minutes on one CPU core; ``--device cuda`` takes a minute or two).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..train import TrainSettings, preset_config, train_oms
from .base_training import train_base
from .denoiser import save_denoiser
from .pipeline import DENOISER_FILE, MODELS_DIR, OMS_FOLDER, TEXT_ENCODER_FILE
from .text_encoder import load_text_encoder, save_text_encoder
from .world import LATENT_SPACE, draw_batch, encode_latents

BASE_STEPS, BASE_BATCH, BASE_LEARNING_RATE = 1200, 64, 2e-3
OMS_STEPS, OMS_BATCH, OMS_LEARNING_RATE, OMS_IMAGES = 600, 32, 1e-3, 8192
OMS_DATA_SEED = 2024


def train_demo_oms(encoder, out: Path, *, steps: int = OMS_STEPS, batch_size: int = OMS_BATCH,
                   learning_rate: float = OMS_LEARNING_RATE, images: int = OMS_IMAGES, seed: int = 0,
                   device: str = "cpu", overwrite: bool = False, progress: bool = True):
    """Train the demo's OMS-S module on ``images`` world images and save it to ``out/oms_s_demo``."""
    batch = draw_batch(images, seed=OMS_DATA_SEED + seed)
    latents = encode_latents(torch.from_numpy(batch.images))
    config = preset_config("oms-s", latent_channels=latents.shape[1], text_width=encoder.width)
    settings = TrainSettings(steps=steps, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=50,
                             caption_dropout=0.1, seed=seed, checkpoint_every=0)
    return train_oms(latents, batch.captions, encoder, config, out, latent_space=LATENT_SPACE, settings=settings,
                     module_name=OMS_FOLDER, device=device, fp16_weights=True, overwrite=overwrite,
                     progress=progress, extra_index={"made_by": "python -m lib_oms.demo.reproduce"})


def _tail_mean(losses: list[float], count: int = 100) -> float:
    tail = losses[-count:]
    return sum(tail) / max(1, len(tail))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_oms.demo.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(MODELS_DIR), help=f"output folder (default: {MODELS_DIR})")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in --out")
    parser.add_argument("--oms-only", action="store_true", help="keep --out's text encoder and base denoiser, "
                                                                "retrain only the OMS module")
    parser.add_argument("--base-steps", type=int, default=BASE_STEPS)
    parser.add_argument("--oms-steps", type=int, default=OMS_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default, as the shipped weights) or cuda")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the shipped weights' setting; results depend on it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    targets = [out / OMS_FOLDER] + ([] if args.oms_only else [out / TEXT_ENCODER_FILE, out / DENOISER_FILE])
    existing = [str(path) for path in targets if path.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"{', '.join(existing)} already exist: pass --overwrite to replace them, or choose --out")
    began = time.perf_counter()
    if not args.oms_only:
        encoder, denoiser, losses = train_base(args.base_steps, BASE_BATCH, BASE_LEARNING_RATE, seed=args.seed,
                                               device=args.device)
        save_text_encoder(encoder, out / TEXT_ENCODER_FILE)
        save_denoiser(denoiser, out / DENOISER_FILE)
        print(f"base denoiser: final loss {_tail_mean(losses):.4f} (mean of the last 100 steps)")
    # The OMS module is trained against the encoder exactly as shipped (read back from its file).
    encoder = load_text_encoder(out / TEXT_ENCODER_FILE, args.device)
    result = train_demo_oms(encoder, out, steps=args.oms_steps, seed=args.seed, device=args.device,
                            overwrite=args.overwrite)
    print(f"OMS-S: final loss {_tail_mean(result.losses):.4f}; wrote {out} in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
