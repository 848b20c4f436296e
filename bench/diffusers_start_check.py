"""How close the diffusers glue's start is to One More Step's, scheduler by scheduler, on the installed diffusers.

    python bench/diffusers_start_check.py

Tiny random SD 1.x pipelines (tests/diffusers_pipelines.py), every scheduler those pipelines use, every timestep
spacing, both prediction types: prints the largest |UNet's first input - (sqrt(a0)*x0_hat + sqrt(1 - a0)*z)| and the
size of the start, per case (tests/test_diffusers.py asserts the same within 1e-5 of the start's size).
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from tiny_oms_files import MODULE, tiny_encoder_loader, write_oms_folder  # noqa: E402

from lib_oms import text_encoders  # noqa: E402
from lib_oms.engine import z_seed  # noqa: E402
from lib_oms.module_files import load_module  # noqa: E402
from oms_diffusers import OneMoreStep  # noqa: E402
from tests.diffusers_pipelines import SCHEDULERS, SPACINGS, FirstInput, scheduler, sd_pipeline  # noqa: E402

PROMPT, SEED, STEPS, SIZE = "a black cat in a dark room", 5, 3, 16


def main() -> int:
    import diffusers

    text_encoders.load_openclip_text_encoder = tiny_encoder_loader()
    with tempfile.TemporaryDirectory() as folder:
        oms = write_oms_folder(Path(folder) / "oms")
        pipe = sd_pipeline(Path(folder), scheduler("Euler"))
        step = OneMoreStep(models_dir=oms, download=False)
        encoder = tiny_encoder_loader()(oms / "text_encoder")
        unit = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED))
        z = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(z_seed(SEED)))
        with torch.no_grad():
            x0_hat = -load_module(oms / MODULE).forward(unit, encoder.encode([PROMPT]))
        print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
        print(f"{'scheduler':<16} {'spacing':<9} {'prediction':<13} {'max |diff|':>11} {'start size':>11}")
        for name in SCHEDULERS:
            for spacing in SPACINGS:
                for prediction in ("epsilon", "v_prediction"):
                    try:
                        pipe.scheduler = scheduler(name, spacing, prediction)
                    except (ImportError, OptionalDependencyNotAvailable) as missing:
                        print(f"{name:<16} {spacing:<9} {prediction:<13} not run: {missing}")
                        continue
                    generator = torch.Generator().manual_seed(SEED)
                    start = step.start(pipe, PROMPT, generator=generator, num_inference_steps=STEPS, height=SIZE,
                                       width=SIZE)
                    first = FirstInput(pipe.unet)
                    pipe(PROMPT, generator=generator, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                         guidance_scale=1.0, output_type="latent", latents=start.latents)
                    first.handle.remove()
                    sched = pipe.scheduler
                    sigmas = getattr(sched, "sigmas", None)
                    alpha_bar0 = 1 / (1 + float(sigmas[0]) ** 2) if sigmas is not None and len(sigmas) else \
                        float(sched.alphas_cumprod[int(sched.timesteps[0])])
                    expected = math.sqrt(alpha_bar0) * x0_hat + math.sqrt(1 - alpha_bar0) * z
                    diff, size = (first.sample - expected).abs().max().item(), expected.abs().max().item()
                    print(f"{name:<16} {spacing:<9} {prediction:<13} {diff:>11.2e} {size:>11.3f}")
    return 0


try:
    from diffusers.utils import OptionalDependencyNotAvailable
except ImportError:  # older diffusers name it elsewhere
    OptionalDependencyNotAvailable = ImportError

if __name__ == "__main__":
    raise SystemExit(main())
