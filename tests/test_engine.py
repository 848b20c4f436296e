"""oms_start with a network whose prediction is known in closed form."""

import math
from types import SimpleNamespace

import pytest
import torch

from lib_oms.engine import Z_SEED_OFFSET, oms_start, seeded_unit_noise, seeded_z, z_seed
from lib_oms.errors import TextEncoderError
from lib_oms.step import SamplerStart

SIGMA0 = 14.614641
PROMPT_MEANS = {"": 0.0, "dark": -0.8, "bright": 0.6, "red": 0.3}


class MeanEncoder:
    """Encodes a prompt as one token holding the data mean that prompt stands for."""

    kind = "test-means"
    width = 1

    def __init__(self):
        self.calls = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return torch.tensor([[[PROMPT_MEANS[p]]] for p in prompts])


def constant_module():
    """A module whose network predicts v = −(the prompt's mean) everywhere, whatever the noise: x̂0 = that mean."""
    calls = []

    def unet(sample, context):
        calls.append(sample.shape[0])
        return -context[:, :1, :1].reshape(-1, 1, 1, 1).expand_as(sample).to(sample)

    return SimpleNamespace(name="const", config={"in_channels": 4}, text_encoder="test-means", text_width=1,
                           forward=unet, device=torch.device("cpu"), dtype=torch.float32, calls=calls)


def unit_noise(batch=2, seed=0):
    return torch.randn(batch, 4, 6, 5, generator=torch.Generator().manual_seed(seed))


def test_sde_k_diffusion_is_x0_over_sigma_plus_z():
    """With the exact posterior the noise handed to a k-diffusion sampler is ε' + x̂0/σ₀."""
    module, encoder = constant_module(), MeanEncoder()
    noise, z = unit_noise(), unit_noise(seed=1)
    out = oms_start(module, encoder, noise, ["dark", "bright"], start=SamplerStart.k_diffusion(SIGMA0), z=z)
    means = torch.tensor([-0.8, 0.6]).reshape(2, 1, 1, 1)
    assert torch.allclose(out, means / SIGMA0 + z, atol=1e-5)
    assert module.calls == [2] and encoder.calls == [["dark", "bright"]]  # CFG 1: no unconditional pass


def test_ddim_keeps_the_seed_noise():
    module, encoder = constant_module(), MeanEncoder()
    noise = unit_noise()
    out = oms_start(module, encoder, noise, "red", start=SamplerStart.k_diffusion(SIGMA0), solver="ddim")
    assert torch.allclose(out, 0.3 / SIGMA0 + noise, atol=1e-5)


def test_cfg_uses_the_negative_prompt_in_one_batched_call():
    module, encoder = constant_module(), MeanEncoder()
    noise, z = unit_noise(), unit_noise(seed=1)
    start = SamplerStart.timestep(0.008155)
    out = oms_start(module, encoder, noise, "dark", start=start, cfg=2.0, negative_prompt="bright", z=z)
    x0_hat = 0.6 + 2.0 * (-0.8 - 0.6)
    expected = math.sqrt(start.alpha_bar0) * x0_hat + math.sqrt(1 - start.alpha_bar0) * z
    assert torch.allclose(out, expected, atol=1e-5)
    assert module.calls == [4]
    assert encoder.calls == [["bright", "bright", "dark", "dark"]]  # negative and positive prompts in one call


def test_sgm_noise_multiplier_hands_over_the_vp_latent():
    module, encoder = constant_module(), MeanEncoder()
    noise, z = unit_noise(), unit_noise(seed=1)
    start = SamplerStart.k_diffusion(SIGMA0, sgm_noise_multiplier=True)
    out = oms_start(module, encoder, noise, "bright", start=start, z=z)
    assert torch.allclose(out, math.sqrt(start.alpha_bar0) * 0.6 + math.sqrt(1 - start.alpha_bar0) * z, atol=1e-6)


