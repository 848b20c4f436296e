"""The demo's measurements: the flaw and the fix on the same captions and seeds, prompt control, the OMS CFG sweep.

Targets, on the −1..1 brightness scale:
* without OMS, generation keeps at most half of the data's brightness spread;
* with OMS, W1 to the data falls at least 3× and at least 0.8 of the spread is kept;
* with OMS, "dark" and "bright" prompts land within 0.15 of the data's mean for those captions;
* with OMS, brightness moves monotonically with OMS CFG 1 → 1.5 → 2 for the prompt "dark".
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .metrics import brightness, brightness_summary, is_monotonic
from .pipeline import DemoModels, generate
from .world import caption_has, draw_batch

DATA_SEED, REFERENCE_SEED = 7, 8
BRIGHTNESS_PROMPTS = ("dark", "bright")
COLOUR_PROMPTS = ("red", "blue", "green")
SWEEP_PROMPT = "dark"


@dataclass
class DemoConfig:
    """Sizes of one demo run; the defaults are the README's run, tests use fewer images and steps."""

    images: int = 256                # data captions (one seed each) generated without and with OMS
    steps: int = 20                  # Euler steps
    cfg: float = 1.0                 # the base model's CFG (1: its own distribution, the one W1 compares)
    prompt_seeds: int = 16           # seeds per prompt for prompt control and for each OMS CFG of the sweep
    oms_cfgs: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    reference: int = 2000            # data images for the data's brightness distribution
    seed: int = 0                    # first seed; image i uses seed + i


@dataclass
class DemoResult:
    metrics: dict
    data_images: torch.Tensor
    without_oms: torch.Tensor
    with_oms: torch.Tensor
    captions: list[str]
    reference_brightness: np.ndarray
    prompt_images: dict[str, dict[str, torch.Tensor]]
    sweep_images: dict[float, torch.Tensor]


def _mean_rgb(images: torch.Tensor | np.ndarray) -> list[float]:
    """Mean colour on 0..255."""
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    return [round(float(v), 1) for v in (array.mean(axis=(0, 2, 3)) + 1.0) * 127.5]


def check_targets(metrics: dict) -> dict[str, dict]:
    """Each target of the demo with its measured value and whether it is met."""
    without, with_ = metrics["without_oms"], metrics["with_oms"]
    worst_prompt = max(metrics["prompt_control"][p]["with_oms_error"] for p in BRIGHTNESS_PROMPTS)
    sweep = metrics["oms_cfg_sweep"]
    first_three = [b for c, b in zip(sweep["oms_cfg"], sweep["mean_brightness"], strict=True) if c in (1.0, 1.5, 2.0)]
    return {
        "spread kept without OMS <= 0.5": {"value": without["spread_ratio"], "met": without["spread_ratio"] <= 0.5},
        "W1 falls >= 3x with OMS": {"value": metrics["w1_improvement"], "met": metrics["w1_improvement"] >= 3.0},
        "spread kept with OMS >= 0.8": {"value": with_["spread_ratio"], "met": with_["spread_ratio"] >= 0.8},
        "dark/bright within 0.15 of data with OMS": {"value": worst_prompt, "met": worst_prompt <= 0.15},
        "monotonic in OMS CFG 1, 1.5, 2 ('dark')": {"value": first_three,
                                                    "met": len(first_three) == 3 and is_monotonic(first_three)},
    }


