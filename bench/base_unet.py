"""The base model's UNet for timing, without diffusers: lib_oms's network at the checkpoint's sizes plus the time
conditioning diffusers' ``UNet2DConditionModel`` has (and the OMS network lacks).

diffusers' time conditioning: a sinusoidal embedding of the timestep (width block_out_channels[0]), a two-layer
MLP to 4× that width, and in every resnet ``h = conv1(...) + time_emb_proj(silu(temb))[:, :, None, None]``. SDXL
("text_time") adds an MLP of the pooled text embedding and the six size/crop numbers, each number embedded
sinusoidally. The arithmetic is the same as diffusers'; the weights are random.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lib_oms.unet import OMSUNet, ResnetBlock, normalize_unet_config

# config keys of SDXL's added conditioning, which lib_oms's network does not build
ADDED_CONDITIONING = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def sinusoidal(values: torch.Tensor, width: int) -> torch.Tensor:
    """diffusers ``get_timestep_embedding`` with flip_sin_to_cos=True, downscale_freq_shift=0: [cos, sin]."""
    half = width // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=values.device) / half)
    angles = values.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimedUNet(nn.Module):
    """``forward(sample, timesteps, context, text_embeds=None, time_ids=None)`` with diffusers' arithmetic."""

    def __init__(self, raw_config: dict):
        super().__init__()
        config = normalize_unet_config({k: v for k, v in raw_config.items() if k not in ADDED_CONDITIONING},
                                       "base UNet config")
        self.unet = OMSUNet(config)
        self.time_width = config["block_out_channels"][0]
        embedding = 4 * self.time_width
        self.time_embedding = nn.Sequential(nn.Linear(self.time_width, embedding), nn.SiLU(),
                                            nn.Linear(embedding, embedding))
        self.added_time_width = raw_config.get("addition_time_embed_dim")
        self.add_embedding = None
        if raw_config.get("addition_embed_type") == "text_time":
            inputs = raw_config["projection_class_embeddings_input_dim"]
            self.add_embedding = nn.Sequential(nn.Linear(inputs, embedding), nn.SiLU(), nn.Linear(embedding, embedding))
        self.time_projections = nn.ModuleList()
        for resnet in (m for m in self.unet.modules() if isinstance(m, ResnetBlock)):
            projection = nn.Linear(embedding, resnet.conv1.out_channels)
            self.time_projections.append(projection)
            resnet.conv1.register_forward_hook(self._adds_time(projection))
        self._temb: torch.Tensor | None = None

    @property
    def pooled_width(self) -> int:
        """Width of SDXL's pooled text embedding (the added MLP's input less the six embedded numbers)."""
        return self.add_embedding[0].in_features - 6 * self.added_time_width

    def _adds_time(self, projection: nn.Linear):
        def hook(_module, _inputs, output):
            return output + projection(F.silu(self._temb))[:, :, None, None]
        return hook

    def forward(self, sample, timesteps, context, text_embeds=None, time_ids=None) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype
        temb = self.time_embedding(sinusoidal(timesteps, self.time_width).to(dtype))
        if self.add_embedding is not None:
            numbers = sinusoidal(time_ids.flatten(), self.added_time_width).reshape(sample.shape[0], -1)
            temb = temb + self.add_embedding(torch.cat([text_embeds, numbers.to(dtype)], dim=-1))
        self._temb = temb
        try:
            return self.unet(sample, context)
        finally:
            self._temb = None
