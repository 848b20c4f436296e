"""The One More Step (OMS) solver step and its hand-over to the WebUI's samplers.

Notation follows Hu et al., "One More Step" (CVPR 2024), §3.3 and Appendix D.2:

* ``x_T'`` pure unit Gaussian noise, the OMS network's input (SNR 0, ᾱ_T' = 0);
* ``v`` the OMS prediction (v-prediction at SNR 0, so ``v = −x0``);
* ``ᾱ₀`` the cumulative alpha at the host sampler's *first* noise level;
* ``x_T`` the variance-preserving latent at ᾱ₀ that the checkpoint expects to start from.

Every function is pure: no hidden state, no random draws (callers pass the noise in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

K_DIFFUSION = "k-diffusion"
TIMESTEP = "timestep"

# SD's schedule starts at ᾱ = 4.66e-3; a zero-terminal-SNR schedule at 4.9e-8. Anything this close to 0 leaks no signal.
ZERO_TERMINAL_SNR_ALPHA_BAR = 1e-5


def alpha_bar_from_sigma(sigma: float) -> float:
    """ᾱ = 1 / (1 + σ²), the VP cumulative alpha of a k-diffusion noise level (σ² = (1 − ᾱ) / ᾱ)."""
    return 1.0 / (1.0 + float(sigma) ** 2)


def sigma_from_alpha_bar(alpha_bar: float) -> float:
    """σ = √((1 − ᾱ) / ᾱ), the k-diffusion noise level of a VP cumulative alpha."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def guided_v(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """OMS classifier-free guidance: v = v_u + s·(v_c − v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def predicted_x0(v: torch.Tensor) -> torch.Tensor:
    """x̂0 = √ᾱ_T'·x_T' − √(1 − ᾱ_T')·v, which at the OMS step's own ᾱ_T' = 0 is x̂0 = −v."""
    return -v


def sde_step(x0_hat: torch.Tensor, alpha_bar0: float, z: torch.Tensor) -> torch.Tensor:
    """DDPM posterior sample from SNR 0 to ᾱ₀: x_T = √ᾱ₀·x̂0 + √(1 − ᾱ₀)·z, z fresh unit noise.

    At ᾱ_T' = 0 the posterior mean has no x_T' term, so x_T' reaches x_T only through the network.
    (The released code scales z by the variance 1 − ᾱ₀ instead of its square root: 0.23 % less noise.)
    """
    return math.sqrt(alpha_bar0) * x0_hat + math.sqrt(1.0 - alpha_bar0) * z


def ddim_step(x0_hat: torch.Tensor, alpha_bar0: float, x_T_prime: torch.Tensor) -> torch.Tensor:
    """DDIM (η = 0) step from SNR 0 to ᾱ₀: ε̂ = x_T', so x_T = √ᾱ₀·x̂0 + √(1 − ᾱ₀)·x_T'.

    Deterministic: the seed's own noise stays in the start, so the composition of the seed is kept.
    """
    return math.sqrt(alpha_bar0) * x0_hat + math.sqrt(1.0 - alpha_bar0) * x_T_prime


@dataclass(frozen=True)
class SamplerStart:
    """Where and how the host sampler starts: its first noise level and how it scales the unit noise it is given.

    ``family`` is ``"k-diffusion"`` (the sampler multiplies its unit noise by σ₀, or by √(1 + σ₀²) with the
    SGM noise multiplier) or ``"timestep"`` (DDIM, PLMS, UniPC: the unit noise is used as the VP latent itself).
    """

    family: str
    alpha_bar0: float
    sigma0: float | None = None
    sgm_noise_multiplier: bool = False

    @classmethod
    def k_diffusion(cls, sigma0: float, sgm_noise_multiplier: bool = False) -> SamplerStart:
        """A k-diffusion (or LCM) sampler whose schedule starts at σ₀."""
        sigma0 = float(sigma0)
        if not math.isfinite(sigma0) or sigma0 <= 0:
            raise ValueError(f"the sampler's first sigma must be a positive number, got {sigma0}")
        return cls(K_DIFFUSION, alpha_bar_from_sigma(sigma0), sigma0, bool(sgm_noise_multiplier))

    @classmethod
    def timestep(cls, alpha_bar0: float) -> SamplerStart:
        """A timestep sampler (DDIM, PLMS, UniPC) whose first model call is at cumulative alpha ᾱ₀."""
        alpha_bar0 = float(alpha_bar0)
        if not 0.0 <= alpha_bar0 < 1.0:
            raise ValueError(f"the sampler's first alpha_bar must lie in [0, 1), got {alpha_bar0}")
        return cls(TIMESTEP, alpha_bar0)


def skip_reason(start: SamplerStart) -> str | None:
    """Why OMS has nothing to do for this start, or None when it applies.

    A zero-terminal-SNR schedule already starts from pure noise (ᾱ₀ ≈ 0): there is no leaked signal to supply.
    """
    if start.alpha_bar0 < ZERO_TERMINAL_SNR_ALPHA_BAR:
        return f"zero-terminal-SNR schedule (alpha_bar at the first step = {start.alpha_bar0:.3g}): nothing to correct"
    return None


def inpaint_noise(oms_noise: torch.Tensor, noise: torch.Tensor, init_latent: torch.Tensor, nmask: torch.Tensor,
                  noise_scale: float) -> torch.Tensor:
    """The noise that makes the masked area of an inpainting start exactly at the OMS latent.

    The sampler starts from ``init + c·noise`` (c = ``noise_scale``: σ₀, or √(1 + σ₀²) with the SGM noise
    multiplier / ComfyUI's full denoise). With ``oms_noise`` = x_VE/c (``to_sampler_noise`` of that start) the
    returned noise' = noise + nmask·(oms_noise − init/c − noise) gives init + c·noise' = x_VE inside the mask
    (nmask = 1) and leaves the noise outside it unchanged (fractional soft-inpainting masks blend the two).
    """
    return noise + nmask * (oms_noise - init_latent / noise_scale - noise)


def to_sampler_noise(x_T: torch.Tensor, start: SamplerStart) -> torch.Tensor:
    """The unit-noise tensor that the sampler's own scaling turns into the VP latent ``x_T``.

    k-diffusion starts from x = σ₀·noise and feeds the UNet c_in·x = x / √(1 + σ₀²), so it needs
    noise = x_T·√(1 + σ₀²) / σ₀ (then x = x̂0 + σ₀·z for the SDE solver). With the SGM noise multiplier it starts
    from √(1 + σ₀²)·noise, and timestep samplers use the noise as the VP latent: both need noise = x_T.
    """
    if start.family == K_DIFFUSION and not start.sgm_noise_multiplier:
        return x_T * (math.sqrt(1.0 + start.sigma0**2) / start.sigma0)
    return x_T
