"""The ComfyUI nodes without ComfyUI: their decisions as pure functions, and the nodes on stand-ins of the few
ComfyUI pieces they touch (tests/comfyui_stubs.py). The real ComfyUI runs in tests/comfyui/ (gated)."""

from __future__ import annotations

import importlib
import math
import re
import subprocess
import sys
from pathlib import Path

import comfyui_stubs as stubs
import pytest
import torch
from tiny_oms_files import MODULE, SDXL_MODULE, tiny_encoder_loader, write_oms_folder

from lib_oms import text_encoders
from lib_oms.engine import Z_SEED_OFFSET
from lib_oms.errors import LatentSpaceError, ModuleFileError, ModuleMissingError
from lib_oms.module_files import load_module
from lib_oms.runtime import OMSRuntime
from oms_comfyui import logic

REPO = Path(__file__).resolve().parents[1]
WEB_SCRIPT = REPO / "web" / "one_more_step.js"  # ComfyUI's frontend loads it (WEB_DIRECTORY)
SD_SAMPLING = ["ModelSamplingAdvanced", "ModelSamplingDiscrete", "Module", "EPS", "object"]

# ---------------------------------------------------------------------------------------------------------------
# Pure decisions


@pytest.mark.parametrize(("latent_format", "model_class", "sampling", "fits"), [
    ("SD15", "BaseModel", SD_SAMPLING, True),
    ("SDXL", "SDXL", ["ModelSamplingAdvanced", "ModelSamplingDiscrete", "V_PREDICTION", "EPS"], True),
    ("SD15", "BaseModel", ["ModelSamplingAdvanced", "ModelSamplingDiscreteDistilled", "ModelSamplingDiscrete",
                           "LCM", "EPS"], True),
    ("SDXL", "SDXLRefiner", SD_SAMPLING, False),
    ("SDXL_Playground_2_5", "SDXL", ["ModelSamplingDiscreteEDM", "ModelSamplingDiscrete", "EDM", "EPS"], False),
    ("SD3", "SD3", ["ModelSamplingDiscreteFlow", "CONST"], False),
    ("SD15", "BaseModel", ["ModelSamplingDiscreteFlow", "CONST"], False),
    ("SD15", "BaseModel", ["ModelSamplingDiscrete", "X0", "EPS"], False),
])
def test_model_skip_reason(latent_format, model_class, sampling, fits):
    reason = logic.model_skip_reason(latent_format, model_class, sampling)
    assert (reason is None) == fits
    if model_class == "SDXLRefiner":
        assert "refiner" in reason


def test_model_skip_reason_names_the_schedule_and_prediction_not_the_composed_class():
    reason = logic.model_skip_reason("SD15", "BaseModel", ["ModelSamplingAdvanced", "ModelSamplingContinuousEDM",
                                                           "EPS"])
    assert "samples with ModelSamplingContinuousEDM + EPS:" in reason and "Advanced" not in reason


@pytest.mark.parametrize(("noise_is_zero", "latent_is_empty", "masked", "max_denoise", "word"), [
    (False, True, False, True, None),
    (False, True, False, False, None),  # ddim_uniform starts below σ_max: still pure noise
    (False, False, True, True, None),
    (True, True, False, True, "no noise"),
    (False, False, False, True, "not empty"),
    (False, False, True, False, "below full denoise"),
])
def test_start_skip_reason(noise_is_zero, latent_is_empty, masked, max_denoise, word):
    reason = logic.start_skip_reason(noise_is_zero=noise_is_zero, latent_is_empty=latent_is_empty, masked=masked,
                                     max_denoise=max_denoise)
    assert reason is None if word is None else word in reason


def test_noise_scale_and_max_denoise():
    assert logic.noise_scale(14.6146, True) == pytest.approx(math.sqrt(1 + 14.6146**2))
    assert logic.noise_scale(1.95, False) == 1.95
    assert logic.starts_at_max_denoise(14.6146, 14.6146 * (1 + 5e-6))
    assert logic.starts_at_max_denoise(20.0, 14.6)
    assert not logic.starts_at_max_denoise(14.4386, 14.6146)


