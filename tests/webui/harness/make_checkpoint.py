"""Writes a random SD 1.5 checkpoint with real LDM key names (run in a WebUI environment: it needs the WebUI's ldm).

    python make_checkpoint.py --webui A1111_DIR --out FILE      (HF_HOME must hold openai/clip-vit-large-patch14's
                                                                 config and tokenizer files: assets.py lays them out)
The model is the WebUI's own configs/v1-inference.yaml with random weights. Layers that start at zero (the UNet's
output convolutions and attention projections) are re-initialised, else the UNet outputs exactly zero and nothing a
test changes could show in the image. Saved in fp16 (2.1 GB), like the checkpoints users download.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--webui", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sys.path.insert(0, str(args.webui / "repositories" / "stable-diffusion-stability-ai"))
    import transformers
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    # The text model's weights come from the checkpoint itself: build it from its config instead of a download.
    transformers.CLIPTextModel.from_pretrained = classmethod(
        lambda cls, name, **kw: cls(transformers.CLIPTextConfig.from_pretrained(name)))
    torch.manual_seed(args.seed)
    config = OmegaConf.load(args.webui / "configs" / "v1-inference.yaml")
    model = instantiate_from_config(config.model)
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0.0, 0.02, generator=generator)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial")
    save_file(state, str(partial))
    partial.rename(args.out)
    print(f"wrote {args.out} ({len(state)} tensors, {args.out.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
