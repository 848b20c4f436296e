"""fp16 against fp32 on the GPU for the whole OMS step (random OMS-B module and OpenCLIP-H text tower).

    python bench/fp16_check.py      # needs a CUDA device

Prints the error of the fp16 path in the quantities the sampler sees: the predicted mean x̂0 and the handed noise.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_oms import read_config, use_tokenizer  # noqa: E402

from lib_oms.catalog import OPENCLIP_H  # noqa: E402
from lib_oms.engine import oms_start, predict_v, seeded_unit_noise, seeded_z  # noqa: E402
from lib_oms.module_files import load_module, save_module  # noqa: E402
from lib_oms.step import SamplerStart  # noqa: E402
from lib_oms.text_encoders import OPENCLIP_VIT_H14, clip_text_config, load_openclip_text_encoder  # noqa: E402
from lib_oms.unet import OMSUNet, normalize_unet_config  # noqa: E402


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def main() -> None:
    from transformers import CLIPTextModel

    device = torch.device("cuda")
    print("tokenizer:", use_tokenizer())
    torch.manual_seed(0)
    config = normalize_unet_config(read_config("oms_b_unet.json"), "OMS-B config")
    tower = CLIPTextModel(clip_text_config(OPENCLIP_VIT_H14, 23)).state_dict()
    prompts = ["a starry night", "a dark alley at night"]
    print(f"{'latent':>8} {'CFG':>4} {'x0 rel. err':>12} {'noise rel. err':>15} {'max |diff| noise':>17} {'finite':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_module(Path(tmp) / "oms_b_random_15_21", OMSUNet(config), config, latent_space="sd",
                             text_encoder=OPENCLIP_H)
        modules = {dtype: load_module(folder, device=device, dtype=dtype) for dtype in (torch.float32, torch.float16)}
        encoders = {dtype: load_openclip_text_encoder(tower, device=device, dtype=dtype)
                    for dtype in (torch.float32, torch.float16)}
        for side in (64, 96, 128):
            noise = seeded_unit_noise([1, 2], (4, side, side)).to(device)
            z = seeded_z([1, 2], (4, side, side)).to(device)
            start = SamplerStart.k_diffusion(14.614641)
            for cfg in (1.0, 2.0):
                out = {}
                x0 = {}
                for dtype in (torch.float32, torch.float16):
                    out[dtype] = oms_start(modules[dtype], encoders[dtype], noise, prompts, start=start, cfg=cfg, z=z)
                    x0[dtype] = -predict_v(modules[dtype], encoders[dtype], noise, prompts, ["", ""], cfg)
                diff = (out[torch.float16] - out[torch.float32]).abs().max().item()
                finite = bool(torch.isfinite(out[torch.float16]).all())
                print(f"{side:>8} {cfg:>4} {relative_error(x0[torch.float16], x0[torch.float32]):>12.2e} "
                      f"{relative_error(out[torch.float16], out[torch.float32]):>15.2e} {diff:>17.2e} {finite!s:>7}")


if __name__ == "__main__":
    main()
