"""Tiny random-weight Stable Diffusion 1.x and SDXL pipelines of the installed diffusers, built here (no hub): for
the diffusers glue's tests, which run them for real with every scheduler those pipelines are used with."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tests.factories import write_clip_tokenizer

SD_SCALING, SDXL_SCALING = 0.18215, 0.13025
# The base config of SD's schedulers (scaled-linear betas, "leading" spacing with offset 1, as SD 1.5's).
SCHEDULER_BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, set_alpha_to_one=False, clip_sample=False)
# Every scheduler the SD and SDXL pipelines are used with: name -> (class name, config additions).
SCHEDULERS = {
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
}
SPACINGS = ("leading", "trailing", "linspace")
TEXT = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408, max_position_embeddings=77,
            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5)


def scheduler(name: str, spacing: str = "leading", prediction_type: str = "epsilon", **config):
    import diffusers

    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**SCHEDULER_BASE, **extra, "timestep_spacing": spacing,
                                                       "prediction_type": prediction_type, **config})


@functools.cache
def tokenizer_folder(root: str, pad_token: str) -> Path:
    return write_clip_tokenizer(Path(root) / f"tokenizer_{'bang' if pad_token == '!' else 'eot'}", pad_token)


def _tokenizer(root: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_folder(str(root), pad_token)))


def _seeded(seed: int):
    torch.manual_seed(seed)  # the models' own random init, made the same every time


def _vae(scaling_factor: float, **config):
    from diffusers import AutoencoderKL

    _seeded(0)
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=2, sample_size=16, scaling_factor=scaling_factor, **config)


def sd_pipeline(root: Path, scheduler_obj, *, inpainting: bool = False, vae_config: dict | None = None):
    """A tiny SD 1.x-shaped text-to-image (or inpainting) pipeline: 8×8 latents, a 2-layer 32-wide CLIP text
    encoder."""
    import diffusers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(1)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, attention_head_dim=2)
    _seeded(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, hidden_act="quick_gelu", **TEXT))
    cls = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    vae = _vae(SD_SCALING, **(vae_config or {}))
    return cls(vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(root), unet=unet, scheduler=scheduler_obj,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


SDXL_L = dict(hidden_size=32, projection_dim=32, hidden_act="quick_gelu")
SDXL_G = dict(hidden_size=32, projection_dim=32, hidden_act="gelu")


def sdxl_pipeline(root: Path, scheduler_obj):
    """A tiny SDXL-shaped text-to-image pipeline: two 2-layer 32-wide CLIP text encoders (the second with a
    projection, its tokenizer padding with "!"), an 80-wide added time embedding."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _seeded(3)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                norm_num_groups=2, attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80)
    _seeded(4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_L, **TEXT))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_G, **{**TEXT, "pad_token_id": 0}))
    return StableDiffusionXLPipeline(vae=_vae(SDXL_SCALING), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=_tokenizer(root), tokenizer_2=_tokenizer(root, "!"), unet=unet,
                                     scheduler=scheduler_obj)


class FirstInput:
    """Records the UNet's first input (its ``sample``) and the timestep it came with."""

    def __init__(self, unet):
        self.sample = self.timestep = None
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, _module, args, kwargs):
        if self.sample is None:
            self.sample = (args[0] if args else kwargs["sample"]).detach().clone()
            self.timestep = args[1] if len(args) > 1 else kwargs["timestep"]