def test_plain_words_and_summary():
    assert logic.plain_words([("a  dark ", 1.0), ("room", 1.2), ("\n at night", 1.0)]) == "a dark room at night"
    info = logic.summary(module="m [0123]", text_encoder="te", prompt="p", negative_prompt="", cfg=1.0, solver="SDE")
    assert logic.summary_text(info) == "One More Step: module m [0123], text encoder te, prompt 'p', CFG 1, solver SDE"


# ---------------------------------------------------------------------------------------------------------------
# The nodes on stand-ins


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """The nodes imported against the stand-ins, with ComfyUI's models/ in tmp_path holding tiny OMS files."""
    models = tmp_path / "models"
    write_oms_folder(models / "oms")
    env = stubs.install(monkeypatch, models)
    monkeypatch.setattr(text_encoders, "load_openclip_text_encoder", tiny_encoder_loader())
    env.nodes = importlib.import_module("oms_comfyui.nodes")
    monkeypatch.setattr(env.nodes, "RUNTIME", OMSRuntime())  # nothing kept from another test
    env.oms = models / "oms"
    return env


def sd_model(latent_format=stubs.SD15, prediction=stubs.EPS, zsnr=False, model_class=stubs.BaseModel):
    return stubs.ModelPatcher(model_class(latent_format(), stubs.model_sampling(prediction, zsnr)))


def loader(comfy, module="Automatic", **kwargs):
    return comfy.nodes.OMSLoader.execute(module, "Automatic", "penultimate", "Automatic", kwargs.get("download", True)
                                         ).args[0]


def expected_start(oms: Path, noise, seed, sigma0, prompt="a dark room"):
    """x̂0 + σ₀·z, made here from the files: the k-diffusion start of the SDE solver."""
    module = load_module(oms / MODULE)
    encoder = tiny_encoder_loader()(oms / "text_encoder")
    with torch.no_grad():
        x0_hat = -module.forward(noise, encoder.encode([prompt] * len(noise)))
    z = stubs.prepare_noise(noise, seed + Z_SEED_OFFSET)
    return x0_hat + sigma0 * z


def latent_and_noise(batch=2, seed=5):
    latent = torch.zeros(batch, 4, 8, 8)
    return latent, stubs.prepare_noise(latent, seed)


def patched(comfy, model=None, prompt="a dark room", solver="SDE", cfg=1.0, **loader_args):
    out = comfy.nodes.OneMoreStep.execute(model or sd_model(), loader(comfy, **loader_args), prompt, "", cfg, solver)
    return out.args[0], out.ui


def oms_run(model):
    """The One More Step node's run, as its SAMPLER_SAMPLE wrapper holds it."""
    (wrapper,) = model.wrappers["sampler_sample"]["one_more_step"]
    return wrapper.args[0]


@pytest.mark.parametrize(("sigmas", "max_denoise"), [(None, True), ([14.4386, 3.0, 0.0], False)])
def test_the_sampler_starts_at_x0_hat_plus_sigma0_z(comfy, sigmas, max_denoise):
    model, ui = patched(comfy)
    sigmas = torch.tensor(sigmas) if sigmas else torch.tensor([float(model.model.model_sampling.sigma_max), 1.0, 0.0])
    assert stubs.Sampler().max_denoise(stubs.Guider(model), sigmas) == max_denoise
    latent, noise = latent_and_noise()
    x = stubs.sample(model, noise, sigmas, latent, seed=5)
    assert torch.allclose(x, expected_start(comfy.oms, noise, 5, float(sigmas[0])), atol=1e-4)
    assert "module oms_tiny_15_21 [" in ui["text"][0]
    assert model.model_options["transformer_options"]["one_more_step"]["prompt"] == "a dark room"
    run = oms_run(model)
    assert model.additional_models["one_more_step"] == run.patchers and len(run.patchers) == 2


