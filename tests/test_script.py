"""The WebUI glue driven as the WebUI drives it (fake ``modules``, tiny random OMS modules, a fake text encoder)."""

import math
import sys
import zlib

import pytest
import torch

from lib_oms.engine import Z_SEED_OFFSET
from lib_oms.errors import LatentSpaceError, ModuleFileError, OMSError, TextEncoderError
from lib_oms.modules import ModuleCache
from lib_oms.webui_args import ARGS, ArgumentError
from tests.factories import random_state_dict, tiny_unet_config, write_released_folder
from tests.webui_fakes import (
    ROOT,
    SIGMA_MAX,
    CompVisSampler,
    FakeSDModel,
    FlowSampler,
    KDiffusionSampler,
    StableDiffusionProcessingImg2Img,
    StableDiffusionProcessingTxt2Img,
    install,
    randn_local,
)

ON = [True, "Automatic", "", "", 1.0, "SDE"]
OFF = [False, "Automatic", "", "", 1.0, "SDE"]


class HashEncoder:
    """A text encoder following the protocol: each prompt's features are seeded from the prompt's CRC."""

    max_length = 77

    def __init__(self, kind, width=32):
        self.kind, self.width, self.calls = kind, width, []
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def to(self, device=None, dtype=None):
        return self

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


SHARED_MODULES = ModuleCache()  # loaded once for the whole file (keyed by path and file stats)


def make_webui(monkeypatch, oms_dir, **kwargs):
    webui = install(monkeypatch, oms_dir.parent, **kwargs)
    monkeypatch.setattr(webui.script_module, "MODULE_CACHE", SHARED_MODULES)
    encoders = {}

    def fake_loader(kind):
        def load(source, **_kwargs):
            encoders.setdefault(kind, []).append(source)
            return HashEncoder(kind)
        return load

    text_encoders = webui.script_module.text_encoders
    monkeypatch.setattr(text_encoders, "load_openclip_text_encoder", fake_loader("openclip-h"))
    monkeypatch.setattr(text_encoders, "load_mixclip_text_encoder", fake_loader("sdxl-mixclip"))
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


def unit_noise(seeds, shape=(4, 5, 6)):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def expected_x0(oms_dir, name, noise, prompts):
    """x̂0 = −v of the module on disk for this noise and these prompts, computed without the glue."""
    module = SHARED_MODULES.get(oms_dir / name)
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
    assert torch.equal(start, unit_noise([3, 4]) * SIGMA_MAX)
    assert p.extra_generation_params == {} and webui.errors == []
    assert p.sampler.calls == 0 and webui.loaded_encoders == {}
    assert not isinstance(p.rng, webui.script_module.FirstDraw)


# ---------------------------------------------------------------------------------------------------------------
# Scaling per sampler family (webui.md §2.7)

@pytest.mark.parametrize("sigma0, sgm, solver", [
    (SIGMA_MAX, False, "SDE"),  # default schedulers
    (11.03, True, "DDIM"),  # the "DDIM" scheduler at 20 steps
    (14.615, False, "DDIM"),  # Align Your Steps
    (10.0, True, "SDE"),  # the "sigma max" setting
])
def test_k_diffusion_starts_at_the_oms_latent(monkeypatch, oms_dir, sigma0, sgm, solver):
    webui = make_webui(monkeypatch, oms_dir, opts={"sgm_noise_multiplier": sgm})
    p = txt2img(KDiffusionSampler(sigmas=torch.tensor([sigma0, 1.0, 0.0])), seeds=[5])
    start = webui.run(p, [True, "Automatic", "", "", 1.0, solver])[0]
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([5]), ["a dark alley"])
    eps = fresh_z([5]) if solver == "SDE" else unit_noise([5])
    sigma = float(torch.tensor(sigma0))
    assert torch.allclose(start, x0 + sigma * eps, atol=1e-4)  # x_VE = x̂0 + σ₀·ε, whatever the multiplier
    assert webui.errors == []


@pytest.mark.parametrize("funcname, first", [(ddim, 951), (plms, 951), (ddim_cfgpp, 951), (unipc, 999)])
def test_timestep_samplers_start_at_the_oms_latent(webui, oms_dir, funcname, first):
    sampler = CompVisSampler(funcname)
    p = txt2img(sampler, seeds=[5], sampler_name=funcname.__name__)
    start = webui.run(p, ON)[0]
    alpha = float(sampler.model_wrap.inner_model.alphas_cumprod[first])
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([5]), ["a dark alley"])
    assert torch.allclose(start, math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * fresh_z([5]), atol=1e-5)