def run_experiment(models: DemoModels, config: DemoConfig | None = None) -> DemoResult:
    """Generate everything the demo shows and measure it."""
    config = config or DemoConfig()
    began = time.perf_counter()
    data = draw_batch(config.images, seed=DATA_SEED)
    reference = draw_batch(config.reference, seed=REFERENCE_SEED)
    reference_brightness = np.concatenate([reference.brightness, data.brightness]).astype(np.float64)
    seeds = [config.seed + i for i in range(config.images)]
    options = {"steps": config.steps, "cfg": config.cfg}
    without = generate(models, data.captions, seeds, **options)
    with_oms = generate(models, data.captions, seeds, oms=True, **options)
    b_without, b_with = brightness(without), brightness(with_oms)
    metrics = {
        "config": asdict(config),
        "data": {"mean": float(reference_brightness.mean()), "std": float(reference_brightness.std()),
                 "count": len(reference_brightness)},
        "without_oms": brightness_summary(b_without, reference_brightness),
        "with_oms": brightness_summary(b_with, reference_brightness),
        "brightness_correlation_with_data_image": {
            "without_oms": float(np.corrcoef(b_without, data.brightness)[0, 1]),
            "with_oms": float(np.corrcoef(b_with, data.brightness)[0, 1])},
    }
    metrics["w1_improvement"] = metrics["without_oms"]["w1"] / max(metrics["with_oms"]["w1"], 1e-9)

    prompt_seeds = [config.seed + 1000 + i for i in range(config.prompt_seeds)]
    prompt_images, control = {}, {}
    for prompt in BRIGHTNESS_PROMPTS + COLOUR_PROMPTS:
        made = {label: generate(models, [prompt] * len(prompt_seeds), prompt_seeds, oms=oms, **options)
                for label, oms in (("without OMS", False), ("with OMS", True))}
        prompt_images[prompt] = made
        if prompt in BRIGHTNESS_PROMPTS:
            chosen = [caption_has(c, prompt) for c in reference.captions]
        else:
            chosen = [background == prompt for background in reference.backgrounds]
        subset = reference.images[np.asarray(chosen)]
        data_mean = float(subset.mean())
        entry = {"data_mean": data_mean, "data_rgb": _mean_rgb(subset)}
        for label, images in made.items():
            key = label.replace(" ", "_").lower()
            entry[key] = float(brightness(images).mean())
            entry[f"{key}_rgb"] = _mean_rgb(images)
            entry[f"{key}_error"] = abs(entry[key] - data_mean)
        control[prompt] = entry
    metrics["prompt_control"] = control

    sweep_images = {scale: generate(models, [SWEEP_PROMPT] * len(prompt_seeds), prompt_seeds, oms=True,
                                    oms_cfg=scale, **options) for scale in config.oms_cfgs}
    sweep_means = [float(brightness(images).mean()) for images in sweep_images.values()]
    metrics["oms_cfg_sweep"] = {"prompt": SWEEP_PROMPT, "oms_cfg": list(config.oms_cfgs),
                                "mean_brightness": sweep_means, "monotonic": is_monotonic(sweep_means)}
    metrics["targets"] = check_targets(metrics)
    metrics["seconds"] = time.perf_counter() - began
    return DemoResult(metrics, torch.from_numpy(data.images), without, with_oms, data.captions,
                      reference_brightness, prompt_images, sweep_images)


def format_table(metrics: dict) -> str:
    """The printed summary: brightness distribution, prompt control, OMS CFG sweep, targets."""
    data, without, with_ = metrics["data"], metrics["without_oms"], metrics["with_oms"]
    lines = [
        "per-image mean brightness (-1 black .. +1 white)",
        f"{'':14}{'mean':>8}{'std':>8}{'W1':>8}{'W1 (0-255)':>12}{'spread kept':>13}",
        f"{'data':14}{data['mean']:>+8.3f}{data['std']:>8.3f}{'':>8}{'':>12}{'1.00':>13}",
    ]
    for name, row in (("without OMS", without), ("with OMS", with_)):
        lines.append(f"{name:14}{row['mean']:>+8.3f}{row['std']:>8.3f}{row['w1']:>8.3f}{row['w1_255']:>12.1f}"
                     f"{row['spread_ratio']:>13.2f}")
    lines.append(f"W1 falls {metrics['w1_improvement']:.1f}x with OMS (paper, SD1.5: 22.47 -> 7.84, 2.9x)")
    lines += ["", f"{'prompt':10}{'data':>8}{'without':>10}{'with OMS':>10}   mean RGB data / without / with"]
    for prompt, row in metrics["prompt_control"].items():
        lines.append(f"{prompt:10}{row['data_mean']:>+8.3f}{row['without_oms']:>+10.3f}{row['with_oms']:>+10.3f}   "
                     f"{row['data_rgb']} / {row['without_oms_rgb']} / {row['with_oms_rgb']}")
    sweep = metrics["oms_cfg_sweep"]
    pairs = ", ".join(f"{c:g}: {b:+.3f}" for c, b in zip(sweep["oms_cfg"], sweep["mean_brightness"], strict=True))
    lines += ["", f"OMS CFG sweep, prompt '{sweep['prompt']}': {pairs}"]
    lines += ["", "targets:"]
    for name, target in metrics["targets"].items():
        value = target["value"]
        shown = ", ".join(f"{v:+.3f}" for v in value) if isinstance(value, list) else f"{value:.3f}"
        lines.append(f"  [{'met' if target['met'] else 'MISSED'}] {name}: {shown}")
    return "\n".join(lines)

