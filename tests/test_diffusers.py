"""The diffusers glue against the installed diffusers, for real: tiny random-weight SD 1.x and SDXL pipelines
(tests/diffusers_pipelines.py), every scheduler they are used with and every timestep spacing, both prediction types.
The UNet's first input must be the OMS start; a skip must leave the pipeline's own image."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_oms_files import MODULE, SDXL_MODULE, tiny_encoder_loader, write_oms_folder

pytest.importorskip("diffusers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from lib_oms import text_encoders  # noqa: E402
from lib_oms.engine import z_seed  # noqa: E402
from lib_oms.module_files import load_module  # noqa: E402
from oms_diffusers import OneMoreStep  # noqa: E402
from oms_diffusers.reading import scheduler_start  # noqa: E402
from tests import diffusers_pipelines as tiny  # noqa: E402
from tests.diffusers_pipelines import SCHEDULERS, SPACINGS, FirstInput, scheduler  # noqa: E402
from tests.factories import TowerSpec, random_state_dict, tiny_unet_config, write_released_folder  # noqa: E402

PROMPT = "a black cat in a dark room"
SIZE = 16  # pixels: 8×8 latents
STEPS = 3
NEEDS = {"LMS": "scipy", "DPM++ SDE": "torchsde"}


@pytest.fixture(scope="module")
def oms(tmp_path_factory):
    return write_oms_folder(tmp_path_factory.mktemp("oms") / "oms")


@pytest.fixture(autouse=True)
def tiny_text_encoder(monkeypatch):
    monkeypatch.setattr(text_encoders, "load_openclip_text_encoder", tiny_encoder_loader())


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny.sd_pipeline(tmp_path_factory.mktemp("sd"), scheduler("Euler"))


def needs(name: str) -> None:
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"diffusers' {name} scheduler needs {NEEDS[name]}")


def generated(pipe, start=None, *, generator=None, prompt=PROMPT, **kwargs):
    """The final latents of a pipeline call (and its UNet's first input), started from ``start`` or its own draw; the
    generator is the one ``start`` drew from (it goes on to draw what the scheduler draws), else seed 5's."""
    first = FirstInput(pipe.unet)
    try:
        out = pipe(prompt, generator=generator or torch.Generator().manual_seed(5), num_inference_steps=STEPS,
                   height=SIZE,
                   width=SIZE, guidance_scale=1.0, output_type="latent",
                   latents=None if start is None else start.latents, **kwargs).images
    finally:
        first.handle.remove()
    return out, first.sample


def first_alpha_bar(pipe) -> float:
    """ᾱ at the first step of the pipeline's scheduler, as it was set for the call just made."""
    sched = pipe.scheduler
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is not None and len(sigmas):
        return 1.0 / (1.0 + float(sigmas[0]) ** 2)
    return float(sched.alphas_cumprod[int(sched.timesteps[0])])


def expected_start(oms, pipe, seeds, prompts, module=MODULE, solver="SDE") -> torch.Tensor:
    """√ᾱ₀·x̂0 + √(1 − ᾱ₀)·z (or the drawn noise for DDIM), made here from the files and the seeds."""
    shape = (1, 4, SIZE // 2, SIZE // 2)
    unit = torch.cat([randn_tensor(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = torch.cat([randn_tensor(shape, generator=torch.Generator().manual_seed(z_seed(s))) for s in seeds])
    encoder = tiny_encoder_loader()(oms / "text_encoder")
    with torch.no_grad():
        x0_hat = -load_module(oms / module).forward(unit, encoder.encode(prompts))
    alpha_bar0 = first_alpha_bar(pipe)
    return math.sqrt(alpha_bar0) * x0_hat + math.sqrt(1 - alpha_bar0) * (z if solver == "SDE" else unit)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_the_unets_first_input_is_the_oms_start(oms, sd, name, spacing, prediction_type):
    needs(name)
    sd.scheduler = scheduler(name, spacing, prediction_type)
    start = OneMoreStep(models_dir=oms, download=False).start(
        sd, PROMPT, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS, height=SIZE, width=SIZE)
    assert start.skipped is None and start.module.startswith(f"{MODULE} [")
    _, first = generated(sd, start)
    expected = expected_start(oms, sd, [5], [PROMPT])
    assert (first - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


def test_the_ddim_solver_keeps_the_noise_the_pipeline_draws(oms, sd):
    sd.scheduler = scheduler("DPM++ 2M")
    generator = torch.Generator().manual_seed(5)
    start = OneMoreStep(models_dir=oms, download=False).start(sd, PROMPT, generator=generator, solver="DDIM",
                                                              num_inference_steps=STEPS, height=SIZE, width=SIZE)
    plain = torch.Generator().manual_seed(5)
    randn_tensor((1, 4, 8, 8), generator=plain)
    assert torch.equal(generator.get_state(), plain.get_state())  # drawn as the pipeline draws: its stream goes on
    _, first = generated(sd, start)
    assert torch.allclose(first, expected_start(oms, sd, [5], [PROMPT], solver="DDIM"), atol=1e-5)


def test_a_batch_of_generators_equals_the_images_made_one_by_one(oms, sd):
    sd.scheduler = scheduler("Euler a")
    oms_step = OneMoreStep(models_dir=oms, download=False)
    prompts = ["a black cat in a dark room", "a white room at noon"]

    def made(seeds, prompt):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        start = oms_step.start(sd, prompt, generator=generators, num_inference_steps=STEPS, height=SIZE, width=SIZE)
        return sd(prompt, generator=generators, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                  guidance_scale=1.0, output_type="latent", latents=start.latents).images

    batch = made([5, 6], prompts)
    singles = torch.cat([made([5], [prompts[0]]), made([6], [prompts[1]])])
    assert (batch - singles).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["DDIM", "Euler a", "DPM++ 2M"])
def test_a_zero_terminal_snr_schedule_is_skipped_and_the_image_is_the_pipelines_own(oms, sd, name):
    sd.scheduler = scheduler(name, "trailing", "v_prediction", rescale_betas_zero_snr=True)
    generator = torch.Generator().manual_seed(5)
    start = OneMoreStep(models_dir=oms, download=False).start(
        sd, PROMPT, generator=generator, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    assert "zero-terminal-SNR" in start.skipped and start.module is None
    assert torch.equal(generated(sd, start, generator=generator)[0], generated(sd)[0])  # the image without OMS


def test_a_scheduler_without_sds_schedule_or_another_latent_space_is_skipped(oms, sd, tmp_path):
    import diffusers

    flow = getattr(diffusers, "FlowMatchEulerDiscreteScheduler", None) or diffusers.EDMEulerScheduler
    assert "has no discrete-time VP schedule" in scheduler_start(flow(), STEPS)
    other = tiny.sd_pipeline(tmp_path, scheduler("Euler a"), vae_config={"latents_mean": [0.0] * 4,
                                                                        "latents_std": [1.0] * 4})
    generator = torch.Generator().manual_seed(5)
    start = OneMoreStep(models_dir=oms, download=False).start(other, PROMPT, generator=generator,
                                                              num_inference_steps=STEPS, height=SIZE, width=SIZE)
    assert "latent statistics of its own" in start.skipped
    assert torch.equal(generated(other, start, generator=generator)[0], generated(other)[0])


def test_an_inpainting_starts_at_the_oms_latent_inside_the_mask_only(oms, tmp_path):
    from PIL import Image

    pipe = tiny.sd_pipeline(tmp_path, scheduler("Euler"), inpainting=True)
    image = Image.new("RGB", (SIZE, SIZE), (40, 40, 40))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # the left half is inpainted: the noise of the right half stays
    start = OneMoreStep(models_dir=oms, download=False).start(
        pipe, PROMPT, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS, height=SIZE, width=SIZE,
        mask_image=mask)
    _, first = generated(pipe, start, image=image, mask_image=mask, strength=1.0)
    expected = expected_start(oms, pipe, [5], [PROMPT])
    assert torch.allclose(first[..., :4], expected[..., :4], atol=1e-5)  # latent columns 0-3: the mask
    drawn = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    at = scheduler_start(pipe.scheduler, STEPS)
    assert torch.allclose(first[..., 4:], drawn[..., 4:] * at.input_scale * at.init_noise_sigma, atol=1e-6)


def test_sdxl_starts_at_the_oms_latent_of_its_own_module(oms, tmp_path):
    pipe = tiny.sdxl_pipeline(tmp_path, scheduler("Euler", "trailing"))
    start = OneMoreStep(models_dir=oms, download=False).start(
        pipe, PROMPT, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS, height=SIZE, width=SIZE)
    assert start.module.startswith(f"{SDXL_MODULE} [")
    _, first = generated(pipe, start)
    assert torch.allclose(first, expected_start(oms, pipe, [5], [PROMPT], module=SDXL_MODULE), atol=1e-5)


TINY_L = TowerSpec("tiny CLIP-L", width=32, layers=2, heads=4, intermediate=37, hidden_act="quick_gelu")
TINY_G = TowerSpec("tiny bigG", width=32, layers=2, heads=4, intermediate=37, hidden_act="gelu")


def test_an_sdxl_mixclip_module_reads_the_pipelines_own_text_encoders(tmp_path, monkeypatch):
    read = []
    real = text_encoders.load_mixclip_text_encoder
    monkeypatch.setattr(text_encoders, "load_mixclip_text_encoder", lambda source, **kwargs: read.append(
        sorted(source)) or real(source, specs=(TINY_L, TINY_G), **kwargs))
    config = tiny_unet_config(cross_attention_dim=TINY_L.width + TINY_G.width)
    write_released_folder(tmp_path / "oms", "oms_tiny_mixclip_xl", config, random_state_dict(config, seed=7),
                          latent_space="sdxl", text_encoder="sdxl-mixclip")
    pipe = tiny.sdxl_pipeline(tmp_path, scheduler("Euler"))
    start = OneMoreStep(models_dir=tmp_path / "oms", download=False).start(
        pipe, PROMPT, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS, height=SIZE, width=SIZE)
    assert start.skipped is None and start.module.startswith("oms_tiny_mixclip_xl [")
    (names,) = read
    assert {name.split(".")[0] for name in names} == {"text_encoder", "text_encoder_2"}  # both of the pipeline's own


@pytest.mark.parametrize("kwargs, words", [
    ({"cfg": 11}, "OMS CFG must be a number from 0 to 10"),
    ({"solver": "euler"}, "OMS solver must be one of SDE, DDIM"),
    ({"oms_prompt": ["one", "two"]}, "got 2 oms_prompts for 1 prompts"),
])
def test_bad_options_are_refused_before_any_draw(oms, sd, kwargs, words):
    generator = torch.Generator().manual_seed(5)
    before = generator.get_state()
    with pytest.raises(ValueError, match=words):
        OneMoreStep(models_dir=oms, download=False).start(sd, PROMPT, generator=generator, **kwargs)
    assert torch.equal(generator.get_state(), before)


def test_a_missing_module_is_an_error_that_says_what_to_do(sd, tmp_path):
    from lib_oms.errors import ModuleMissingError

    sd.scheduler = scheduler("Euler")
    with pytest.raises(ModuleMissingError, match="Not downloaded: downloading is off \\(download=False\\)"):
        OneMoreStep(models_dir=tmp_path / "empty", download=False).start(
            sd, PROMPT, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS)