def test_old_webui_rng_wrapper_gives_the_same_start(monkeypatch, oms_dir):
    new = make_webui(monkeypatch, oms_dir, with_hook=True).run(txt2img(seeds=[7, 8]), ON)[0]
    old_webui = make_webui(monkeypatch, oms_dir, with_hook=False)
    p = txt2img(seeds=[7, 8])
    old = old_webui.run(p, ON)[0]
    assert torch.equal(new, old) and old_webui.errors == []
    assert p.rng.draws == 1  # the WebUI's own stream was drawn once, as without OMS


def test_hook_is_chosen_once_at_import(monkeypatch, oms_dir):
    assert make_webui(monkeypatch, oms_dir, with_hook=True).script_module.HAS_SAMPLING_HOOK
    webui = make_webui(monkeypatch, oms_dir, with_hook=False)
    p = txt2img()
    webui.run(p, ON)
    assert isinstance(p.rng, webui.script_module.FirstDraw)


# ---------------------------------------------------------------------------------------------------------------
# Batches, seeds, prompts

def test_batch_equals_single_images(webui):
    prompts = ["(dark:1.3) cave <lora:x:1>", "[snow|ice] field"]
    batch = webui.run(txt2img(seeds=[21, 22], prompts=prompts), ON)[0]
    singles = [webui.run(txt2img(seeds=[s], prompts=[q]), ON)[0] for s, q in zip([21, 22], prompts, strict=True)]
    assert torch.allclose(batch, torch.cat(singles), atol=1e-5)
    again = webui.run(txt2img(seeds=[21, 22], prompts=prompts), ON)[0]
    assert torch.equal(batch, again)


def test_each_image_reads_its_own_cleaned_prompt_or_the_oms_prompt(webui):
    encoder = webui.script_module.ENCODER_CACHE
    webui.run(txt2img(seeds=[1, 2], prompts=["(dark:1.3) cave <lora:x:1>", "[snow|ice] field"]), ON)
    (cache,) = encoder.values()
    assert cache.encoder.calls[-1] == ["dark cave", "snow field"]
    webui.run(txt2img(seeds=[3, 4], prompts=["a", "b"]), [True, "Automatic", "a (bright) room", "", 1.0, "SDE"])
    assert cache.encoder.calls[-1] == ["a bright room"]  # one entry per distinct prompt (cache)


def test_cfg_uses_the_oms_negative_prompt(webui):
    webui.run(txt2img(seeds=[1]), [True, "Automatic", "", "(blurry)", 2.0, "SDE"])
    (cache,) = webui.script_module.ENCODER_CACHE.values()
    assert cache.encoder.calls == [["blurry", "a dark alley"]]  # both prompts in one call of the encoder


# ---------------------------------------------------------------------------------------------------------------
# Infotext

def test_infotext_of_an_applied_step(webui, oms_dir):
    p = txt2img()
    webui.run(p, [True, "Automatic", "dark", "", 1.5, "DDIM"])
    module = SHARED_MODULES.get(oms_dir / "oms_tiny_15_21")
    assert p.extra_generation_params == {"OMS": True, "OMS module": f"oms_tiny_15_21 [{module.short_hash}]",
                                         "OMS prompt": "dark", "OMS CFG": 1.5, "OMS solver": "DDIM"}


def test_hires_and_refiner_passes_are_said(webui, capsys):
    p = txt2img(enable_hr=True, refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.8)
    webui.run(p, ON)
    assert p.extra_generation_params["OMS"] is True
    assert p.extra_generation_params["OMS first pass only"] == "hires fix second pass; refiner"
    assert "OMS skipped" not in p.extra_generation_params
    noise = torch.ones(1, 4, 5, 6)
    p.is_hr_pass = True
    webui.script().process_before_every_sampling(p, *ON, x=noise, noise=noise)
    assert torch.equal(noise, torch.ones(1, 4, 5, 6))
    out = capsys.readouterr().out
    assert out.count("the hires fix second pass; refiner continue from it") == 1 and "skipped" not in out


@pytest.mark.parametrize("p_kwargs, reason", [
    (dict(sd_model=FakeSDModel("sd3", latent_channels=16)), "latent space"),
    (dict(sd_model=FakeSDModel("sdxl-refiner")), "refiner"),
    (dict(sampler=KDiffusionSampler(sigmas=torch.tensor([4518.76, 1.0, 0.0]))), "zero-terminal-SNR"),
    (dict(sampler=FlowSampler()), "neither"),
])
def test_skips_are_said_once_and_leave_the_noise(webui, capsys, p_kwargs, reason):
    p = txt2img(seeds=[9], **p_kwargs)
    if isinstance(p.sampler, FlowSampler):
        p.sampler.start = lambda p, x, opts: x
    start = webui.run(p, ON, batches=1)[0]
    assert reason in p.extra_generation_params["OMS skipped"]
    assert "OMS" not in p.extra_generation_params and webui.errors == []
    plain = unit_noise([9], (p.sd_model.latent_channels, 5, 6))
    plain = plain if isinstance(p.sampler, FlowSampler) else plain * p.sampler.sigmas[0]
    assert torch.equal(start, plain)
    assert capsys.readouterr().out.count("skipped") == 1


