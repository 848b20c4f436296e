"""The embedded demo: the small world, its models, the sampler, the metrics, and the targets measured on
the SHIPPED weights with a fast configuration."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lib_oms.demo import __main__ as demo_cli
from lib_oms.demo.__main__ import OUTPUT_FILES, main, write_outputs
from lib_oms.demo.base_training import train_base
from lib_oms.demo.denoiser import DemoDenoiser, load_denoiser, save_denoiser, sd_alphas_cumprod
from lib_oms.demo.experiment import DemoConfig, run_experiment
from lib_oms.demo.metrics import is_monotonic, spread_ratio, wasserstein1
from lib_oms.demo.pipeline import DENOISER_FILE, MODELS_DIR, OMS_FOLDER, TEXT_ENCODER_FILE, load_models
from lib_oms.demo.reproduce import train_demo_oms
from lib_oms.demo.sampler import DiscreteEpsDenoiser, sample_euler
from lib_oms.demo.text_encoder import DemoTextEncoder, load_text_encoder, save_text_encoder
from lib_oms.demo.world import LATENT_SHAPE, LATENT_SPACE, decode_latents, draw_batch, encode_latents
from lib_oms.errors import ModuleFileError, TextEncoderError
from lib_oms.module_files import load_module

# W1 needs a few hundred images (128 draws of the data itself are 0.05 from the data's distribution); 8 steps suffice.
FAST = DemoConfig(images=256, steps=8, prompt_seeds=8, oms_cfgs=(1.0, 1.5, 2.0), reference=2000)


@pytest.fixture(scope="module")
def fast_run():
    """One fast demo run on the shipped weights, shared by the target checks."""
    return run_experiment(load_models(MODELS_DIR), FAST)


# ------------------------------------------------------------------------------------------------------------------
# The targets, on the shipped weights


def test_without_oms_generation_keeps_at_most_half_the_brightness_spread(fast_run):
    assert fast_run.metrics["without_oms"]["spread_ratio"] <= 0.5


def test_with_oms_w1_falls_threefold_and_the_spread_comes_back(fast_run):
    metrics = fast_run.metrics
    assert metrics["w1_improvement"] >= 3.0, (metrics["without_oms"]["w1"], metrics["with_oms"]["w1"])
    assert metrics["with_oms"]["spread_ratio"] >= 0.8


def test_dark_and_bright_prompts_reach_their_data_brightness_with_oms(fast_run):
    for prompt in ("dark", "bright"):
        row = fast_run.metrics["prompt_control"][prompt]
        assert row["with_oms_error"] <= 0.15, (prompt, row)
        assert row["with_oms_error"] < row["without_oms_error"], (prompt, row)


def test_brightness_moves_monotonically_with_oms_cfg(fast_run):
    sweep = fast_run.metrics["oms_cfg_sweep"]
    assert sweep["oms_cfg"] == [1.0, 1.5, 2.0] and sweep["monotonic"]
    assert sweep["mean_brightness"][-1] < sweep["mean_brightness"][0]  # "dark" gets darker


def test_every_target_is_reported_as_met(fast_run):
    assert all(target["met"] for target in fast_run.metrics["targets"].values()), fast_run.metrics["targets"]


def test_outputs_are_written_and_other_files_are_left_alone(fast_run, tmp_path):
    (tmp_path / "my_notes.txt").write_text("keep me")
    paths = write_outputs(fast_run, tmp_path)
    assert [p.name for p in paths] == list(OUTPUT_FILES)
    assert (tmp_path / "my_notes.txt").read_text() == "keep me"
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 3 * 96 and grid.height > 3 * 96
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"data", "without_oms", "with_oms", "prompt_control", "oms_cfg_sweep", "targets"}


# ------------------------------------------------------------------------------------------------------------------
# The shipped weights


def test_shipped_weights_are_small_safetensors_made_for_the_demo_space():
    files = [p for p in MODELS_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and all(p.suffix in (".safetensors", ".json") for p in files), files
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    module = load_module(MODELS_DIR / OMS_FOLDER)
    assert (module.latent_space, module.text_encoder) == (LATENT_SPACE, "demo-words")
    assert module.config["block_out_channels"] == [32, 64, 64]  # the paper's OMS-S
    assert module.config["in_channels"] == LATENT_SHAPE[0]
    encoder = load_text_encoder(MODELS_DIR / TEXT_ENCODER_FILE)
    assert encoder.width == module.config["cross_attention_dim"]
    assert isinstance(load_denoiser(MODELS_DIR / DENOISER_FILE), DemoDenoiser)


@pytest.mark.parametrize("argv, option", [
    (["--steps", "0"], "--steps"), (["--images", "0"], "--images"), (["--prompt-seeds", "0"], "--prompt-seeds"),
    (["--threads", "0"], "--threads"), (["--steps", "-2"], "--steps"), (["--images", "many"], "--images"),
    (["--cfg", "nan"], "--cfg"), (["--cfg", "inf"], "--cfg"), (["--cfg", "strong"], "--cfg"),
    (["--out", "/proc/no-such-folder/demo"], "--out"),
])
def test_demo_refuses_bad_values_before_any_work(monkeypatch, capsys, argv, option):
    monkeypatch.setattr(demo_cli, "load_models", lambda *a: pytest.fail("the demo started working"))
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_demo_refuses_an_out_that_is_a_file(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo_cli, "load_models", lambda *a: pytest.fail("the demo started working"))
    a_file = tmp_path / "grid.png"
    a_file.write_bytes(b"x")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(a_file)])
    assert exit_.value.code == 2 and "is a file" in capsys.readouterr().err


def test_demo_help_gives_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", text.split("options:")[1])[1:]
    options = [block.split()[0].rstrip(",") for block in blocks]
    assert options == ["-h", "--out", "--models", "--images", "--steps", "--cfg", "--prompt-seeds", "--seed",
                       "--threads"]
    assert all("(default: " in " ".join(block.split()) for block in blocks[1:]), blocks


def test_demo_command_line_writes_its_outputs(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--images", "6", "--steps", "3", "--prompt-seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "with OMS" in printed and "targets:" in printed
    assert all((tmp_path / name).is_file() for name in OUTPUT_FILES)


# ------------------------------------------------------------------------------------------------------------------
# The world, the models and the sampler


def test_world_is_seeded_and_spans_near_black_to_near_white():
    first, again = draw_batch(400, seed=3), draw_batch(400, seed=3)
    assert np.array_equal(first.images, again.images) and first.captions == again.captions
    assert first.images.shape == (400, 3, 32, 32) and first.images.min() >= -1 and first.images.max() <= 1
    assert first.brightness.min() < -0.8 and first.brightness.max() > 0.8
    dark = [b for b, c in zip(first.brightness, first.captions, strict=True) if "dark" in c.split()]
    bright = [b for b, c in zip(first.brightness, first.captions, strict=True) if "bright" in c.split()]
    assert max(dark) < 0 < min(bright)


def test_latents_are_an_orthonormal_lossless_transform():
    images = torch.from_numpy(draw_batch(3, seed=1).images)
    latents = encode_latents(images)
    assert latents.shape == (3, *LATENT_SHAPE)
    assert torch.allclose(decode_latents(latents), images, atol=1e-5)
    # the first three channels are each 4×4 cell's mean colour × 4; the image's brightness is kept exactly
    cell_means = torch.nn.functional.avg_pool2d(images, 4)
    assert torch.allclose(latents[:, :3], 4 * cell_means, atol=1e-5)
    # orthonormal: unit Gaussian noise stays unit Gaussian, so the leak and the noise are those of pixel space
    noise = torch.randn(64, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(encode_latents(decode_latents(noise)), noise, atol=1e-5)
    assert float(decode_latents(noise).std()) == pytest.approx(1.0, abs=0.02)


def test_sd_schedule():
    alphas_cumprod = sd_alphas_cumprod()
    assert float(alphas_cumprod[999]) == pytest.approx(0.0046601, abs=5e-8)
    sigmas = DiscreteEpsDenoiser(lambda x, t, c: x).get_sigmas(20)
    assert float(sigmas[0]) == pytest.approx(14.6146, abs=1e-4) and float(sigmas[-1]) == 0.0


def test_sigma_and_timestep_round_trip():
    wrapper = DiscreteEpsDenoiser(lambda x, t, c: x)
    t = torch.tensor([0.0, 10.5, 500.25, 999.0], dtype=torch.float64)
    assert torch.allclose(wrapper.sigma_to_t(wrapper.t_to_sigma(t)), t, atol=1e-6)


def test_euler_sampler_lands_on_a_perfect_denoisers_target():
    target = torch.full((2, *LATENT_SHAPE), 0.3)

    def perfect_eps(x_vp, t, context):  # ε̂ such that D(x, σ) = target for every σ
        sigma = DiscreteEpsDenoiser(lambda *a: None).t_to_sigma(t.double()).float()[:, None, None, None]
        return (x_vp * (sigma**2 + 1).sqrt() - target) / sigma

    wrapper = DiscreteEpsDenoiser(perfect_eps)
    out = sample_euler(wrapper, torch.randn(2, *LATENT_SHAPE), wrapper.get_sigmas(5), torch.zeros(2, 1, 1))
    assert torch.allclose(out, target, atol=1e-4)


def test_text_encoder_follows_the_protocol_and_round_trips(tmp_path):
    encoder = DemoTextEncoder()
    states = encoder.encode(["a dark blue square on a black background", "zebra", ""])
    assert states.shape == (3, encoder.max_length, encoder.width) and encoder.kind == "demo-words"
    assert torch.equal(encoder.tokenize(["zebra"])[0, :2], torch.tensor([1, 0]))  # unknown word, then padding
    save_text_encoder(encoder, tmp_path / "te.safetensors")
    again = load_text_encoder(tmp_path / "te.safetensors")
    assert torch.equal(again.encode(["dark"]), encoder.encode(["dark"]))
    with pytest.raises(TextEncoderError, match="reproduce"):
        load_text_encoder(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(TextEncoderError):
        load_text_encoder(tmp_path / "bad.safetensors")


def test_denoiser_round_trips_in_fp16(tmp_path):
    torch.manual_seed(0)
    model = DemoDenoiser().eval()
    save_denoiser(model, tmp_path / "d.safetensors")
    again = load_denoiser(tmp_path / "d.safetensors")
    x, t, context = torch.randn(2, *LATENT_SHAPE), torch.tensor([999.0, 10.0]), torch.randn(2, 16, 64)
    with torch.no_grad():
        assert torch.allclose(model(x, t, context), again(x, t, context), atol=2e-2)
    with pytest.raises(ModuleFileError):
        load_denoiser(tmp_path / "nothing.safetensors")


def test_reproduce_pieces_run_in_miniature(tmp_path):
    encoder, model, losses = train_base(2, batch_size=4, progress=False)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    save_text_encoder(encoder, tmp_path / TEXT_ENCODER_FILE)
    result = train_demo_oms(load_text_encoder(tmp_path / TEXT_ENCODER_FILE), tmp_path, steps=2, batch_size=4,
                            images=8, progress=False)
    module = load_module(result.module_path)
    assert module.latent_space == LATENT_SPACE and module.name == OMS_FOLDER


def test_metrics():
    data = np.linspace(-1, 1, 101)
    assert wasserstein1(data, data + 0.25) == pytest.approx(0.25)
    assert wasserstein1(np.zeros(3), np.ones(7)) == pytest.approx(1.0)
    assert spread_ratio(0.5 * data, data) == pytest.approx(0.5)
    assert is_monotonic([0.1, -0.2, -0.5]) and not is_monotonic([0.1, -0.2, -0.1])
