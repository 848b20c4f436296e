"""The OMS trainer (lib_oms.train): objective, outputs in the released layout, safetensors checkpoints and exact
resume, data sources, DDP on CPU (gloo)."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import torch
from safetensors.torch import save_file

from lib_oms.demo.text_encoder import DemoTextEncoder, save_text_encoder
from lib_oms.engine import oms_start, seeded_unit_noise
from lib_oms.errors import OMSError
from lib_oms.module_files import load_module
from lib_oms.step import SamplerStart
from lib_oms.train import (
    TrainSettings,
    _flatten_optimizer,
    _unflatten_optimizer,
    encode_images,
    image_caption_pairs,
    main,
    preset_config,
    train_oms,
)
from lib_oms.unet import OMSUNet, normalize_unet_config
from tests.factories import tiny_unet_config

WORDS = ("dark", "bright", "red", "blue")


def tiny_data(count: int = 48, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Latents [count, 4, 8, 8] whose mean depends on the caption: −0.8 "dark", +0.8 "bright", ±0.5 on channel 0."""
    generator = torch.Generator().manual_seed(seed)
    captions = [WORDS[i % len(WORDS)] for i in range(count)]
    latents = 0.1 * torch.randn(count, 4, 8, 8, generator=generator)
    for latent, caption in zip(latents, captions, strict=True):
        latent += {"dark": -0.8, "bright": 0.8}.get(caption, 0.0)
        latent[0] += {"red": 0.5, "blue": -0.5}.get(caption, 0.0)
    return latents, captions


def tiny_encoder() -> DemoTextEncoder:
    torch.manual_seed(0)
    return DemoTextEncoder(width=32, max_length=4).eval().requires_grad_(False)


def tiny_config() -> dict:
    return normalize_unet_config(tiny_unet_config(), "tiny test config")


def settings(**overrides) -> TrainSettings:
    values = {"steps": 60, "batch_size": 12, "learning_rate": 3e-3, "seed": 3, "checkpoint_every": 0}
    return TrainSettings(**{**values, **overrides})