def test_zero_terminal_snr_setting_skips_before_loading(monkeypatch, oms_dir):
    webui = make_webui(monkeypatch, oms_dir, opts={"sd_noise_schedule": "Zero Terminal SNR"})
    p = txt2img()
    webui.run(p, ON)
    assert "zero-terminal-SNR" in p.extra_generation_params["OMS skipped"] and webui.loaded_encoders == {}


def test_interrupted_generation_does_no_oms_work(webui):
    webui.modules["shared"].state.interrupted = True
    p = txt2img(seeds=[2])
    assert torch.equal(webui.run(p, ON)[0], unit_noise([2]) * SIGMA_MAX)


# ---------------------------------------------------------------------------------------------------------------
# img2img

def inpainting(seeds, fill, **kwargs):
    generator = torch.Generator().manual_seed(99)
    image = torch.randn(len(seeds), 4, 5, 6, generator=generator)
    nmask = torch.zeros(4, 5, 6)
    nmask[:, 1:4, 2:5] = 1
    filled = torch.zeros_like(image) if fill == 3 else unit_noise(seeds)
    return StableDiffusionProcessingImg2Img(
        sd_model=FakeSDModel(), all_seeds=list(seeds), all_prompts=["a dark room"] * len(seeds),
        batch_size=len(seeds), sampler=kwargs.pop("sampler", KDiffusionSampler()), inpainting_fill=fill,
        init_latent=image * (1 - nmask) + filled * nmask, nmask=nmask, **kwargs)


@pytest.mark.parametrize("fill", [2, 3])
@pytest.mark.parametrize("sampler", [KDiffusionSampler(), CompVisSampler(ddim)])
def test_inpainting_from_pure_noise_starts_the_mask_at_the_oms_latent(webui, oms_dir, fill, sampler):
    p = inpainting([4], fill, sampler=sampler)
    start = webui.run(p, ON)[0]
    inside = p.nmask.bool().expand(1, -1, -1, -1)
    if isinstance(sampler, CompVisSampler):  # VP latent at timesteps[t_enc] → k-diffusion units
        alpha = float(sampler.model_wrap.inner_model.alphas_cumprod[sampler.get_timesteps(p, 20)[19]])
        sigma, start = math.sqrt((1 - alpha) / alpha), start / math.sqrt(alpha)
    else:
        sigma = float(p.sampler.sigmas[0])
    x0 = expected_x0(oms_dir, "oms_tiny_15_21", unit_noise([4]), ["a dark room"])
    assert torch.allclose(start[inside], (x0 + sigma * fresh_z([4]))[inside], atol=1e-4)
    assert torch.allclose(start[~inside], (p.init_latent + sigma * unit_noise([4]))[~inside], atol=1e-5)


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
    with pytest.raises(error, match=words):
        webui.run(p, args)
    assert webui.errors == [] and p.extra_generation_params == {}


def test_missing_module_and_text_encoder_say_what_to_do(monkeypatch, tmp_path, oms_dir):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "oms"
    folder.mkdir()
    (folder / "oms_tiny_15_21").symlink_to(oms_dir / "oms_tiny_15_21")
    webui = make_webui(monkeypatch, folder)
    with pytest.raises(ModuleFileError, match="h1t/oms_b_openclip_xl"):
        webui.run(txt2img(sd_model=FakeSDModel("sdxl")), ON)
    with pytest.raises(TextEncoderError, match="stable-diffusion-2-1"):
        webui.run(txt2img(), ON)


def test_sd2_and_sdxl_use_the_checkpoint_text_encoder(webui, tmp_path):
    checkpoint = tmp_path / "sd21.safetensors"
    checkpoint.write_bytes(b"x")
    webui.run(txt2img(sd_model=FakeSDModel("sd2", checkpoint=str(checkpoint))), ON)
    webui.run(txt2img(sd_model=FakeSDModel("sdxl", checkpoint=str(checkpoint))), ON)
    assert webui.loaded_encoders == {"openclip-h": [checkpoint], "sdxl-mixclip": [checkpoint]}


