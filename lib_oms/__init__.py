"""One More Step (Hu et al., CVPR 2024) in plain PyTorch: the OMS network, its text encoders, module files, the step
that turns pure noise into the start a Stable Diffusion checkpoint expects, and the runtime every host's glue calls.
No host imports."""

from .engine import oms_start, seeded_unit_noise, seeded_z, z_seed
from .errors import LatentSpaceError, ModuleFileError, OMSError, TextEncoderError
from .module_files import OMSModule, check_latent_space, find_modules, load_module, save_module
from .runtime import Choice, Host, HostWords, ModelText, OMSRuntime, Outcome, Prepared, corrected_start
from .step import SamplerStart, skip_reason, to_sampler_noise
from .text_encoders import PromptEmbeddingCache, load_mixclip_text_encoder, load_openclip_text_encoder
from .unet import OMSUNet

__all__ = [
    "Choice",
    "Host",
    "HostWords",
    "LatentSpaceError",
    "ModelText",
    "ModuleFileError",
    "OMSError",
    "OMSModule",
    "OMSRuntime",
    "OMSUNet",
    "Outcome",
    "Prepared",
    "PromptEmbeddingCache",
    "SamplerStart",
    "TextEncoderError",
    "check_latent_space",
    "corrected_start",
    "find_modules",
    "load_mixclip_text_encoder",
    "load_module",
    "load_openclip_text_encoder",
    "oms_start",
    "save_module",
    "seeded_unit_noise",
    "seeded_z",
    "skip_reason",
    "to_sampler_noise",
    "z_seed",
]