def test_an_image_remade_from_its_batch_index_equals_it_in_the_batch(comfy):
    """Latent From Batch: the sampler gets the seed's noise at the latent's batch indices and is not told them; z
    follows the same indices, so image 2 of a batch made alone is image 2 of the batch."""
    model, _ = patched(comfy)
    sigmas = torch.tensor([float(model.model.model_sampling.sigma_max), 1.0, 0.0])
    latent, noise = latent_and_noise(batch=3)
    batch = stubs.sample(model, noise, sigmas, latent, seed=5)
    picked = stubs.prepare_noise(latent[:2], 5, [2, 0])
    assert torch.equal(picked, noise[[2, 0]])  # the stand-in draws a batch as one image after another
    remade = stubs.sample(model, picked, sigmas, latent[:2], seed=5)
    assert torch.allclose(remade, batch[[2, 0]], atol=1e-5)
    assert comfy.nodes.batch_indices(picked, 5) == [2, 0] and comfy.nodes.batch_indices(noise, 5) is None


def test_noise_that_is_not_the_seeds_gets_the_plain_z(comfy):
    model, _ = patched(comfy)
    sigmas = torch.tensor([float(model.model.model_sampling.sigma_max), 1.0, 0.0])
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(99))  # another NOISE node's
    assert comfy.nodes.batch_indices(noise, 5) is None
    x = stubs.sample(model, noise, sigmas, latent, seed=5)
    assert torch.allclose(x, expected_start(comfy.oms, noise, 5, float(sigmas[0])), atol=1e-4)


def test_ddim_solver_keeps_the_seed_noise(comfy):
    model, _ = patched(comfy, solver="DDIM")
    latent, noise = latent_and_noise()
    sigmas = torch.tensor([float(model.model.model_sampling.sigma_max), 0.0])
    x = stubs.sample(model, noise, sigmas, latent, seed=5)
    sde = expected_start(comfy.oms, noise, 5, float(sigmas[0]))
    z = stubs.prepare_noise(noise, 5 + Z_SEED_OFFSET)
    assert torch.allclose(x, sde - float(sigmas[0]) * z + float(sigmas[0]) * noise, atol=1e-4)


def test_the_original_model_is_untouched_and_a_second_node_replaces_the_first(comfy):
    original = sd_model()
    once, _ = patched(comfy, original)
    twice = comfy.nodes.OneMoreStep.execute(once, loader(comfy), "bright", "", 1.0, "SDE").args[0]
    assert original.wrappers == {}
    assert len(twice.wrappers[stubs.SAMPLER_SAMPLE]["one_more_step"]) == 1


@pytest.mark.parametrize("case", ["image latent", "zero noise", "zsnr", "mask below full denoise"])
def test_starts_that_are_not_pure_noise_pass_through(comfy, case, caplog):
    model, _ = patched(comfy, sd_model(zsnr=case == "zsnr"))
    latent, noise = latent_and_noise()
    sigmas = torch.tensor([float(model.model.model_sampling.sigma_max), 0.0])
    mask = None
    if case == "image latent":
        latent, sigmas = torch.randn(latent.shape), torch.tensor([1.95, 0.0])
    elif case == "zero noise":
        noise = torch.zeros_like(noise)
    elif case == "mask below full denoise":
        latent, sigmas, mask = torch.randn(latent.shape), torch.tensor([1.95, 0.0]), torch.ones(latent.shape)
    with caplog.at_level("INFO"):
        x = stubs.sample(model, noise, sigmas, latent, mask, seed=5)
    processed = model.model.process_latent_in(latent) if torch.any(latent) else latent
    assert torch.equal(x, stubs.EPS().noise_scaling(sigmas[0], noise, processed, case in ("zero noise", "zsnr")))
    assert "[One More Step] skipped:" in caplog.text


def test_inpainting_at_full_denoise_starts_the_mask_at_the_oms_latent(comfy):
    model, _ = patched(comfy)
    _, noise = latent_and_noise()
    image = torch.randn(noise.shape)
    mask = torch.zeros(noise.shape)
    mask[..., :4] = 1
    sigma0 = float(model.model.model_sampling.sigma_max)
    x = stubs.sample(model, noise, torch.tensor([sigma0, 0.0]), image, mask, seed=5)
    inside = mask.bool()
    assert torch.allclose(x[inside], expected_start(comfy.oms, noise, 5, sigma0)[inside], atol=1e-4)
    unchanged = stubs.EPS().noise_scaling(sigma0, noise, model.model.process_latent_in(image), True)
    assert torch.equal(x[~inside], unchanged[~inside])


