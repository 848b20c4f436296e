"""The options a user sets for One More Step, declared once for every host: the solvers, the OMS CFG range, the
text-encoder layers, the precisions, and one line of help for each. Every host's controls, its argument checks and
its tooltips are made from these, so a new solver or a changed range is one edit here."""

from __future__ import annotations

import math
from dataclasses import dataclass

AUTOMATIC = "Automatic"  # the module (or precision) chosen for the model in use


@dataclass(frozen=True)
class Solver:
    """How the OMS step goes from its prediction x̂0 to the sampler's first noise level (lib_oms.step)."""

    name: str  # as users see and write it
    draws_z: bool  # takes fresh noise z, drawn from each image's seed
    help: str


SOLVERS = (
    Solver("SDE", True, "As released: x_T = sqrt(a)*x0 + sqrt(1-a)*z with fresh noise z from the seed; the "
                        "composition changes."),
    Solver("DDIM", False, "Deterministic (eta = 0): keeps the seed's own noise, so the image stays close to the one "
                          "made without OMS."),
)
SOLVER_NAMES = tuple(solver.name for solver in SOLVERS)


def solver_named(name: str) -> Solver:
    """The solver called ``name`` (any case); ValueError listing the solvers for any other value."""
    if isinstance(name, str):
        for solver in SOLVERS:
            if name.strip().lower() == solver.name.lower():
                return solver
    raise ValueError(f"OMS solver must be one of {', '.join(SOLVER_NAMES)}, got {name!r}")


@dataclass(frozen=True)
class NumberRange:
    minimum: float
    maximum: float
    step: float
    default: float

    def holds(self, value) -> bool:
        """Whether ``value`` is a finite number (not a bool) within the range."""
        return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
                and self.minimum <= value <= self.maximum)

    def describe(self) -> str:
        return f"a number from {self.minimum:g} to {self.maximum:g}"


CFG = NumberRange(0.0, 10.0, 0.1, 1.0)


def check_cfg(cfg) -> float:
    """``cfg`` as a float; ValueError when it is not a number within CFG."""
    if not CFG.holds(cfg):
        raise ValueError(f"OMS CFG must be {CFG.describe()}, got {cfg!r}")
    return float(cfg)


# The text encoder's output that an OpenCLIP ViT-H/14 module reads: SD 2.x's conditioning (the penultimate block,
# then the final layer norm; as released, most likely) or the last block's.
LAYERS = ("penultimate", "last")
PRECISIONS = (AUTOMATIC, "fp16", "fp32")

# One line of help per option, shared by every host's tooltips; a host adds only what differs there.
HELP = {
    "enabled": "Start sampling from the OMS-corrected latent (Hu et al., CVPR 2024): images as dark or as bright as "
               "the prompt asks, where sampling starts from pure noise.",
    "module": "The OMS module for the model's latent space. Automatic: the one made for SD1.x/SD2.x or SDXL, "
              "downloaded on first use.",
    "prompt": "What the OMS step reads, for light and colour, e.g. \"night, dark\".",
    "negative_prompt": "The unconditional prompt of OMS CFG (used only when OMS CFG is not 1). Empty as released.",
    "cfg": "Guidance of the OMS step: 1 as released (one network pass); above 1 pushes brightness and colour further "
           "toward the OMS prompt, below 1 toward the negative.",
    "solver": "SDE: as released, fresh noise from the seed (composition changes). DDIM: keeps the seed's own noise, "
              "so the composition of the image without OMS is largely kept.",
    "layer": "penultimate: SD 2.x's conditioning (as released); last: the text encoder's last layer.",
    "precision": "Automatic: fp16 on a GPU unless the host runs its model in fp32; fp32 on the CPU.",
    "download": "Download a missing module or text encoder from Hugging Face on first use (never with "
                "HF_HUB_OFFLINE=1).",
}
