"""How much One More Step adds to a generation: the OMS network, its text encoder and its file load, against the
base UNet it serves. Random weights (speed does not depend on their values); every ratio is measured in one run.

    python bench/bench_oms.py            # CPU, or the GPU when there is one (fp16 there)
    python bench/bench_oms.py --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_oms.cuda_graphs import GraphedNetwork  # noqa: E402
from lib_oms.modules import load_module, save_module  # noqa: E402
from lib_oms.text_encoders import OPENCLIP_VIT_H14, clip_text_config, load_openclip_text_encoder  # noqa: E402
from lib_oms.unet import OMSUNet, normalize_unet_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
# base model: UNet config, text width, native latent side
BASES = {"sd15": ("sd15_unet.json", 768, 64), "sdxl": ("sdxl_unet.json", 2048, 128)}


def read_config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def timed(fn, device: torch.device, repeats: int, warmups: int) -> float:
    """Mean seconds per call of ``fn``, after warm-up calls."""
    for _ in range(warmups):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--base", choices=sorted(BASES), default="sd15", help="the base UNet OMS is added to")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the base's native size)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the generation OMS is added to")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    warmups = 5 if device.type == "cuda" else 1
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    rows: dict[str, float] = {}
    config_name, base_width, native_side = BASES[args.base]
    side = args.latent or native_side
    base = "SD1.5" if args.base == "sd15" else "SDXL"

    from diffusers import UNet2DConditionModel  # the base model is the reference implementation's class

    with torch.device(device):  # random weights made where they run: much faster than on the CPU
        base_unet = UNet2DConditionModel(**read_config(config_name)).to(dtype).eval()
    x2 = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    ctx_base = torch.randn(2, 77, base_width, device=device, dtype=dtype)
    t = torch.tensor([999, 999], device=device)
    added = None
    if args.base == "sdxl":
        added = {"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * 2, device=device,
                                          dtype=dtype)}
    step_name = f"{base} UNet, batch 2 (one CFG step)"
    rows[step_name] = timed(lambda: base_unet(x2, t, ctx_base, added_cond_kwargs=added), device, repeats, warmups)
    base_unet = None  # free it before the OMS measurements
    gc.collect()

    oms_config = normalize_unet_config(read_config("oms_b_unet.json"), "OMS-B config")
    with torch.device(device):
        oms = OMSUNet(oms_config).to(dtype).eval()
    ctx = torch.randn(2, 77, 1024, device=device, dtype=dtype)
    rows["OMS-B, batch 1 (OMS CFG 1)"] = timed(lambda: oms(x2[:1], ctx[:1]), device, repeats, warmups)
    rows["OMS-B, batch 2 (OMS CFG > 1)"] = timed(lambda: oms(x2, ctx), device, repeats, warmups)
    if device.type == "cuda":
        graphed = GraphedNetwork(oms)  # what OMSModule.forward runs on a GPU
        rows["OMS-B, batch 1, CUDA graph"] = timed(lambda: graphed(x2[:1], ctx[:1]), device, repeats, warmups)
        rows["OMS-B, batch 2, CUDA graph"] = timed(lambda: graphed(x2, ctx), device, repeats, warmups)
        graphed = None

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_module(Path(tmp) / "oms_b_bench_15_21", oms.float().cpu(), oms_config,
                             latent_space="sd", text_encoder="openclip-h", fp16=True)
        oms = None
        gc.collect()
        start = time.perf_counter()
        module = load_module(folder, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows["OMS-B fp16 file -> device, first load (incl. SHA-256)"] = time.perf_counter() - start
        del module

    from transformers import CLIPTextModel

    # the ViT-H/14 text tower as SD2's diffusers text_encoder holds it (23 blocks), random weights
    with torch.device(device):
        random_tower = CLIPTextModel(clip_text_config(OPENCLIP_VIT_H14, 23)).state_dict()
    encoder = load_openclip_text_encoder(random_tower, layer="penultimate", device=device, dtype=dtype)
    del random_tower
    prompts = ["a starry night", ""]
    rows["OpenCLIP-H text encoder, 2 prompts"] = timed(lambda: encoder.encode(prompts), device, repeats, warmups)
    encoder = None

    step = rows[step_name]
    generation = args.steps * step
    oms_cfg1 = rows["OMS-B, batch 1 (OMS CFG 1)"]
    oms_cfg2 = rows["OMS-B, batch 2 (OMS CFG > 1)"]
    text = rows["OpenCLIP-H text encoder, 2 prompts"]
    ratios = {
        f"OMS-B batch 1 / {base} UNet step": oms_cfg1 / step,
        f"OMS step, CFG 1, cached prompt / {args.steps}-step generation": oms_cfg1 / generation,
        f"OMS step, CFG 2, new prompt / {args.steps}-step generation": (oms_cfg2 + text) / generation,
    }
    if device.type == "cuda":
        ratios["OMS-B batch 1: eager / CUDA graph"] = oms_cfg1 / rows["OMS-B, batch 1, CUDA graph"]
        ratios[f"OMS step, CFG 1, CUDA graph / {args.steps}-step generation"] = (
            rows["OMS-B, batch 1, CUDA graph"] / generation)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nOne More Step benchmark: {name}, {dtype}, {base} latent {side}x{side}, torch {torch.__version__}\n")
    print(f"| {'what':<58} | {'ms per call':>11} |\n|{'-' * 60}|{'-' * 13}|")
    for what, seconds in rows.items():
        print(f"| {what:<58} | {seconds * 1000:>11.1f} |")
    print(f"\n| {'ratio':<58} | {'value':>11} |\n|{'-' * 60}|{'-' * 13}|")
    for what, value in ratios.items():
        shown = f"{value * 100:.1f} %" if "generation" in what else f"{value:.2f}x"
        print(f"| {what:<58} | {shown:>11} |")
    peak = peak_memory_mb(device)
    print(f"\npeak memory ({'GPU allocated' if device.type == 'cuda' else 'process RSS'}): {peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "dtype": str(dtype), "base": base, "latent": side, "ms": {
            k: v * 1000 for k, v in rows.items()}, "ratios": ratios, "peak_mib": peak}, indent=2))


if __name__ == "__main__":
    main()
