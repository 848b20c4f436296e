"""The WebUI's default sampling path in small: a k-diffusion discrete-schedule wrapper and the Euler sampler.

k-diffusion (Karras et al. 2022) samples in σ-space: x = x0 + σ·ε, σ = √((1 − ᾱ)/ᾱ). An ε-prediction model
is wrapped as D(x, σ) = x − σ·ε̂(c_in·x, t(σ)) with c_in = 1/√(σ² + 1), which turns x into SD's
variance-preserving x_t, and t(σ) interpolates the timestep in log σ (k-diffusion's DiscreteSchedule).
Sampling starts from x = σ₀·noise with σ₀ = σ(t = 999) = 14.6146 for SD's schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .denoiser import sd_alphas_cumprod


class DiscreteEpsDenoiser:
    """k-diffusion's CompVis-style wrapper of an ε-prediction model over SD's 1000 discrete timesteps."""

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        self.model = model
        self.sigmas = ((1.0 - sd_alphas_cumprod()) / sd_alphas_cumprod()).sqrt()  # ascending in t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose log σ interpolates linearly between the two nearest discrete ones."""
        log_sigma = sigma.double().log()
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        low_value, high_value = self.log_sigmas[high - 1], self.log_sigmas[high]
        weight = ((log_sigma - low_value) / (high_value - low_value)).clamp(0, 1)
        return (high - 1).double() + weight

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at fractional timestep t, interpolating log σ."""
        t = t.double()
        low = t.floor().long().clamp(0, len(self.sigmas) - 1)
        high = t.ceil().long().clamp(0, len(self.sigmas) - 1)
        weight = t - t.floor()
        return ((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp()

    def get_sigmas(self, steps: int) -> torch.Tensor:
        """The default ("Automatic" for Euler) schedule: timesteps evenly spaced from 999 to 0, then σ = 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps, dtype=torch.float64)
        return torch.cat([self.t_to_sigma(t), t.new_zeros(1)])

    def __call__(self, x: torch.Tensor, sigma: float, context: torch.Tensor) -> torch.Tensor:
        """D(x, σ) = x − σ·ε̂(x/√(σ² + 1), t(σ)): the denoised estimate of x0."""
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        t = self.sigma_to_t(torch.tensor([sigma])).float().to(x.device).expand(x.shape[0])
        return x - sigma * self.model(x * c_in, t, context)


@torch.no_grad()
def sample_euler(denoiser: DiscreteEpsDenoiser, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor | None = None, cfg: float = 1.0) -> torch.Tensor:
    """k-diffusion's Euler sampler from x = σ₀·noise, with classifier-free guidance when cfg ≠ 1.

    Each step: d = (x − D(x, σ_i))/σ_i, x ← x + d·(σ_{i+1} − σ_i).
    """
    x = noise * float(sigmas[0])
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        if cfg == 1.0 or uncond is None:
            denoised = denoiser(x, sigma, cond)
        else:
            both = denoiser(torch.cat([x, x]), sigma, torch.cat([uncond, cond]))
            denoised_uncond, denoised_cond = both.chunk(2)
            denoised = denoised_uncond + cfg * (denoised_cond - denoised_uncond)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x
