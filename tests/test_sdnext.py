"""The WebUI script in SD.Next (tests/sdnext_fakes.py, with a real tiny diffusers pipeline): the start it hands SD.Next
as p.init_latent, what it leaves alone and why, and no image when OMS fails."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_oms_files import MODULE, tiny_encoder_loader, write_oms_folder

pytest.importorskip("diffusers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from lib_oms import text_encoders  # noqa: E402
from lib_oms.engine import z_seed  # noqa: E402
from lib_oms.module_files import load_module  # noqa: E402
from tests import diffusers_pipelines as tiny  # noqa: E402
from tests import sdnext_fakes  # noqa: E402

ON = [True, "Automatic", "", "", 1.0, "SDE"]
OFF = [False, "Automatic", "", "", 1.0, "SDE"]
PROMPT = "a black cat in a dark room"
SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny.sd_pipeline(tmp_path_factory.mktemp("sd"), tiny.scheduler("Euler"))


@pytest.fixture
def models(tmp_path):
    write_oms_folder(tmp_path / "oms")
    return tmp_path


@pytest.fixture
def sdnext(monkeypatch, models):
    monkeypatch.setattr(text_encoders, "load_openclip_text_encoder", tiny_encoder_loader())
    return sdnext_fakes.install(monkeypatch, models, opts={"oms_auto_download": False})


def txt2img(pipe, seeds=(5,), **kwargs):
    pipe.scheduler = pipe.default_scheduler if hasattr(pipe, "default_scheduler") else pipe.scheduler
    return sdnext_fakes.Processing(sd_model=pipe, prompts=[PROMPT] * len(seeds), seeds=list(seeds),
                                   subseeds=[s + 100 for s in seeds], **kwargs)


def expected_start(models, pipe, seeds, unit=None, solver="SDE") -> torch.Tensor:
    """√ᾱ₀·x̂0 + √(1 − ᾱ₀)·z at the first step of SD.Next's scheduler for this run, made here from the files."""
    if unit is None:
        unit = torch.cat([randn_tensor(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = sdnext_fakes.create_random_tensors(SHAPE[1:], seeds=[z_seed(s) for s in seeds])
    encoder = tiny_encoder_loader()(models / "oms" / "text_encoder")
    with torch.no_grad():
        x0_hat = -load_module(models / "oms" / MODULE).forward(unit, encoder.encode([PROMPT] * len(seeds)))
    scheduler = pipe.scheduler  # as SD.Next set it up for the run just made
    sigmas = getattr(scheduler, "sigmas", None)
    alpha_bar0 = 1.0 / (1.0 + float(sigmas[0]) ** 2) if sigmas is not None else \
        float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])])
    return math.sqrt(alpha_bar0) * x0_hat + math.sqrt(1 - alpha_bar0) * (z if solver == "SDE" else unit)


def test_the_script_knows_it_runs_in_sdnext(sdnext):
    assert sdnext.script_module.HOOK == "p.init_latent"


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DDIM"])
def test_the_first_pass_starts_at_the_oms_latent_with_its_infotext(sdnext, pipe, models, sampler):
    p = txt2img(pipe, sampler_name=sampler)
    _out, first = sdnext.run(p, ON)
    assert sdnext.errors == [] and p.init_latent is not None
    assert torch.allclose(first, expected_start(models, pipe, [5]), atol=1e-5)
    params = p.extra_generation_params
    assert params["OMS"] is True and params["OMS module"].startswith(f"{MODULE} [") and params["OMS solver"] == "SDE"


def test_oms_off_is_the_generation_without_the_extension(sdnext, pipe):
    p = txt2img(pipe)
    out, _first = sdnext.run(p, OFF)
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(5), num_inference_steps=3, height=16, width=16,
                 guidance_scale=1.0, output_type="latent").images
    assert torch.equal(out, plain) and p.init_latent is None and p.extra_generation_params == {}


def test_a_batch_equals_the_images_made_one_by_one(sdnext, pipe):
    batch, _ = sdnext.run(txt2img(pipe, seeds=(5, 6)), ON)
    singles = torch.cat([sdnext.run(txt2img(pipe, seeds=(seed,)), ON)[0] for seed in (5, 6)])
    assert (batch - singles).abs().max().item() < 1e-4


def test_a_variation_seed_starts_from_the_init_latents_scripts_draw(sdnext, pipe, models):
    p = txt2img(pipe, subseed_strength=0.5)
    _out, first = sdnext.run(p, [True, "Automatic", "", "", 1.0, "DDIM"])
    variation = sdnext_fakes.create_random_tensors(SHAPE[1:], seeds=[5], subseeds=[105], subseed_strength=0.5)
    expected = expected_start(models, pipe, [5], unit=variation, solver="DDIM")
    assert torch.allclose(first, expected, atol=1e-5)