def test_loss_falls_and_module_loads_for_oms_start(tmp_path):
    latents, captions = tiny_data()
    encoder = tiny_encoder()
    result = train_oms(latents, captions, encoder, tiny_config(), tmp_path, latent_space="test-space",
                       settings=settings(steps=40, batch_size=8, learning_rate=3e-3), module_name="tiny",
                       progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    module = load_module(result.module_path)
    assert (module.latent_space, module.text_encoder) == ("test-space", "demo-words")
    index = json.loads((result.module_path / "model_index.json").read_text())
    assert index["training"]["steps"] == 40 and index["training"]["weight_decay"] == 0.01
    # v ≈ −E[x0 | caption]: "dark" latents average −0.8, so the predicted x̂0 = −v is dark.
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    x0_dark, x0_bright = (-module.unet(noise, encoder.encode(["dark", "bright"]))).mean(dim=(1, 2, 3)).tolist()
    assert x0_dark < -0.3 and x0_bright > 0.3
    start = SamplerStart.k_diffusion(14.6146)
    out = oms_start(module, encoder, noise, ["dark", "bright"], start=start, z=seeded_unit_noise([1, 2], (4, 8, 8)))
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_adamw_hyper_parameters_are_the_papers():
    defaults = TrainSettings()
    assert defaults.betas == (0.9, 0.999) and defaults.weight_decay == 0.01 and defaults.caption_dropout > 0


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    latents, captions = tiny_data(20)  # 20 samples, batch 12: batches cross epoch boundaries
    encoder, config = tiny_encoder(), tiny_config()
    whole = train_oms(latents, captions, encoder, config, tmp_path / "whole", latent_space="t",
                      settings=settings(steps=8, checkpoint_every=4), progress=False)
    first = train_oms(latents, captions, encoder, config, tmp_path / "split", latent_space="t",
                      settings=settings(steps=4, checkpoint_every=4), progress=False)
    checkpoint = tmp_path / "split" / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                            "state.json"]
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 4
    rest = train_oms(latents, captions, encoder, config, tmp_path / "split", latent_space="t",
                     settings=settings(steps=8, checkpoint_every=4), resume=True, overwrite=True, progress=False)
    assert first.losses + rest.losses == whole.losses
    whole_unet, split_unet = load_module(whole.module_path).unet, load_module(rest.module_path).unet
    for (key, a), b in zip(whole_unet.state_dict().items(), split_unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_resume_refuses_other_settings(tmp_path):
    latents, captions = tiny_data(20)
    encoder, config = tiny_encoder(), tiny_config()
    train_oms(latents, captions, encoder, config, tmp_path, latent_space="t",
              settings=settings(steps=2, checkpoint_every=2), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_oms(latents, captions, encoder, config, tmp_path, latent_space="t", overwrite=True, resume=True,
                  settings=settings(steps=4, batch_size=6, checkpoint_every=2), progress=False)


def test_optimizer_state_flattens_to_tensors_and_back():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    assert all(isinstance(value, torch.Tensor) for value in tensors.values())
    json.dumps(groups)
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(_unflatten_optimizer(tensors, json.loads(json.dumps(groups))))
    for a, b in zip(optimizer.state_dict()["state"].values(), restored.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(a[name], b[name]) for name in ("exp_avg", "exp_avg_sq"))


def test_refuses_mismatched_encoder_and_existing_module(tmp_path):
    latents, captions = tiny_data(8)
    with pytest.raises(OMSError, match="32"):
        train_oms(latents, captions, DemoTextEncoder(width=16), tiny_config(), tmp_path, latent_space="t",
                  settings=settings(steps=1), progress=False)
    train_oms(latents, captions, tiny_encoder(), tiny_config(), tmp_path, latent_space="t",
              settings=settings(steps=1), progress=False)
    with pytest.raises(OMSError, match="already exists"):
        train_oms(latents, captions, tiny_encoder(), tiny_config(), tmp_path, latent_space="t",
                  settings=settings(steps=1), progress=False)


def test_presets_are_the_paper_family():
    small = preset_config("oms-s", latent_channels=4, text_width=1024)
    assert small["block_out_channels"] == [32, 64, 64] and small["cross_attention_dim"] == 1024
    assert preset_config("oms-b", latent_channels=4, text_width=1024)["block_out_channels"] == [160, 320, 640]
    large = preset_config("oms-l", latent_channels=4, text_width=2048)
    assert len(large["down_block_types"]) == 4


def test_command_line_with_precomputed_latents(tmp_path, capsys):
    latents, captions = tiny_data(16)
    save_file({"latents": latents}, str(tmp_path / "latents.safetensors"))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    save_text_encoder(DemoTextEncoder(width=64), tmp_path / "te.safetensors")
    code = main(["--latents", str(tmp_path / "latents.safetensors"), "--captions", str(tmp_path / "captions.json"),
                 "--latent-space", "test-space", "--text-encoder-kind", "demo-words",
                 "--text-encoder", str(tmp_path / "te.safetensors"), "--size", "oms-s", "--steps", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "run"), "--name", "mine", "--fp16"])
    assert code == 0, capsys.readouterr().err
    module = load_module(tmp_path / "run" / "mine")
    assert module.config["block_out_channels"] == [32, 64, 64] and module.latent_space == "test-space"
    assert (tmp_path / "run" / "mine" / "oms_module" / "diffusion_pytorch_model.fp16.safetensors").is_file()


def test_images_folder_with_identity_vae(tmp_path):
    from PIL import Image

    for name, colour in (("black", (0, 0, 0)), ("white", (255, 255, 255))):
        Image.new("RGB", (20, 12), colour).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {name} image\n")
    from lib_oms.train import IdentityVAE

    latents, captions = encode_images(image_caption_pairs(tmp_path), IdentityVAE(), resolution=8, progress=False)
    assert latents.shape == (2, 3, 8, 8) and captions == ["a black image", "a white image"]
    assert latents[0].max() == -1.0 and latents[1].min() == 1.0
    Image.new("RGB", (8, 8)).save(tmp_path / "orphan.png")
    with pytest.raises(ValueError, match="orphan.txt"):
        image_caption_pairs(tmp_path)


def test_vae_without_diffusers_says_what_to_do(monkeypatch):
    from lib_oms.train import DiffusersVAE

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(OMSError, match="pip install diffusers"):
        DiffusersVAE("somewhere", "cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    latents, captions = tiny_data(16)
    try:
        result = train_oms(latents, captions, tiny_encoder(), tiny_config(), out, latent_space="t", device="cpu",
                           settings=settings(steps=3, batch_size=4, checkpoint_every=3), progress=False)
        (__import__("pathlib").Path(out) / f"losses{rank}.json").write_text(json.dumps(result.losses))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two fresh processes import torch: about 10 s
def test_ddp_two_cpu_processes(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    losses = [json.loads((tmp_path / f"losses{rank}.json").read_text()) for rank in range(2)]
    assert losses[0] == losses[1] and len(losses[0]) == 3  # the all-reduced loss is the same on both ranks
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["world_size"] == 2
    module = load_module(tmp_path / "oms_module")
    assert isinstance(module.unet, OMSUNet)


@pytest.mark.parametrize("argv, words", [
    (["--images", "/no/such/folder"], "argument --images: /no/such/folder is not a folder"),
    (["--latents", "/no/such.safetensors", "--captions", "c.json"], "argument --latents: /no/such.safetensors is not"),
    ([], "give exactly one of --images FOLDER or --latents FILE.safetensors"),
    (["--images", ".", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--images", ".", "--lr", "nan"], "argument --lr: must be a positive number, got nan"),
])
def test_the_command_line_refuses_bad_input_in_one_line_before_any_work(monkeypatch, capsys, argv, words):
    import lib_oms.train as train

    monkeypatch.setattr(train, "load_text_encoder", lambda *a: pytest.fail("the trainer started working"))
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--latent-space", "sd", "--text-encoder-kind", "demo-words", "--out", "/tmp/oms-unused"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and words in error
