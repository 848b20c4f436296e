"""The OMS step and the hand-over to each sampler family, against closed forms."""

import math

import pytest
import torch

from lib_oms.step import (
    K_DIFFUSION,
    TIMESTEP,
    SamplerStart,
    alpha_bar_from_sigma,
    ddim_step,
    guided_v,
    predicted_x0,
    sde_step,
    sigma_from_alpha_bar,
    skip_reason,
    to_sampler_noise,
)

SD_SIGMA_MAX = 14.614641  # σ at t = 999 of SD's scaled-linear schedule
SD_ALPHA_BAR_999 = 0.0046601


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_sd_schedule_constants():
    alphas_cumprod = sd_alphas_cumprod()
    assert alphas_cumprod[999].item() == pytest.approx(SD_ALPHA_BAR_999, abs=5e-8)
    assert sigma_from_alpha_bar(alphas_cumprod[999].item()) == pytest.approx(SD_SIGMA_MAX, abs=1e-4)
    assert alpha_bar_from_sigma(SD_SIGMA_MAX) == pytest.approx(SD_ALPHA_BAR_999, abs=1e-7)
    # 6.8 % of the image survives at the last training step
    assert math.sqrt(alphas_cumprod[999].item()) == pytest.approx(0.068265, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.03, 1.0, 11.03, SD_SIGMA_MAX, 4518.76])
def test_sigma_alpha_bar_round_trip(sigma):
    assert sigma_from_alpha_bar(alpha_bar_from_sigma(sigma)) == pytest.approx(sigma, rel=1e-9)


def test_guidance_and_x0():
    v_u, v_c = torch.full((1, 4, 2, 2), 0.2), torch.full((1, 4, 2, 2), -0.4)
    assert torch.allclose(guided_v(v_u, v_c, 1.0), v_c)
    assert torch.allclose(guided_v(v_u, v_c, 0.0), v_u)
    assert torch.allclose(guided_v(v_u, v_c, 2.0), torch.full_like(v_c, -1.0))
    assert torch.equal(predicted_x0(v_c), -v_c)


def test_sde_step_closed_form():
    x0_hat = torch.full((2, 4, 3, 3), -0.5)
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    x_T = sde_step(x0_hat, SD_ALPHA_BAR_999, z)
    assert torch.allclose(x_T, 0.068265 * -0.5 + 0.997667 * z, atol=1e-5)


def test_ddim_step_keeps_the_seed_noise():
    x0_hat = torch.full((1, 4, 3, 3), 0.7)
    x_T_prime = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    x_T = ddim_step(x0_hat, SD_ALPHA_BAR_999, x_T_prime)
    assert torch.allclose(x_T, math.sqrt(SD_ALPHA_BAR_999) * 0.7 + math.sqrt(1 - SD_ALPHA_BAR_999) * x_T_prime)
    # with nothing predicted the start is the seed's noise scaled to the VP level
    assert torch.allclose(ddim_step(torch.zeros_like(x0_hat), SD_ALPHA_BAR_999, x_T_prime),
                          math.sqrt(1 - SD_ALPHA_BAR_999) * x_T_prime)


def official_oms_step(latents, v, alpha_bar_prev, z):
    """The released pipeline's oms_step: a DDPM posterior step with ᾱ_t forced to 0
    and v-prediction, whose noise is scaled by the variance instead of the standard deviation."""
    alpha_prod_t, beta_prod_t = 0.0, 1.0
    beta_prod_t_prev = 1 - alpha_bar_prev
    current_alpha_t = alpha_prod_t / alpha_bar_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample = alpha_prod_t**0.5 * latents - beta_prod_t**0.5 * v
    pred_original_sample_coeff = alpha_bar_prev**0.5 * current_beta_t / beta_prod_t
    current_sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * latents
    variance = (1 - alpha_bar_prev) / (1 - alpha_prod_t) * current_beta_t
    return pred_prev_sample + variance * z


@pytest.mark.parametrize("alpha_bar", [SD_ALPHA_BAR_999, 0.0081550])
def test_agrees_with_official_formula_up_to_its_noise_factor(alpha_bar):
    g = torch.Generator().manual_seed(2)
    latents, v, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    ours = sde_step(predicted_x0(v), alpha_bar, z)
    official = official_oms_step(latents, v, alpha_bar, z)
    # The two differ only in the noise factor: √(1−ᾱ) here, (1−ᾱ) in the release.
    factor_gap = math.sqrt(1 - alpha_bar) - (1 - alpha_bar)
    assert torch.allclose(ours - official, factor_gap * z, atol=1e-6)
    # and that gap is a quarter of a percent of the noise at SD's last step
    assert factor_gap / math.sqrt(1 - alpha_bar) < 0.005


def test_k_diffusion_hand_over_gives_x0_plus_sigma_eps():
    """k-diffusion starts from x = σ₀·noise: the handed noise must make x = x̂0 + σ₀·z and c_in·x = x_T."""
    g = torch.Generator().manual_seed(3)
    x0_hat, z = torch.randn(1, 4, 5, 5, generator=g), torch.randn(1, 4, 5, 5, generator=g)
    start = SamplerStart.k_diffusion(SD_SIGMA_MAX)
    x_T = sde_step(x0_hat, start.alpha_bar0, z)
    x = to_sampler_noise(x_T, start) * start.sigma0
    assert torch.allclose(x, x0_hat + start.sigma0 * z, atol=1e-4)
    c_in = 1 / math.sqrt(start.sigma0**2 + 1)
    assert torch.allclose(c_in * x, x_T, atol=1e-6)


def test_sgm_noise_multiplier_and_timestep_samplers_take_x_T_unchanged():
    x_T = torch.randn(1, 4, 3, 3)
    sgm = SamplerStart.k_diffusion(SD_SIGMA_MAX, sgm_noise_multiplier=True)
    x = to_sampler_noise(x_T, sgm) * math.sqrt(1 + sgm.sigma0**2)  # what the sampler does with it
    assert torch.allclose(x / math.sqrt(1 + sgm.sigma0**2), x_T)
    assert torch.equal(to_sampler_noise(x_T, SamplerStart.timestep(0.008155)), x_T)


def test_sampler_start_constructors():
    start = SamplerStart.k_diffusion(SD_SIGMA_MAX)
    assert start.family == K_DIFFUSION and start.alpha_bar0 == pytest.approx(SD_ALPHA_BAR_999, abs=1e-7)
    ddim20 = SamplerStart.timestep(sd_alphas_cumprod()[951].item())  # DDIM at 20 steps starts at t = 951
    assert ddim20.family == TIMESTEP and ddim20.alpha_bar0 == pytest.approx(0.0081550, abs=1e-6)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="first sigma"):
            SamplerStart.k_diffusion(bad)
    for bad in (1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="alpha_bar"):
            SamplerStart.timestep(bad)


def test_zero_terminal_snr_is_skipped_with_a_reason():
    ztsnr = SamplerStart.k_diffusion(4518.76)  # rescale_zero_terminal_snr_abar's σ_max
    assert "zero-terminal-SNR" in skip_reason(ztsnr)
    assert skip_reason(SamplerStart.k_diffusion(SD_SIGMA_MAX)) is None
    assert skip_reason(SamplerStart.timestep(0.0)) is not None
