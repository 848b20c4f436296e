"""Plain-value decisions of the WebUI glue: skip rules, sampler starts, prompts, module and text-encoder choice."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lib_oms.catalog import OPENCLIP_H, SDXL_MIXCLIP
from lib_oms.errors import ModuleFileError, ModuleMissingError, TextEncoderError, TextEncoderMissingError
from lib_oms.sources import (
    EncoderSource,
    choose_module,
    huggingface_hub_dir,
    module_dtype,
    resolve_text_encoder,
    sd2_checkpoints,
)
from lib_oms.step import K_DIFFUSION as STEP_K_DIFFUSION
from lib_oms.step import SamplerStart, inpaint_noise, skip_reason, to_sampler_noise
from oms_webui.logic import (
    INPAINT_FILL_LATENT_NOISE,
    INPAINT_FILL_LATENT_NOTHING,
    K_DIFFUSION,
    TIMESTEP,
    Job,
    img2img_start,
    job_skip_reason,
    model_skip_reason,
    offload_after_use,
    txt2img_start,
    untouched_passes,
    unwrap_hijacked_keys,
    uses_refiner,
)
from tests.factories import TEST_WORDS, text_tower_shapes, write_sparse_checkpoint


def sd_alphas_cumprod() -> torch.Tensor:
    """SD1/SD2/SDXL: scaled-linear betas 0.00085 → 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def ddim_timesteps(steps: int) -> torch.Tensor:
    """CompVisSampler.get_timesteps."""
    return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)


# ---------------------------------------------------------------------------------------------------------------
# Where OMS applies

def test_model_skip_reasons():
    assert model_skip_reason("sd1", 4) is None and model_skip_reason("sd2", 4) is None
    assert model_skip_reason("sdxl", 4) is None
    assert "refiner" in model_skip_reason("sdxl-refiner", 4)
    assert "sd3" in model_skip_reason("sd3", 16)
    assert "latent space" in model_skip_reason("KModel", 16)
    assert "16 channels" in model_skip_reason("sd1", 16)


INPAINT = dict(mode="img2img", inpainting=True, inpainting_fill=INPAINT_FILL_LATENT_NOTHING, denoising_strength=1.0)


@pytest.mark.parametrize("job, applies", [
    (Job("txt2img"), True),
    (Job("txt2img", hires=True, refiner=True), True),
    (Job("txt2img", firstpass_image=True), False),
    (Job("txt2img", noise_schedule="Zero Terminal SNR"), False),
    (Job("txt2img", checkpoint_zero_terminal_snr=True), False),
    (Job(**{**INPAINT, "checkpoint_zero_terminal_snr": True}), False),
    (Job(**INPAINT), True),
    (Job(**{**INPAINT, "inpainting_fill": INPAINT_FILL_LATENT_NOISE}), True),
    (Job(**{**INPAINT, "inpainting_fill": 1}), False),
    (Job(**{**INPAINT, "inpainting_fill": 0}), False),
    (Job(**{**INPAINT, "denoising_strength": 0.99}), False),
    (Job(**{**INPAINT, "inpainting": False}), False),
    (Job(**{**INPAINT, "initial_noise_multiplier": 1.05}), False),
    (Job(**{**INPAINT, "extra_noise": 0.1}), False),
])
def test_job_skip_rules(job, applies):
    reason = job_skip_reason(job)
    assert (reason is None) == applies
    assert reason is None or len(reason) > 20  # a reason a user can act on


def test_untouched_passes_are_named():
    assert untouched_passes(Job("txt2img", hires=True, refiner=True)) == ["hires fix second pass", "refiner"]
    assert untouched_passes(Job("txt2img")) == []


# ---------------------------------------------------------------------------------------------------------------
# Sampler starts