def test_batch_equals_images_made_one_by_one():
    seeds = [11, 12, 13]
    noise = torch.stack([unit_noise(1, seed)[0] for seed in seeds])
    z = seeded_z(seeds, noise.shape[1:])
    start = SamplerStart.k_diffusion(SIGMA0)
    prompts = ["dark", "bright", "red"]
    batch = oms_start(constant_module(), MeanEncoder(), noise, prompts, start=start, cfg=1.5, z=z)
    for i, seed in enumerate(seeds):
        single = oms_start(constant_module(), MeanEncoder(), noise[i:i + 1], [prompts[i]], start=start, cfg=1.5,
                           z=seeded_z([seed], noise.shape[1:]))
        assert torch.equal(batch[i:i + 1], single)


def test_seeded_z_is_per_seed_and_not_the_seeds_own_stream():
    a = seeded_z([5, 6], (4, 3, 3))
    assert torch.equal(a[1], seeded_z([6], (4, 3, 3))[0])
    assert not torch.equal(a[0], a[1])
    own = seeded_unit_noise([5], (4, 3, 3))[0]
    assert torch.equal(own, torch.randn((4, 3, 3), generator=torch.Generator().manual_seed(5)))
    assert not torch.allclose(a[0], own)
    assert torch.equal(a[0], torch.randn((4, 3, 3), generator=torch.Generator().manual_seed(5 + Z_SEED_OFFSET)))


@pytest.mark.parametrize("seed, expected", [(0, Z_SEED_OFFSET), (2**32 - 1, 2**32 - 1 + Z_SEED_OFFSET),
                                            (2**64 - 1, Z_SEED_OFFSET - 1), (2**63, 2**63 + Z_SEED_OFFSET)])
def test_z_seed_wraps_into_the_generators_range(seed, expected):
    assert z_seed(seed) == expected
    torch.Generator().manual_seed(z_seed(seed))  # every value is one a generator takes


def test_output_keeps_the_noise_dtype():
    noise = unit_noise().half()
    out = oms_start(constant_module(), MeanEncoder(), noise, "dark", start=SamplerStart.k_diffusion(SIGMA0),
                    z=unit_noise(seed=1))
    assert out.dtype == torch.float16 and out.shape == noise.shape


@pytest.mark.parametrize("kwargs, error, match", [
    ({"cfg": -1.0}, ValueError, "OMS CFG"),
    ({"cfg": float("nan")}, ValueError, "OMS CFG"),
    ({"cfg": "2"}, ValueError, "OMS CFG"),
    ({"solver": "euler"}, ValueError, "solver"),
    ({"z": None}, ValueError, "fresh noise"),
    ({"prompts": ["dark"]}, ValueError, "1 prompts for a batch of 2"),
    ({"negative_prompt": ["", "", ""]}, ValueError, "negative prompts"),
])
def test_bad_options_fail_before_any_work(kwargs, error, match):
    module, encoder = constant_module(), MeanEncoder()
    args = {"prompts": "dark", "z": unit_noise(seed=1), **kwargs}
    prompts = args.pop("prompts")
    with pytest.raises(error, match=match):
        oms_start(module, encoder, unit_noise(), prompts, start=SamplerStart.k_diffusion(SIGMA0), **args)
    assert module.calls == [] and encoder.calls == []


def test_wrong_encoder_or_channels_are_refused():
    module = constant_module()
    other = MeanEncoder()
    other.kind = "openclip-h"
    with pytest.raises(TextEncoderError, match="needs a test-means text encoder"):
        oms_start(module, other, unit_noise(), "dark", start=SamplerStart.k_diffusion(SIGMA0), z=unit_noise())
    sd3_noise = torch.randn(1, 16, 4, 4)
    with pytest.raises(ValueError, match="16"):
        oms_start(module, MeanEncoder(), sd3_noise, "dark", start=SamplerStart.k_diffusion(SIGMA0), z=sd3_noise)


def test_text_width_other_than_the_module_reads_is_refused_before_any_work():
    """A module whose metadata names the right encoder kind but whose network reads another width (a mislabelled
    file) fails with a message, not a shape error deep in the network."""
    module = constant_module()
    module.text_width = 768
    encoder = MeanEncoder()
    with pytest.raises(TextEncoderError, match="768-wide.*gives 1-wide"):
        oms_start(module, encoder, unit_noise(), "dark", start=SamplerStart.k_diffusion(SIGMA0), z=unit_noise())
    assert module.calls == [] and encoder.calls == []
