"""The WebUI glue on a GPU: fp16 module under autocast, keep in VRAM / offload, low VRAM (skipped without CUDA)."""

import pytest
import torch

import tests.test_script as ts
from tests import webui_fakes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return ts.write_models(tmp_path_factory.mktemp("models"))


def gpu_webui(monkeypatch, models, **opts):
    webui = ts.make_webui(monkeypatch, models, opts=opts)
    devices = webui.modules["devices"]
    devices.device = CUDA
    devices.get_device_for = lambda task: CUDA
    devices.dtype_unet = torch.float16
    webui.modules["shared"].device = CUDA  # ImageRNG moves its draws there (the fake draws them on the CPU)
    return webui


def sampler():
    return webui_fakes.KDiffusionSampler(sigmas=torch.tensor([webui_fakes.SIGMA_MAX, 1.0, 0.0], device=CUDA))


def run(webui, p, args):
    with torch.autocast("cuda", dtype=torch.float16):  # the WebUI samples inside devices.autocast()
        return webui.run(p, args)[0]


def test_fp16_on_gpu_matches_fp32_cpu(monkeypatch, models):
    cpu = ts.make_webui(monkeypatch, models).run(ts.txt2img(seeds=[5, 6]), ts.ON)[0]
    webui = gpu_webui(monkeypatch, models)
    p = ts.txt2img(sampler(), seeds=[5, 6])
    out = run(webui, p, ts.ON)
    assert out.device.type == "cuda" and out.dtype == torch.float32 and webui.errors == []
    module = p._oms_plan.prepared.module
    assert module.dtype == torch.float16 and module.device.type == "cuda"  # kept in VRAM by default
    err = (out.cpu() - cpu).abs().max().item()
    print("max |gpu fp16 - cpu fp32| =", err)
    assert err < 0.05
    singles = torch.cat([run(webui, ts.txt2img(sampler(), seeds=[s]), ts.ON) for s in (5, 6)])
    print("batch vs singles:", (singles - out).abs().max().item())
    assert torch.allclose(singles, out, atol=1e-2)
    assert torch.equal(out, run(webui, ts.txt2img(sampler(), seeds=[5, 6]), ts.ON))


def test_disabled_untouched_on_gpu(monkeypatch, models):
    webui = gpu_webui(monkeypatch, models)
    p = ts.txt2img(sampler(), seeds=[3])
    out = run(webui, p, ts.OFF)
    assert torch.equal(out, (ts.unit_noise([3]).to(CUDA)) * p.sampler.sigmas[0]) and p.extra_generation_params == {}


@pytest.mark.parametrize("low_vram, keep", [(True, True), (False, False)])
def test_offload(monkeypatch, models, low_vram, keep):
    webui = gpu_webui(monkeypatch, models, oms_keep_in_vram=keep)
    model = webui_fakes.FakeSDModel()
    model.lowvram = low_vram
    p = ts.txt2img(sampler(), sd_model=model)
    run(webui, p, ts.ON)
    module, encoder = p._oms_plan.prepared.module, p._oms_plan.prepared.encoder
    assert module.device.type == "cpu" and module.dtype == torch.float16
    assert not module.cuda_graphs and not encoder.encoder.cuda_graphs  # moved every step: no graphs to recapture
    assert webui.modules["devices"].gc_calls and webui.modules["lowvram"].calls == ([1] if low_vram else [])
    print("after offload, cuda memory allocated:", torch.cuda.memory_allocated())


@pytest.mark.parametrize("keep", [True, False])  # CUDA graphs / eager
def test_fp32_setting_computes_in_fp32_under_the_webuis_autocast(monkeypatch, models, keep):
    cfg2 = [True, "Automatic", "", "blurry", 2.0, "SDE"]
    cpu = ts.make_webui(monkeypatch, models).run(ts.txt2img(seeds=[5, 6]), cfg2)[0]
    webui = gpu_webui(monkeypatch, models, oms_precision="fp32", oms_keep_in_vram=keep)
    p = ts.txt2img(sampler(), seeds=[5, 6])
    under_autocast = run(webui, p, cfg2)
    module = p._oms_plan.prepared.module
    assert module.dtype == torch.float32 and module.cuda_graphs == keep
    plain = webui.run(ts.txt2img(sampler(), seeds=[5, 6]), cfg2)[0]
    assert torch.equal(under_autocast, plain)  # the autocast did not reach the module or the encoder
    print(f"fp32 on the GPU ({'graphs' if keep else 'eager'}): max |gpu - cpu| =",
          (plain.cpu() - cpu).abs().max().item())
