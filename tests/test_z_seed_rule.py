"""One rule for the SDE solver's fresh noise z in every host: an image's z is drawn from ``z_seed`` of its seed, so
the WebUI and ComfyUI draw z from the same seed for the same image seed (each with its own generator)."""

from __future__ import annotations

import importlib

import comfyui_stubs as stubs
import pytest
import torch
from tiny_oms_files import tiny_encoder_loader, write_oms_folder

from lib_oms import text_encoders
from lib_oms.engine import z_seed
from lib_oms.runtime import OMSRuntime
from tests import test_script
from tests.webui_fakes import ImageRNG, KDiffusionSampler

SEEDS = [7, 2**32 - 1, 2**64 - 1]  # a WebUI seed, the largest the WebUI draws, the largest ComfyUI takes


def webui_z_seeds(monkeypatch, tmp_path) -> list[int]:
    webui = test_script.make_webui(monkeypatch, test_script.write_models(tmp_path / "webui"))
    asked = []

    class Recording(ImageRNG):
        def __init__(self, shape, seeds, **kwargs):
            asked.extend(seeds)
            super().__init__(shape, seeds, **kwargs)

    webui.modules["rng"].ImageRNG = Recording  # what the script draws z with (the WebUI's own draws do not pass)
    for seed in SEEDS:
        webui.run(test_script.txt2img(KDiffusionSampler(), seeds=[seed]), test_script.ON)
    assert webui.errors == []
    return asked


def comfyui_z_seeds(monkeypatch, tmp_path) -> list[int]:
    models = tmp_path / "comfyui" / "models"
    write_oms_folder(models / "oms")
    stubs.install(monkeypatch, models)
    monkeypatch.setattr(text_encoders, "load_openclip_text_encoder", tiny_encoder_loader())
    nodes = importlib.import_module("oms_comfyui.nodes")
    monkeypatch.setattr(nodes, "RUNTIME", OMSRuntime())
    asked = []
    real = nodes.comfy.sample.prepare_noise
    monkeypatch.setattr(nodes.comfy.sample, "prepare_noise", lambda latent, seed, inds=None: asked.append(seed) or
                        real(latent, seed, inds))
    oms_module = nodes.OMSLoader.execute("Automatic", "Automatic", "penultimate", "Automatic", True).args[0]
    model = nodes.OneMoreStep.execute(stubs.ModelPatcher(stubs.BaseModel(stubs.SD15(), stubs.model_sampling(
        stubs.EPS, False))), oms_module, "a dark room", "", 1.0, "SDE").args[0]
    sigmas = torch.tensor([float(model.model.model_sampling.sigma_max), 1.0, 0.0])
    for seed in SEEDS:
        latent = torch.zeros(1, 4, 8, 8)
        stubs.sample(model, real(latent, seed), sigmas, latent, seed=seed)
    return [seed for seed in asked if seed not in SEEDS]  # the sampler's own noise is read back with the seed itself


def test_the_webui_and_comfyui_draw_z_from_the_same_seed(tmp_path):
    with pytest.MonkeyPatch.context() as monkeypatch:  # each host's fakes are undone before the other's are made
        webui = webui_z_seeds(monkeypatch, tmp_path)
    with pytest.MonkeyPatch.context() as monkeypatch:
        comfyui = comfyui_z_seeds(monkeypatch, tmp_path)
    assert webui == comfyui == [z_seed(seed) for seed in SEEDS]
    assert z_seed(SEEDS[-1]) < 2**64  # wrapped into the range every generator takes