@pytest.mark.parametrize(("model", "word"), [
    (lambda: sd_model(model_class=stubs.SDXLRefiner, latent_format=stubs.SDXL), "refiner"),
    (lambda: sd_model(latent_format=stubs.SDXL_Playground_2_5), "SDXL_Playground_2_5"),
    (lambda: sd_model(prediction=stubs.CONST), "flow matching"),
])
def test_other_families_pass_through_with_a_message(comfy, model, word):
    model = model()
    out = comfy.nodes.OneMoreStep.execute(model, loader(comfy), "p", "", 1.0, "SDE")
    assert out.args[0] is model
    assert out.ui["text"][0].startswith("One More Step skipped:") and word in out.ui["text"][0]


@pytest.mark.parametrize(("sampling", "sigmas", "word"), [
    (stubs.edm_sampling, [120.0, 1.0, 0.0], "ModelSamplingContinuousEDM"),
    (lambda: stubs.model_sampling(stubs.CONST), [1.0, 0.5, 0.0], "flow matching"),
], ids=["edm", "flow"])
def test_a_model_sampling_patched_after_the_node_is_checked_when_sampling(comfy, sampling, sigmas, word, caplog):
    """ModelSamplingContinuousEDM or ModelSamplingSD3 placed after One More Step: the sampler runs an EDM or flow
    schedule the node never saw; its wrapper must pass through (found in ComfyUI 0.26 by tests/comfyui's probe)."""
    model, _ = patched(comfy)
    model.add_object_patch("model_sampling", sampling())
    latent, noise = latent_and_noise()
    sigmas = torch.tensor(sigmas)
    with caplog.at_level("INFO"):
        x = stubs.sample(model, noise, sigmas, latent, seed=5)
    plain = sd_model()
    plain.add_object_patch("model_sampling", sampling())
    assert torch.equal(x, stubs.sample(plain, noise, sigmas, latent, seed=5))
    assert "[One More Step] skipped:" in caplog.text and word in caplog.text


def test_automatic_picks_the_module_of_the_latent_space(comfy):
    model, _ = patched(comfy, sd_model(latent_format=stubs.SDXL))
    assert oms_run(model).prepared.label.startswith(SDXL_MODULE)


def test_a_named_module_of_another_latent_space_is_refused(comfy):
    with pytest.raises(LatentSpaceError, match="sdxl"):
        patched(comfy, module=SDXL_MODULE)


def test_bad_input_is_refused_before_any_work(comfy):
    with pytest.raises(ModuleFileError, match="not found"):
        loader(comfy, module="no_such_module")
    with pytest.raises(ValueError, match="OMS CFG"):
        comfy.nodes.OneMoreStep.execute(sd_model(), loader(comfy), "p", "", 99.0, "SDE")


def test_a_missing_module_names_comfyui_folders_when_downloading_is_off(comfy, tmp_path):
    import shutil

    shutil.rmtree(comfy.oms / MODULE)
    with pytest.raises(ModuleMissingError, match="downloading is off") as error:
        patched(comfy, download=False)
    assert str(comfy.oms) in str(error.value)


def test_modules_are_loaded_once_and_registered_with_model_management(comfy):
    first, second = oms_run(patched(comfy)[0]), oms_run(patched(comfy, prompt="another prompt")[0])
    assert second.prepared.module is first.prepared.module and second.prepared.encoder is first.prepared.encoder
    assert second.patchers == first.patchers  # one ModelPatcher per set of weights: only it moves them
    module_patcher, encoder_patcher = first.patchers
    assert isinstance(module_patcher, stubs.ModelPatcher)
    weights = lambda models: {id(p) for model in models for p in model.parameters()}  # noqa: E731
    assert weights([module_patcher.model]) == weights([first.prepared.module.unet])
    assert weights([encoder_patcher.model]) == weights(first.prepared.encoder.encoder.torch_models())
    assert folder_list(comfy) == [str(comfy.oms), str(REPO / "models")]


def folder_list(comfy):
    return comfy.folder_paths.get_folder_paths("oms")


