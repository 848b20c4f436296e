"""Writes a small random Stable Diffusion 1.5-shaped model as a diffusers folder (run in the WebUI's own Python: it
needs the diffusers and transformers the WebUI loads the folder with; SD.Next's models are diffusers folders).

    python make_diffusers_model.py --out DIR --tokenizer DIR     (DIR of --tokenizer: a CLIP BPE tokenizer's
                                                                  vocab.json and merges.txt; assets.py lays them out)

What a WebUI reads to tell an SD 1.x model is kept as in SD 1.5: the pipeline class (StableDiffusionPipeline), the
latent space (4 channels, 8× down-sampling, VAE scaling factor 0.18215), the UNet's block layout and the text
encoder's kind (a CLIP text model with CLIP's tokenizer, 77 positions) feeding its cross-attention, and SD 1.5's
noise schedule (scaled-linear β 0.00085 → 0.012 over 1000 steps, PNDM with steps_offset 1). The widths are small
(32–64 channels, a 2-layer 64-wide text encoder), so the folder is a few MB and a 64×64 image takes a moment on a
CPU. The values are written here from SD 1.5's published architecture, not read from any WebUI's files. Layers that
would start at zero are given random weights, so that anything a test changes shows in the image. Saved in fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# SD 1.5's layout at small widths: three cross-attention levels and a plain one, down and up.
UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 64, "attention_head_dim": 8,
}
VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "act_fn": "silu", "norm_num_groups": 32,
}
TEXT_ENCODER = {
    "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 64,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for param in model.parameters():
                if param.dim() > 1 and not param.any():
                    param.normal_(0.0, 0.02, generator=generator)
    tokenizer = CLIPTokenizer(str(args.tokenizer / "vocab.json"), str(args.tokenizer / "merges.txt"),
                              model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=CLIPImageProcessor(), requires_safety_checker=False)
    partial = args.out.with_name(args.out.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    ids = CLIPTokenizer.from_pretrained(partial / "tokenizer")("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], f"tokenizer files are wrong: {ids}"
    partial.rename(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