def test_a_second_batch_draws_its_own_noise_not_the_first_batchs_start(sdnext, pipe):
    p = txt2img(pipe)
    ddim = [True, "Automatic", "", "", 1.0, "DDIM"]
    sdnext.run(p, ddim)
    first_batch = p.init_latent
    p.seeds, p.subseeds = [7], [107]
    sdnext.script_module.OneMoreStepScript().process_batch(p, *ddim)
    alone = txt2img(pipe, seeds=(7,))
    sdnext.run(alone, ddim)
    assert p.init_latent is not first_batch and torch.allclose(p.init_latent, alone.init_latent, atol=1e-6)


def test_img2img_is_skipped_saying_why_even_right_after_a_txt2img(sdnext, pipe):
    """The pipeline's task still says text-to-image (the last generation's) when the scripts' process() runs."""
    sdnext.modules["processing_helpers"].task = "txt2img"
    p = sdnext_fakes.Img2ImgProcessing(sd_model=pipe, prompts=["a dark alley"], seeds=[3], subseeds=[3])
    sdnext.run(p, ON)
    assert "only to text-to-image pipelines" in p.extra_generation_params["OMS skipped"] and p.init_latent is None


def test_txt2img_right_after_an_img2img_applies(sdnext, pipe):
    sdnext.modules["processing_helpers"].task = "img2img"
    p = txt2img(pipe)
    sdnext.run(p, ON)
    assert "OMS skipped" not in p.extra_generation_params and p.init_latent is not None


def test_a_zero_terminal_snr_schedule_is_skipped_and_the_image_is_the_one_without_oms(sdnext, tmp_path):
    pipe = tiny.sd_pipeline(tmp_path, tiny.scheduler("Euler", rescale_betas_zero_snr=True))
    p = txt2img(pipe)
    out, _ = sdnext.run(p, ON)
    assert "zero-terminal-SNR" in p.extra_generation_params["OMS skipped"] and p.init_latent is None
    assert torch.equal(out, sdnext.run(txt2img(pipe), OFF)[0])


def test_an_error_makes_no_image_and_says_why(sdnext, pipe, models):
    import shutil

    shutil.rmtree(models / "oms" / MODULE)
    shutil.rmtree(models / "oms" / "oms_tiny_xl")
    p = txt2img(pipe)
    out, replaced = sdnext.run(p, ON)
    assert out is None and replaced.images == []
    assert "no OMS module for this checkpoint's latent space (sd)" in replaced.info
    assert "Not downloaded: downloading is off" in replaced.info


def test_the_oms_axes_join_sdnexts_xyz_grid(sdnext, pipe, monkeypatch, models):
    """SD.Next's X/Y/Z grid reads its axes from scripts.xyz.xyz_grid_classes (AxisOption without ``prepare``)."""
    import types

    class AxisOption:
        def __init__(self, label, tipe, apply, fmt=None, confirm=None, cost=0.0, choices=None):
            self.label, self.type, self.apply, self.confirm, self.cost, self.choices = (
                label, tipe, apply, confirm, cost, choices)

    classes = types.ModuleType("scripts.xyz.xyz_grid_classes")
    classes.AxisOption, classes.axis_options = AxisOption, [AxisOption("Seed", int, None)]
    monkeypatch.setitem(__import__("sys").modules, "scripts.xyz.xyz_grid_classes", classes)
    sdnext.script_module.xyz.register_axes()
    axes = {axis.label: axis for axis in classes.axis_options}
    assert {"[OMS] Enabled", "[OMS] CFG", "[OMS] Solver", "[OMS] Module", "[OMS] Prompt"} <= set(axes)
    assert axes["[OMS] Solver"].choices() == ["SDE", "DDIM"]
    p = txt2img(pipe)
    axes["[OMS] CFG"].apply(p, 1.5, [1.5])
    sdnext.run(p, OFF)  # a cell of an OMS axis turns OMS on
    assert p.extra_generation_params["OMS CFG"] == 1.5 and p.init_latent is not None


def test_the_oms_prompt_keeps_its_words_with_sdnexts_parser(sdnext, monkeypatch):
    """SD.Next's parse_prompt_attention strips the spaces around chunks: these are its answers (058a7f0). The words
    must not run together."""
    from oms_webui.generation import clean_prompt

    sdnext_chunks = {
        "a (bright:1.3) white ((snowfield))": [["a", 1.0], ["bright", 1.3], ["white", 1.0], ["snowfield", 1.21]],
        "a bright BREAK white snowfield": [["a bright", 1.0], ["BREAK", -1], ["white snowfield", 1.0]],
    }
    monkeypatch.setattr(sdnext.modules["prompt_parser"], "parse_prompt_attention", sdnext_chunks.__getitem__)
    for prompt in sdnext_chunks:
        assert clean_prompt(prompt, 2) == "a bright white snowfield"
