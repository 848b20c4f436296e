"""``python -m lib_oms.demo``: One More Step end to end in a small world, on a CPU, in under a minute.

Samples the same captions and seeds without and with OMS (lib_oms.engine.oms_start with
SamplerStart.k_diffusion(σ₀), then the Euler sampler from x = σ₀·noise), and writes to --out:
grid.png (rows: data, without OMS, with OMS; columns across brightness), brightness_histogram.png,
prompt_control.png, oms_cfg_sweep.png and metrics.json. Only these files are written; nothing else in --out changes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .experiment import COLOUR_PROMPTS, DemoConfig, DemoResult, format_table, run_experiment
from .pipeline import MODELS_DIR, load_models
from .plots import brightness_histograms, image_grid

OUTPUT_FILES = ("grid.png", "brightness_histogram.png", "prompt_control.png", "oms_cfg_sweep.png", "metrics.json")


def write_outputs(result: DemoResult, out: Path, columns: int = 12) -> list[Path]:
    """The demo's pictures and metrics.json in ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    data_brightness = result.data_images.flatten(1).mean(dim=1).numpy()
    order = np.argsort(data_brightness)
    picks = order[np.linspace(0, len(order) - 1, min(columns, len(order))).round().astype(int)]
    grid = image_grid([("data", result.data_images[picks]), ("without OMS", result.without_oms[picks]),
                       ("with OMS", result.with_oms[picks])],
                      title="same captions and seeds; columns sorted by the data image's brightness")
    histogram = brightness_histograms({"data": result.reference_brightness,
                                       "without OMS": result.without_oms.flatten(1).mean(dim=1).numpy(),
                                       "with OMS": result.with_oms.flatten(1).mean(dim=1).numpy()})
    prompt_rows = [(f"{prompt} {'+ OMS' if label == 'with OMS' else ''}".strip(), images)
                   for prompt, made in result.prompt_images.items() for label, images in made.items()]
    prompts = image_grid(prompt_rows, title=f"prompt control: dark, bright, colours ({', '.join(COLOUR_PROMPTS)});"
                                            " rows alternate without / with OMS")
    sweep = image_grid([(f"OMS CFG {scale:g}", images) for scale, images in result.sweep_images.items()],
                       title="OMS CFG sweep, prompt 'dark'")
    paths = [out / name for name in OUTPUT_FILES]
    for picture, path in zip((grid, histogram, prompts, sweep), paths, strict=False):
        picture.save(path)
    paths[-1].write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    return paths


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (the parser names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (NaN and infinities would run the whole demo to a picture of nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def writable_folder(path: Path) -> str | None:
    """Why the demo cannot write its files into ``path`` (made if missing), or None."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"{path} cannot be made ({error.strerror})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_oms.demo", description=__doc__.split("\n")[0].split(": ")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="folder for the pictures and metrics.json (only the "
                        "demo's five files are written there)")
    parser.add_argument("--models", default=str(MODELS_DIR), help="folder of the demo weights")
    defaults = DemoConfig()
    parser.add_argument("--images", type=positive_int, default=defaults.images,
                        help="captions generated without and with OMS (one seed each)")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="Euler steps")
    parser.add_argument("--cfg", type=finite_float, default=defaults.cfg, help="the base model's CFG")
    parser.add_argument("--prompt-seeds", type=positive_int, default=defaults.prompt_seeds,
                        help="seeds per prompt for the prompt control and for each OMS CFG of the sweep")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="first seed; image i uses seed + i")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (these small networks run fastest on one)")
    args = parser.parse_args(argv)
    if not Path(args.models).is_dir():
        parser.error(f"argument --models: {args.models} is not a folder")
    unwritable = writable_folder(Path(args.out))
    if unwritable:
        parser.error(f"argument --out: {unwritable}")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    models = load_models(args.models)
    config = DemoConfig(images=args.images, steps=args.steps, cfg=args.cfg, prompt_seeds=args.prompt_seeds,
                        seed=args.seed)
    result = run_experiment(models, config)
    paths = write_outputs(result, Path(args.out))
    print(format_table(result.metrics))
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