@pytest.mark.parametrize("sigma0", [14.614642, 11.03, 10.0, 4518.76])  # default, "DDIM" scheduler, sigma max, ZTSNR
@pytest.mark.parametrize("sgm", [False, True])
def test_k_diffusion_start_reads_the_first_sigma(sigma0, sgm):
    start = txt2img_start(K_DIFFUSION, "sample_euler", sigmas=torch.tensor([sigma0, 1.0, 0.0]),
                          sgm_noise_multiplier=sgm)
    assert start == SamplerStart.k_diffusion(float(torch.tensor(sigma0)), sgm)
    assert math.isclose(start.alpha_bar0, 1 / (1 + sigma0**2), rel_tol=1e-6)
    assert (skip_reason(start) is not None) == (sigma0 > 1000)


@pytest.mark.parametrize("steps, t_first", [(4, 751), (10, 901), (20, 951), (30, 991), (50, 981)])
def test_ddim_and_plms_start_at_their_first_timestep(steps, t_first):
    alphas = sd_alphas_cumprod()
    for name in ("ddim", "ddim_cfgpp", "plms"):
        start = txt2img_start(TIMESTEP, name, timesteps=ddim_timesteps(steps), alphas_cumprod=alphas)
        assert start.family == "timestep" and start.alpha_bar0 == pytest.approx(float(alphas[t_first]))


def test_unipc_starts_at_999():
    alphas = sd_alphas_cumprod()
    start = txt2img_start(TIMESTEP, "unipc", timesteps=ddim_timesteps(20), alphas_cumprod=alphas)
    assert start.alpha_bar0 == pytest.approx(float(alphas[999])) == pytest.approx(0.0046601, rel=1e-4)


def test_unknown_sampler_kind():
    with pytest.raises(ValueError):
        txt2img_start("flow", "x")


def test_img2img_start_is_the_noising_level():
    sigmas = torch.tensor([14.6, 7.0, 3.0, 0.0])
    assert img2img_start(K_DIFFUSION, steps=3, t_enc=2, sigmas=sigmas) == SamplerStart.k_diffusion(float(sigmas[0]))
    alphas = sd_alphas_cumprod()
    start = img2img_start(TIMESTEP, steps=20, t_enc=19, timesteps=ddim_timesteps(20), alphas_cumprod=alphas)
    assert start.family == STEP_K_DIFFUSION and not start.sgm_noise_multiplier
    assert start.alpha_bar0 == pytest.approx(float(alphas[951]))


@pytest.mark.parametrize("fill", ["latent nothing", "latent noise"])
def test_inpaint_noise_starts_the_mask_at_the_oms_latent(fill):
    generator = torch.Generator().manual_seed(0)
    noise, x_ve, image = (torch.randn(2, 4, 6, 6, generator=generator) for _ in range(3))
    nmask = torch.zeros(4, 6, 6)
    nmask[:, 1:4, 2:5] = 1
    inside = nmask.bool().expand(2, -1, -1, -1)
    fill_value = torch.zeros_like(image) if fill == "latent nothing" else torch.randn(2, 4, 6, 6, generator=generator)
    init = image * (1 - nmask) + fill_value * nmask  # what the WebUI's img2img init() makes
    start = SamplerStart.k_diffusion(14.6)
    oms_noise = to_sampler_noise(x_ve / math.sqrt(1 + 14.6**2), start)  # x_VE / σ₀
    out = inpaint_noise(oms_noise, noise, init, nmask, start.sigma0)
    started = init + start.sigma0 * out  # k-diffusion sample_img2img: xi = x + noise·σ₀
    assert torch.allclose(started[inside], x_ve[inside], atol=1e-4)
    assert torch.equal(out[~inside], noise[~inside])


# ---------------------------------------------------------------------------------------------------------------
# Modules and text encoders

def entries(*specs):
    return [SimpleNamespace(name=name, path=Path(name), space=space) for name, space in specs]