def test_noise_node_corrects_the_draw_of_its_noise(comfy):
    class RandomNoise:
        seed = 5

        def generate_noise(self, latent):
            return stubs.prepare_noise(latent["samples"], self.seed)

    model = sd_model()
    sigma0 = float(model.model.model_sampling.sigma_max)
    out = comfy.nodes.OMSNoiseNode.execute(RandomNoise(), model, torch.tensor([sigma0, 0.0]), loader(comfy),
                                           "a dark room", "", 1.0, "SDE")
    noise = out.args[0]
    latent, plain = latent_and_noise()
    assert noise.seed == 5
    drawn = noise.generate_noise({"samples": latent})
    x = stubs.EPS().noise_scaling(sigma0, drawn, latent, True)
    assert torch.allclose(x, expected_start(comfy.oms, plain, 5, sigma0), atol=1e-4)
    assert comfy.loaded == [noise.run.patchers]


def root_package():
    """The repository's __init__.py, imported as ComfyUI imports a pack from custom_nodes/."""
    spec = importlib.util.spec_from_file_location("one_more_step_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    return pack


def test_root_package_is_comfyuis_entry_point_and_names_the_web_folder(comfy):
    pack = root_package()
    assert pack.comfy_entrypoint is comfy.nodes.comfy_entrypoint
    assert set(pack.__all__) == {"comfy_entrypoint", "WEB_DIRECTORY"}
    assert sorted(path.name for path in (REPO / pack.WEB_DIRECTORY).iterdir()) == [WEB_SCRIPT.name]


def test_root_package_exports_nothing_outside_comfyui():
    assert importlib.util.find_spec("folder_paths") is None
    pack = root_package()
    assert not hasattr(pack, "comfy_entrypoint") and not hasattr(pack, "WEB_DIRECTORY")


def web_script_nodes() -> set[str]:
    """The node_ids web/one_more_step.js gives a text box (its NODES_WITH_TEXT)."""
    (line,) = [line for line in WEB_SCRIPT.read_text().splitlines() if line.startswith("const NODES_WITH_TEXT = [")]
    return set(re.findall(r'"(\w+)"', line.split("//")[0]))


def test_the_web_script_shows_the_text_of_exactly_the_nodes_that_send_one(comfy):
    """The frontend gets a node's ui as the `executed` message's output: {"text": [one line]} is what the script
    shows in the node. The loader sends none; both OMS nodes send theirs, whether they apply or pass through."""
    class RandomNoise:
        seed = 5

    model, sigmas, oms_module = sd_model(), torch.tensor([14.6, 0.0]), loader(comfy)
    refiner = sd_model(model_class=stubs.SDXLRefiner, latent_format=stubs.SDXL)
    sent = {
        "OneMoreStepLoader": [comfy.nodes.OMSLoader.execute("Automatic", "Automatic", "penultimate", "Automatic",
                                                            True)],
        "OneMoreStep": [comfy.nodes.OneMoreStep.execute(node_model, oms_module, "a dark room", "", 1.0, "SDE")
                        for node_model in (model, refiner)],
        "OneMoreStepNoise": [comfy.nodes.OMSNoiseNode.execute(RandomNoise(), model, node_sigmas, oms_module,
                                                              "a dark room", "", 1.0, "SDE")
                             for node_sigmas in (sigmas, sigmas[:1])],
    }
    node_ids = {node.define_schema().kwargs["node_id"]
                for node in (comfy.nodes.OMSLoader, comfy.nodes.OneMoreStep, comfy.nodes.OMSNoiseNode)}
    assert set(sent) == node_ids
    texts = {node_id: [out.ui["text"] if out.ui else None for out in outs] for node_id, outs in sent.items()}
    assert texts["OneMoreStepLoader"] == [None]
    for node_id in ("OneMoreStep", "OneMoreStepNoise"):
        (applied,), (skipped,) = texts[node_id]
        assert applied.startswith("One More Step: module oms_tiny_15_21 [") and "'a dark room'" in applied
        assert skipped.startswith("One More Step skipped: ")
    assert web_script_nodes() == {node_id for node_id, outs in texts.items() if outs != [None]}


def test_install_py_does_nothing_without_the_webui(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "install.py")], cwd=tmp_path, capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_lib_oms_imports_no_host():
    for path in (REPO / "lib_oms").rglob("*.py"):
        text = path.read_text()
        for host in ("import comfy", "from comfy", "import folder_paths", "from modules", "import modules"):
            assert host not in text, f"{path} imports a host ({host})"