def test_sampling_errors_are_said_in_the_infotext(webui, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(webui.script_module, "oms_start", broken)
    p = txt2img()
    webui.run(p, ON)
    assert isinstance(webui.errors[0], RuntimeError)
    assert p.extra_generation_params == {"OMS skipped": "error: out of memory"}


# ---------------------------------------------------------------------------------------------------------------
# UI, settings, X/Y/Z, caches

def test_ui_components_follow_the_argument_order(webui):
    script = webui.script()
    components = script.ui(False)
    assert [c.label for c in components] == [arg.label for arg in ARGS]
    assert [c.value for c in components] == [arg.default for arg in ARGS]
    assert components[1].kwargs["choices"] == ["Automatic", "oms_tiny_15_21", "oms_tiny_xl"]
    params = {"OMS": "True", "OMS module": "oms_tiny_xl [0123456789]", "OMS CFG": "2.5"}
    assert [fn(params) for _, fn in script.infotext_fields] == [True, "oms_tiny_xl", "", "", 2.5, None]
    assert script.title() == "One More Step" and script.show(True) is webui.modules["scripts"].AlwaysVisible


def test_settings_and_callbacks_registered(webui):
    registered = webui.modules["script_callbacks"].registered
    assert [len(registered[k]) for k in ("ui_settings", "before_ui", "model_loaded")] == [1, 1, 1]
    registered["ui_settings"][0]()
    added = webui.opts.added
    assert set(added) == {"oms_module_sd", "oms_module_sdxl", "oms_text_encoder_path", "oms_text_encoder_layer",
                          "oms_keep_in_vram", "oms_precision"}
    assert all(info.kwargs["section"] == ("oms", "One More Step") for info in added.values())


class AxisOption:
    def __init__(self, label, type, apply, confirm=None, choices=None, cost=0.0, **kwargs):
        self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices


@pytest.fixture
def xyz(webui):
    import types
    module = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Seed", int, None)])
    data = types.SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=module)
    webui.modules["scripts"].scripts_data.append(data)
    return module


def test_xyz_axes_registered_once(webui, xyz):
    webui.script_module.register_xyz_axes()
    webui.script_module.register_xyz_axes()
    labels = [opt.label for opt in xyz.axis_options]
    assert labels == ["Seed", "[OMS] Enabled", "[OMS] Module", "[OMS] Prompt", "[OMS] CFG", "[OMS] Solver"]
    assert xyz.axis_options[2].choices() == ["Automatic", "oms_tiny_15_21", "oms_tiny_xl"]
    with pytest.raises(ArgumentError, match="'solver'"):
        xyz.axis_options[5].confirm(None, ["SDE", "Euler"])


def test_xyz_cells_override_the_ui(webui, xyz):
    webui.script_module.register_xyz_axes()
    axes = {opt.label: opt for opt in xyz.axis_options}
    p = txt2img(seeds=[1])
    axes["[OMS] Enabled"].apply(p, "True", None)
    axes["[OMS] CFG"].apply(p, 2.0, None)
    start = webui.run(p, OFF)[0]
    assert p.extra_generation_params["OMS CFG"] == 2.0
    assert not torch.equal(start, unit_noise([1]) * SIGMA_MAX)
    cell = txt2img(seeds=[1])
    axes["[OMS] Enabled"].apply(cell, "False", None)
    webui.run(cell, ON)
    assert cell.extra_generation_params == {}


def test_checkpoint_change_drops_caches(webui):
    webui.run(txt2img(), ON)
    assert webui.script_module.ENCODER_CACHE
    webui.modules["script_callbacks"].registered["model_loaded"][0](FakeSDModel())
    assert not webui.script_module.ENCODER_CACHE


def test_low_vram_sends_the_webui_model_away_first(webui):
    model = FakeSDModel()
    model.lowvram = True
    webui.run(txt2img(sd_model=model), ON)
    assert webui.modules["lowvram"].calls == [1]


def test_dict_and_positional_api_forms_agree(webui):
    a = webui.run(txt2img(seeds=[6]), [True, "Automatic", "dark", "", 1.5, "DDIM"])[0]
    b = webui.run(txt2img(seeds=[6]), [{"enabled": True, "prompt": "dark", "cfg": 1.5, "solver": "ddim"}])[0]
    assert torch.equal(a, b)


def test_errors_are_oms_errors():
    assert issubclass(ArgumentError, OMSError)


# ---------------------------------------------------------------------------------------------------------------
# install.py and preload.py

@pytest.mark.parametrize("skip_install", [False, True])
def test_install_adds_only_what_is_missing(monkeypatch, skip_install):
    import runpy
    import types

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