def test_choose_module():
    found = entries(("oms_xl", "sdxl"), ("oms_sd_a", "sd"), ("oms_sd_b", "sd"))
    space = lambda e: e.space  # noqa: E731
    choose = lambda *args: choose_module(*args, words=TEST_WORDS)  # noqa: E731
    assert choose("Automatic", found, "sd", "Automatic", space, []).name == "oms_sd_a"
    assert choose("Automatic", found, "sd", "oms_sd_b", space, []).name == "oms_sd_b"
    assert choose("Automatic", found, "sd", "oms_xl", space, []).name == "oms_sd_a"  # wrong-space default
    assert choose("oms_xl", found, "sd", "Automatic", space, []).name == "oms_xl"  # checked by the caller
    # the authors' released module is preferred to other modules of its latent space found before it
    with_released = found + entries(("oms_b_openclip_15_21", "sd"))
    assert choose("Automatic", with_released, "sd", "Automatic", space, []).name == "oms_b_openclip_15_21"
    assert choose("Automatic", with_released, "sd", "oms_sd_b", space, []).name == "oms_sd_b"  # the setting first
    with pytest.raises(ModuleFileError, match="'nope' was not found in /m: put it there and refresh the test host's "
                                              "list") as named:
        choose("nope", found, "sd", "Automatic", space, [Path("/m")])
    assert not isinstance(named.value, ModuleMissingError)  # a module the user named: nothing to download
    with pytest.raises(ModuleMissingError, match="h1t/oms_b_openclip_xl"):  # a download can fix this one
        choose("Automatic", found[1:], "sdxl", "Automatic", space, [Path("/m")])


def make_encoder_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"x")
    return path


def test_text_encoder_search_order(tmp_path):
    models, hub = tmp_path / "models" / "oms", tmp_path / "hub"
    models.mkdir(parents=True)
    find = lambda holds=(), setting="": resolve_text_encoder(  # noqa: E731
        OPENCLIP_H, model_holds=holds, text_encoder_path=setting, module_dirs=[models], hub_dir=hub, words=TEST_WORDS)
    with pytest.raises(TextEncoderMissingError, match=r"none was found \(searched .*text_encoder, the test host's "
                                                      r"other places and .*hub\)$"):
        find()
    snapshot = hub / "models--stabilityai--stable-diffusion-2-1" / "snapshots" / "abc"
    cached = make_encoder_folder(snapshot / "text_encoder")
    assert find() == EncoderSource("file", cached)
    (models / "sd21_text_encoder.bin").write_bytes(b"pickle")  # never loaded
    assert find() == EncoderSource("file", cached)
    lone = models / "sd21_text_encoder.safetensors"
    lone.write_bytes(b"x")
    assert find() == EncoderSource("file", lone)
    folder = make_encoder_folder(models / "text_encoder")
    assert find() == EncoderSource("file", folder)
    setting = make_encoder_folder(tmp_path / "elsewhere")
    assert find(setting=str(setting)) == EncoderSource("file", setting)
    assert find(holds={OPENCLIP_H}, setting=str(setting)) == EncoderSource("model")
    with pytest.raises(TextEncoderError, match="set in the test host's text-encoder setting"):
        find(setting=str(tmp_path / "typo"))


@pytest.mark.parametrize("cached", [
    "models--sd2-community--stable-diffusion-2-1/snapshots/abc/text_encoder",
    "models--sd2-community--stable-diffusion-2-1-base/snapshots/abc/text_encoder",
    "models--stabilityai--stable-diffusion-2-base/snapshots/abc/text_encoder",
    "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K/snapshots/abc/open_clip_model.safetensors",
])
def test_hub_cache_search_covers_the_mirrors_and_laion(tmp_path, cached):
    path = tmp_path / "hub" / cached
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    else:
        make_encoder_folder(path)
    found = resolve_text_encoder(OPENCLIP_H, words=TEST_WORDS, module_dirs=[tmp_path / "oms"],
                                 hub_dir=tmp_path / "hub")
    assert found == EncoderSource("file", path)


def sd2_checkpoint(path: Path, blocks: int = 24) -> Path:
    return write_sparse_checkpoint(path, {**text_tower_shapes("cond_stage_model.model.", 1024, blocks),
                                          "model.diffusion_model.out.2.bias": (4,)})


