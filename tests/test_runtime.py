"""The host-neutral OMS runtime: what it finds, loads and keeps for a host, and what it makes of one batch's start."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
import torch
from tiny_oms_files import MODULE, SDXL_MODULE, tiny_encoder_loader, write_oms_folder

from lib_oms import module_files, text_encoders
from lib_oms.catalog import OPENCLIP_H
from lib_oms.engine import oms_start
from lib_oms.errors import LatentSpaceError, ModuleMissingError, TextEncoderMissingError
from lib_oms.runtime import Choice, Host, Inpainting, ModelText, OMSRuntime, corrected_start
from lib_oms.step import SamplerStart
from tests.factories import TEST_WORDS

SIGMA0 = 14.614641


@pytest.fixture
def oms(tmp_path, monkeypatch):
    """A module folder as a user has it (tiny SD and SDXL modules, a tiny OpenCLIP text encoder)."""
    monkeypatch.setattr(text_encoders, "load_openclip_text_encoder", tiny_encoder_loader())
    return write_oms_folder(tmp_path / "oms")


def host_of(*dirs, **kwargs) -> Host:
    return Host(TEST_WORDS, tuple(dirs), hub_dir=dirs[0].parent / "no-hub-cache", **kwargs)


def record_loads(monkeypatch) -> list:
    loads = []
    real = module_files.load_module
    monkeypatch.setattr(module_files, "load_module", lambda path, *a, **k: loads.append(path.name) or real(path, *a,
                                                                                                           **k))
    return loads


# ---------------------------------------------------------------------------------------------------------------
# Finding, loading, keeping


def test_prepare_loads_once_and_keeps_module_and_encoder(oms):
    runtime = OMSRuntime()
    first = runtime.prepare(Choice(), "sd", host_of(oms))
    assert first.name == MODULE and first.label == f"{MODULE} [{first.module.short_hash}]"
    assert first.encoder_source.path == oms / "text_encoder"
    assert first.loaded == (f"module {oms / MODULE} (sd, openclip-h)",
                            f"text encoder {oms / 'text_encoder'} (openclip-h, penultimate)")
    again = runtime.prepare(Choice(), "sd", host_of(oms))
    assert again.module is first.module and again.encoder is first.encoder and again.loaded == ()


def test_a_file_changed_on_disk_is_loaded_again_and_the_old_one_freed(oms, monkeypatch):
    released = []
    monkeypatch.setattr(module_files.OMSModule, "release_graphs", lambda self: released.append(self.name))
    runtime = OMSRuntime()
    first = runtime.prepare(Choice(), "sd", host_of(oms))
    weights = first.module.weights_path
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = runtime.prepare(Choice(), "sd", host_of(oms))
    assert again.module is not first.module and again.encoder is first.encoder
    assert again.loaded == (f"module {oms / MODULE} (sd, openclip-h)",) and released == [MODULE]


def test_what_is_kept_is_bounded_per_kind(oms, monkeypatch):
    for name in ("oms_second_15_21", "oms_third_15_21"):
        shutil.copytree(oms / MODULE, oms / name)
    released = []
    monkeypatch.setattr(module_files.OMSModule, "release_graphs", lambda self: released.append(self.name))
    loads = record_loads(monkeypatch)
    runtime = OMSRuntime(modules_kept=2, encoders_kept=1)
    prepared = {name: runtime.prepare(Choice(name), "sd", host_of(oms))
                for name in (MODULE, "oms_second_15_21", "oms_third_15_21")}
    assert released == [MODULE]  # the least recently used module went, with its CUDA graphs
    assert runtime.prepare(Choice("oms_third_15_21"), "sd", host_of(oms)).module is \
        prepared["oms_third_15_21"].module
    assert runtime.prepare(Choice(MODULE), "sd", host_of(oms)).module is not prepared[MODULE].module
    assert loads == [MODULE, "oms_second_15_21", "oms_third_15_21", MODULE]
    encoders = {id(p.encoder) for p in prepared.values()}
    assert len(encoders) == 1  # one encoder served them all: modules and encoders are bounded apart


def test_a_companion_lives_and_goes_with_its_model(oms):
    runtime = OMSRuntime(modules_kept=1)
    ready = runtime.prepare(Choice(), "sd", host_of(oms))
    made = []
    make = lambda model: made.append(model) or object()  # noqa: E731
    companion = runtime.companion(ready.module, make)
    assert runtime.companion(ready.module, make) is companion and made == [ready.module]
    runtime.prepare(Choice(SDXL_MODULE), "sdxl", host_of(oms))  # the only kept module is now the SDXL one
    assert runtime.companion(ready.module, make) is not companion and len(made) == 2  # no longer kept


def test_the_models_own_text_encoder_comes_first_and_is_kept_per_model(oms):
    asked = []
    text = oms / "text_encoder"

    def model_text(identity):
        return ModelText(frozenset([OPENCLIP_H]), (identity,), lambda: asked.append(identity) or text)

    runtime = OMSRuntime()
    a = runtime.prepare(Choice(), "sd", host_of(oms), model_text("a"))
    assert a.encoder_source.origin == "model" and asked == ["a"]
    assert a.loaded[-1] == "text encoder the loaded model's own text encoder (openclip-h, penultimate)"
    assert runtime.prepare(Choice(), "sd", host_of(oms), model_text("a")).encoder is a.encoder
    b = runtime.prepare(Choice(), "sd", host_of(oms), model_text("b"))
    assert b.encoder is not a.encoder and asked == ["a", "b"]
    assert runtime.prepare(Choice(), "sd", host_of(oms)).encoder_source.origin == "file"


def test_a_module_of_another_latent_space_is_refused_before_anything_is_loaded(oms, monkeypatch):
    loads = record_loads(monkeypatch)
    with pytest.raises(LatentSpaceError, match=f"'{SDXL_MODULE}' was made for the 'sdxl' latent space"):
        OMSRuntime().prepare(Choice(SDXL_MODULE), "sd", host_of(oms))
    assert loads == []


def test_missing_files_say_why_nothing_was_downloaded_in_the_hosts_words(tmp_path):
    empty = tmp_path / "oms"
    empty.mkdir()
    with pytest.raises(ModuleMissingError) as missing:
        OMSRuntime().prepare(Choice(), "sd", host_of(empty, download_refused="downloading is off (the test)"))
    message = str(missing.value)
    assert "Not downloaded: downloading is off (the test)" in message
    assert f"into {empty / 'oms_b_openclip_15_21'}" in message and "h1t/oms_b_openclip_15_21" in message
    write_oms_folder(empty)
    shutil.rmtree(empty / "text_encoder")
    with pytest.raises(TextEncoderMissingError) as missing:
        OMSRuntime().prepare(Choice(), "sd", host_of(empty, download_refused="downloading is off (the test)"))
    message = str(missing.value)
    assert f"(searched {empty / 'text_encoder'}, the test host's other places and " in message
    assert "encoder in the test host's text-encoder setting, or run:" in message
    assert "Settings" not in message  # another host's words never reach this one's user


def test_a_stopped_download_asks_the_host(tmp_path, monkeypatch):
    empty = tmp_path / "oms"
    empty.mkdir()
    seen = {}

    def obtain(latent_space, models_dir, missing, **kwargs):
        seen.update(kwargs)
        raise missing

    monkeypatch.setattr("lib_oms.download.obtain_module", obtain)
    stop, progress = (lambda: True), (lambda text: None)
    with pytest.raises(ModuleMissingError):
        OMSRuntime().prepare(Choice(), "sd", host_of(empty, download_refused=None, should_stop=stop,
                                                    progress=progress))
    assert seen["should_stop"] is stop and seen["progress"] is progress and seen["refused"] is None


# ---------------------------------------------------------------------------------------------------------------
# One batch


@pytest.fixture
def prepared(oms):
    return OMSRuntime().prepare(Choice(), "sd", host_of(oms))


def unit(seed, batch=2):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class Placed:
    def __init__(self):
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        yield


def test_a_reason_or_a_zero_terminal_snr_start_leaves_the_noise_and_does_no_work(prepared):
    placed, drawn = Placed(), []
    for start, reason in (("the host's reason", "the host's reason"),
                          (SamplerStart.timestep(4.9e-8), "zero-terminal-SNR schedule")):
        outcome = corrected_start(prepared, unit(1), start, prompts=["a", "b"], draw_z=lambda: drawn.append(1),
                                  placed=placed)
        assert outcome.noise is None and reason in outcome.skipped and outcome.notes == ()
    assert placed.entered == 0 and drawn == []


@pytest.mark.parametrize("solver, draws", [("SDE", 1), ("ddim", 0)])
def test_an_applied_start_is_the_engines_and_draws_z_only_for_the_sde_solver(prepared, solver, draws):
    placed, drawn = Placed(), []
    noise, z = unit(1), unit(2)
    start = SamplerStart.k_diffusion(SIGMA0)
    outcome = corrected_start(prepared, noise, start, prompts=["a dark room", "night"], negative_prompt="grey",
                              cfg=1.5, solver=solver, draw_z=lambda: drawn.append(1) or z, placed=placed)
    expected = oms_start(prepared.module, prepared.encoder, noise, ["a dark room", "night"], start=start, cfg=1.5,
                         negative_prompt="grey", solver=solver, z=z if draws else None)
    assert torch.equal(outcome.noise, expected) and outcome.skipped is None
    assert len(drawn) == draws and placed.entered == 1


def test_a_prompt_longer_than_the_encoder_reads_is_noted(prepared):
    outcome = corrected_start(prepared, unit(1, batch=1), SamplerStart.k_diffusion(SIGMA0),
                              prompts=["dark " * 80], solver="DDIM")
    assert outcome.notes == ("a prompt is longer than the 75 tokens the OMS text encoder reads: OMS reads only its "
                             "beginning. Put the words for light and colour first, or write them in the OMS prompt",)


def test_an_inpainting_starts_at_the_oms_latent_inside_the_mask_only(prepared):
    noise, init = unit(1), unit(3)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    start = SamplerStart.k_diffusion(SIGMA0)
    plain = corrected_start(prepared, noise, start, prompts=["a", "b"], solver="DDIM").noise
    out = corrected_start(prepared, noise, start, prompts=["a", "b"], solver="DDIM",
                          inpainting=Inpainting(init, mask, SIGMA0)).noise
    sampler_start = init + SIGMA0 * out  # what the sampler starts from
    oms_latent = SIGMA0 * plain  # the OMS latent in k-diffusion units
    assert torch.allclose(sampler_start[..., :4], oms_latent[..., :4], atol=1e-4)
    assert torch.equal(out[..., 4:], noise[..., 4:])
