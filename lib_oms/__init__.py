"""One More Step (Hu et al., CVPR 2024) in plain PyTorch: the OMS network, its text encoders, module files and the
step that turns pure noise into the start a Stable Diffusion checkpoint expects. No WebUI imports."""

from .engine import oms_start, seeded_unit_noise
from .errors import LatentSpaceError, ModuleFileError, OMSError, TextEncoderError
from .module_files import ModuleCache, OMSModule, check_latent_space, find_modules, load_module, save_module
from .step import SamplerStart, skip_reason, to_sampler_noise
from .text_encoders import PromptEmbeddingCache, load_mixclip_text_encoder, load_openclip_text_encoder
from .unet import OMSUNet

__all__ = [
    "LatentSpaceError",
    "ModuleCache",
    "ModuleFileError",
    "OMSError",
    "OMSModule",
    "OMSUNet",
    "PromptEmbeddingCache",
    "SamplerStart",
    "TextEncoderError",
    "check_latent_space",
    "find_modules",
    "load_mixclip_text_encoder",
    "load_module",
    "load_openclip_text_encoder",
    "oms_start",
    "save_module",
    "seeded_unit_noise",
    "skip_reason",
    "to_sampler_noise",
]