def test_an_sd2_checkpoint_among_the_webuis_checkpoints_is_a_source(tmp_path, monkeypatch):
    checkpoints = tmp_path / "Stable-diffusion"
    sd15 = write_sparse_checkpoint(checkpoints / "sd15.safetensors",
                                   {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
                                    (49408, 768)})
    sdxl = write_sparse_checkpoint(checkpoints / "sdxl.safetensors",
                                   text_tower_shapes("conditioner.embedders.1.model.", 1280, 32))
    pickled = checkpoints / "sd21.ckpt"
    pickled.write_bytes(b"never opened")
    sd21 = sd2_checkpoint(checkpoints / "v2-1_768-ema-pruned.safetensors")
    assert sd21.stat().st_size > 100_000_000 and sd2_checkpoints([sd15, sdxl, pickled]) == []
    models = tmp_path / "oms"
    find = lambda: resolve_text_encoder(OPENCLIP_H, words=TEST_WORDS, module_dirs=[models],  # noqa: E731
                                        hub_dir=tmp_path / "hub", checkpoints=[sd15, sdxl, pickled, sd21])
    assert find() == EncoderSource("file", sd21)
    placed = make_encoder_folder(models / "text_encoder")
    read = []
    monkeypatch.setattr("lib_oms.sources.holds_text_tower", lambda *a: read.append(a))
    assert find() == EncoderSource("file", placed) and read == []  # a placed encoder wins; no header is read


def test_mixclip_and_unknown_encoders():
    args = dict(module_dirs=[], hub_dir=Path("/nonexistent"), words=TEST_WORDS)
    assert resolve_text_encoder(SDXL_MIXCLIP, model_holds={SDXL_MIXCLIP}, **args) == EncoderSource("model")
    with pytest.raises(TextEncoderError, match="SDXL checkpoint's own CLIP-L and OpenCLIP bigG"):
        resolve_text_encoder(SDXL_MIXCLIP, model_holds={OPENCLIP_H}, **args)
    with pytest.raises(TextEncoderError, match="t5"):
        resolve_text_encoder("t5", **args)


def test_huggingface_hub_dir():
    assert huggingface_hub_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert huggingface_hub_dir({"HF_HOME": "/b"}) == Path("/b/hub")
    assert huggingface_hub_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"


def test_unwrap_hijacked_keys():
    live = {"token_embedding.wrapped.weight": 1, "conditioner.embedders.0.wrapped.transformer.text_model.x": 2,
            "wrapped.a": 3, "unwrapped.b": 4}
    assert unwrap_hijacked_keys(live) == {"token_embedding.weight": 1, "a": 3, "unwrapped.b": 4,
                                          "conditioner.embedders.0.transformer.text_model.x": 2}


def test_precision_and_offload():
    assert module_dtype("Automatic", "cuda", host_full_precision=False) == torch.float16
    assert module_dtype("Automatic", "cuda", host_full_precision=True) == torch.float32
    assert module_dtype("fp16", "cuda", host_full_precision=True) == torch.float16
    assert module_dtype("fp32", "cuda", host_full_precision=False) == torch.float32
    assert module_dtype("fp16", "cpu", host_full_precision=False) == torch.float32
    assert offload_after_use(keep_in_vram=True, low_vram=True, device_type="cuda")
    assert offload_after_use(keep_in_vram=False, low_vram=False, device_type="cuda")
    assert not offload_after_use(keep_in_vram=True, low_vram=False, device_type="cuda")
    assert not offload_after_use(keep_in_vram=False, low_vram=True, device_type="cpu")


@pytest.mark.parametrize("checkpoint, switch_at, used", [
    ("sd_xl_refiner_1.0", 0.8, True),
    ("sd_xl_refiner_1.0", None, True),  # the WebUI then switches at the first step
    ("sd_xl_refiner_1.0", 1.0, False),  # never reached
    ("None", 0.8, False), ("none", 0.8, False), ("", 0.8, False), (None, 0.8, False),
])
def test_refiner_as_the_webui_reads_it(checkpoint, switch_at, used):
    assert uses_refiner(checkpoint, switch_at) is used
