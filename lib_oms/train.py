"""Train an OMS module: ``python -m lib_oms.train`` (one process) or ``torchrun --nproc_per_node=N -m lib_oms.train``.

The objective is the paper's (Hu et al. 2024, §3.3 and Appendix D): the network sees pure unit noise x_T' (SNR 0)
and the caption's text embedding, and predicts v at SNR 0, v = √ᾱ·ε − √(1 − ᾱ)·x0 = −x0, with an L2 loss; captions
are dropped (replaced by "") at a small rate so OMS CFG works; AdamW with β = (0.9, 0.999) and weight decay 0.01.
The MSE optimum is −E[x0 | caption]: the module learns the caption's mean latent, i.e. its brightness and colour.

Data: a folder of images with same-name .txt captions, encoded by a VAE (``identity`` for pixel space, or a
diffusers AutoencoderKL folder, latents × its scaling factor), or precomputed latents (a .safetensors holding
"latents" [N, C, h, w] and a captions .json list or .txt with one caption per line). Checkpoints are safetensors
(model, flattened AdamW state) plus a JSON of the step and settings: no pickle anywhere. Every random draw of a step
comes from a generator seeded by (seed, step, rank), so a resumed run continues exactly like an uninterrupted one.
The module is written with lib_oms.module_files.save_module in the released folder layout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from .catalog import OPENCLIP_H, SDXL_MIXCLIP
from .demo.text_encoder import KIND as DEMO_WORDS
from .errors import ModuleFileError, OMSError, TextEncoderError
from .module_files import save_module
from .unet import OMSUNet, normalize_unet_config

# Sizes of the paper's family (Appendix D.3). OMS-B's is the released config; S and L follow its pattern of a plain
# first block and cross-attention blocks after it (the released S and L configs were not seen).
PRESETS = {
    "oms-s": {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4]},
    "oms-b": {"block_out_channels": [160, 320, 640], "attention_head_dim": [5, 10, 20]},
    "oms-l": {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20]},
}
TEXT_ENCODER_KINDS = (OPENCLIP_H, SDXL_MIXCLIP, DEMO_WORDS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHECKPOINT_FOLDER = "checkpoint"


def preset_config(size: str, *, latent_channels: int, text_width: int) -> dict:
    """A normalised OMSUNet config of the family member ``size`` for a latent space and a text-encoder width."""
    if size not in PRESETS:
        raise ValueError(f"unknown OMS size {size!r}: choose one of {', '.join(PRESETS)} or give a config.json")
    blocks = len(PRESETS[size]["block_out_channels"])
    raw = {
        **PRESETS[size],
        "in_channels": latent_channels, "out_channels": latent_channels, "cross_attention_dim": text_width,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (blocks - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (blocks - 1) + ["UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": 2, "transformer_layers_per_block": 1,
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "use_linear_projection": False,
    }
    return normalize_unet_config(raw, f"the {size} preset")


@dataclass
class TrainSettings:
    """Hyper-parameters; batch_size is per process (the global batch is batch_size × world size)."""

    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    mixed_precision: str = "no"  # "no" or "bf16" (CUDA autocast)

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be at least 1")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed precision must be 'no' or 'bf16', got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    """What a run produced: the module folder (None on ranks other than 0) and the loss of every step run here."""

    module_path: Path | None
    losses: list[float] = field(default_factory=list)
    step: int = 0


# ------------------------------------------------------------------------------------------------------------------
# Data


def read_captions(path: str | Path) -> list[str]:
    """Captions from a .json list or a .txt file with one caption per line."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        captions = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{path}: expected a JSON list of caption strings")
        return captions
    return path.read_text(encoding="utf-8").splitlines()


def load_latents(path: str | Path, captions_path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Precomputed latents ("latents" [N, C, h, w] in a .safetensors) and their N captions."""
    tensors = load_file(str(path))
    if "latents" not in tensors or tensors["latents"].dim() != 4:
        raise ValueError(f"{path}: expected a tensor named 'latents' of shape [N, C, h, w]")
    latents, captions = tensors["latents"].float(), read_captions(captions_path)
    if len(captions) != len(latents):
        raise ValueError(f"{path} holds {len(latents)} latents but {captions_path} has {len(captions)} captions")
    return latents, captions


def image_caption_pairs(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) for every image in ``folder`` with a same-name .txt beside it, sorted by name."""
    folder = Path(folder)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise ValueError(f"{image} has no caption file {caption.name}: add one (an empty file means no caption)")
        pairs.append((image, caption.read_text(encoding="utf-8").strip()))
    return pairs


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An RGB image resized (short side) and centre-cropped to resolution², as [3, r, r] in −1..1."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.reshape(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0


class IdentityVAE:
    """Pixel space as the latent space: latents are the images in −1..1."""

    scaling_factor = 1.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images


class DiffusersVAE:
    """A diffusers AutoencoderKL folder; latents are the posterior means × the VAE's scaling factor."""

    def __init__(self, folder: str | Path, device: str | torch.device):
        try:
            from diffusers import AutoencoderKL
        except ImportError as error:
            raise OMSError("encoding images with a VAE needs the optional package diffusers (training tool only): "
                           "`pip install diffusers`, or pass precomputed latents with --latents") from error
        self.model = AutoencoderKL.from_pretrained(str(folder)).to(device).eval().requires_grad_(False)
        self.scaling_factor = float(self.model.config.scaling_factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.model.device, self.model.dtype)
        return self.model.encode(images).latent_dist.mean.float().cpu() * self.scaling_factor


def encode_images(pairs: list[tuple[Path, str]], vae, resolution: int, batch_size: int = 16,
                  progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Latents of every image (batched, no gradient) and the captions in the same order."""
    latents = []
    with torch.no_grad():
        for begin in tqdm(range(0, len(pairs), batch_size), desc="encoding images", disable=not progress):
            images = torch.stack([load_image(path, resolution) for path, _ in pairs[begin:begin + batch_size]])
            latents.append(vae.encode(images).float().cpu())
    return torch.cat(latents), [caption for _, caption in pairs]


def load_text_encoder(kind: str, source: str | None, device, dtype=torch.float32):
    """The text encoder of ``kind`` (openclip-h, sdxl-mixclip, demo-words) from ``source``."""
    if kind == DEMO_WORDS:
        from .demo.pipeline import MODELS_DIR, TEXT_ENCODER_FILE
        from .demo.text_encoder import load_text_encoder as load_demo

        return load_demo(source or MODELS_DIR / TEXT_ENCODER_FILE, device)
    if source is None:
        raise TextEncoderError(f"the {kind} text encoder needs --text-encoder PATH (a checkpoint or folder)")
    from . import text_encoders

    if kind == OPENCLIP_H:
        return text_encoders.load_openclip_text_encoder(source, device=device, dtype=dtype)
    if kind == SDXL_MIXCLIP:
        return text_encoders.load_mixclip_text_encoder(source, device=device, dtype=dtype)
    raise TextEncoderError(f"unknown text encoder kind {kind!r}: choose one of {', '.join(TEXT_ENCODER_KINDS)}")


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, no pickle)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state_dict as flat tensors ("state.<param>.<name>") and its param groups (JSON-safe)."""
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{name}"] = tensor.detach().cpu().contiguous()
    groups = [{key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
              for group in state["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, record: dict) -> None:
    """Write model.safetensors, optimizer.safetensors and state.json; each file is replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    record = {**record, "param_groups": groups}
    files = [("model.safetensors", {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}),
             ("optimizer.safetensors", tensors)]
    for name, payload in files:
        partial = folder / f"{name}.partial"
        save_file(payload, str(partial))
        os.replace(partial, folder / name)
    partial = folder / "state.json.partial"
    partial.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(partial, folder / "state.json")


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer from :func:`save_checkpoint`'s files; returns the recorded state."""
    try:
        record = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, record["param_groups"]))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModuleFileError(f"{folder}: cannot resume from this checkpoint ({error}): delete it to start over, "
                              "or point --out at the run that wrote it") from error
    return record


# ------------------------------------------------------------------------------------------------------------------
# Training


def _distributed() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch (WORLD_SIZE > 1), initialising the process group; else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def default_device() -> str:
    """This process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one step on one rank: noise and caption dropout depend on (seed, step, rank) only."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step) * 4099 + rank)


class _BatchIndices:
    """Indices of the samples of each step on this rank, epoch after epoch of DistributedSampler orders."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int):
        self.sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=size >= world)
        self.batch_size, self.per_epoch, self.orders = batch_size, len(self.sampler), {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self.orders:
            self.sampler.set_epoch(epoch)
            self.orders = {epoch: list(iter(self.sampler))}  # one epoch kept: steps run in order
        return self.orders[epoch]

    def __call__(self, step: int) -> list[int]:
        first = step * self.batch_size
        return [self._order(position // self.per_epoch)[position % self.per_epoch]
                for position in range(first, first + self.batch_size)]


def _learning_rate(settings: TrainSettings, step: int) -> float:
    """Constant learning rate after an optional linear warm-up."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    return settings.learning_rate


def train_oms(latents: torch.Tensor, captions: list[str], encoder, unet_config: dict, out: str | Path, *,
              latent_space: str, settings: TrainSettings | None = None, module_name: str = "oms_module",
              resume: bool = False, device: str | torch.device | None = None, fp16_weights: bool = False,
              overwrite: bool = False, progress: bool = True, extra_index: dict | None = None) -> TrainResult:
    """Train an OMS module on ``latents`` [N, C, h, w] (already scaled) and their captions.

    Writes checkpoints to ``out/checkpoint`` every ``settings.checkpoint_every`` steps and the finished module to
    ``out/<module_name>`` with save_module (latent space and text-encoder kind recorded). Under torchrun each
    process trains on its own share of every batch through DistributedDataParallel.
    """
    settings = settings or TrainSettings()
    settings.check()
    if len(captions) != len(latents):
        raise ValueError(f"{len(latents)} latents but {len(captions)} captions")
    if latents.shape[1] != unet_config["in_channels"]:
        raise ValueError(f"the latents have {latents.shape[1]} channels, the module takes {unet_config['in_channels']}")
    if encoder.width != unet_config["cross_attention_dim"]:
        raise TextEncoderError(f"the {encoder.kind} text encoder is {encoder.width}-wide, the module's "
                               f"cross_attention_dim is {unet_config['cross_attention_dim']}")
    out = Path(out)
    module_path = out / module_name
    if module_path.exists() and not overwrite:
        raise ModuleFileError(f"{module_path} already exists: choose another --out or --name, or pass --overwrite")
    rank, world = _distributed()
    device = torch.device(device or default_device())
    if device.type == "cuda" and device.index is not None:  # plain "cuda" is the current device already
        torch.cuda.set_device(device)
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    model = OMSUNet(unet_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=tuple(settings.betas),
                                  weight_decay=settings.weight_decay)
    checkpoint_dir, start_step, losses = out / CHECKPOINT_FOLDER, 0, []
    if resume and (checkpoint_dir / "state.json").is_file():
        record = load_checkpoint(checkpoint_dir, model, optimizer)
        for key in ("batch_size", "seed"):
            if record["settings"][key] != getattr(settings, key):
                raise ValueError(f"{checkpoint_dir} was written with {key}={record['settings'][key]}, this run has "
                                 f"{getattr(settings, key)}: resume with the same settings")
        if record["world_size"] != world:
            raise ValueError(f"{checkpoint_dir} was written by {record['world_size']} processes, this run has {world}")
        start_step = record["step"]
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    else:
        trained = model
    batches = _BatchIndices(len(latents), settings.batch_size, rank, world, settings.seed)
    # No autocast object at all without mixed precision: torch 2.0's initialises CUDA even when disabled.
    autocast = (torch.autocast("cuda", torch.bfloat16) if settings.mixed_precision == "bf16" and device.type == "cuda"
                else contextlib.nullcontext())
    bar = tqdm(range(start_step, settings.steps), initial=start_step, total=settings.steps, desc="OMS training",
               disable=not progress or rank != 0)
    for step in bar:
        generator = _step_generator(settings.seed, step, rank)
        indices = batches(step)
        x0 = latents[indices].to(device, torch.float32)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        dropped = torch.rand(len(indices), generator=generator) < settings.caption_dropout
        prompts = ["" if drop else captions[i] for i, drop in zip(indices, dropped.tolist(), strict=True)]
        context = encoder.encode(prompts).to(device, torch.float32)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, step)
        with autocast:
            v = trained(noise, context)
        loss = F.mse_loss(v.float(), -x0)  # v at SNR 0 is −x0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        reported = loss.detach()
        if world > 1:
            torch.distributed.all_reduce(reported)
            reported /= world
        losses.append(reported.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        done = step + 1
        due = settings.checkpoint_every and (done % settings.checkpoint_every == 0 or done == settings.steps)
        if rank == 0 and due:
            save_checkpoint(checkpoint_dir, model, optimizer,
                            {"step": done, "world_size": world, "settings": asdict(settings),
                             "latent_space": latent_space, "text_encoder": encoder.kind, "unet_config": unet_config,
                             "last_losses": losses[-100:]})
    path = None
    if rank == 0:
        info = {"training": {**asdict(settings), "world_size": world, "samples": len(latents),
                             "final_loss": losses[-1] if losses else None}, **(extra_index or {})}
        path = save_module(module_path, model, unet_config, latent_space=latent_space, text_encoder=encoder.kind,
                           fp16=fp16_weights, extra_index=info, overwrite=overwrite)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(path, losses, settings.steps)


# ------------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lib_oms.train",
        description="Train a One More Step (OMS) module for a latent space and a text encoder.",
        epilog="Multi-GPU: torchrun --nproc_per_node=4 -m lib_oms.train ... (--batch-size is per GPU).")
    data = parser.add_argument_group("data (one of --images or --latents)")
    data.add_argument("--images", help="folder of images with same-name .txt captions")
    data.add_argument("--latents", help=".safetensors with a 'latents' tensor [N, C, h, w] (already scaled)")
    data.add_argument("--captions", help="captions of --latents: a .json list or a .txt, one per line")
    data.add_argument("--vae", default="identity",
                      help="'identity' (pixel space) or a diffusers AutoencoderKL folder (needs diffusers)")
    data.add_argument("--resolution", type=int, default=512, help="image size after resize and centre crop")
    data.add_argument("--save-latents", help="also write the encoded latents here (.safetensors + .json captions)")
    model = parser.add_argument_group("module")
    model.add_argument("--size", default="oms-s", choices=sorted(PRESETS), help="family member (paper App. D.3)")
    model.add_argument("--config", help="a UNet config.json instead of --size (diffusers UNet2DConditionWoCTModel)")
    model.add_argument("--latent-space", required=True, help='recorded in the module: "sd", "sdxl" or your own id')
    model.add_argument("--text-encoder-kind", required=True, choices=TEXT_ENCODER_KINDS)
    model.add_argument("--text-encoder", help="text-encoder weights (checkpoint, folder or file)")
    model.add_argument("--out", required=True, help="output folder (module in OUT/NAME, checkpoints in OUT/checkpoint)")
    model.add_argument("--name", default="oms_module", help="module folder name inside --out")
    model.add_argument("--fp16", action="store_true", help="save fp16 weights (diffusion_pytorch_model.fp16...)")
    model.add_argument("--overwrite", action="store_true", help="replace an existing module folder")
    train = parser.add_argument_group("training")
    defaults = TrainSettings()
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    train.add_argument("--lr", type=float, default=defaults.learning_rate)
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    train.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if it exists")
    train.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    train.add_argument("--device", help="default: cuda (this process's LOCAL_RANK) if available, else cpu")
    return parser


def input_problem(args) -> str | None:
    """What is wrong with the data and output given on the command line, in one line, or None."""
    if bool(args.images) == bool(args.latents):
        return "give exactly one of --images FOLDER or --latents FILE.safetensors"
    if args.images and not Path(args.images).is_dir():
        return f"argument --images: {args.images} is not a folder"
    if args.latents and not Path(args.latents).is_file():
        return f"argument --latents: {args.latents} is not a file"
    if args.latents and not args.captions:
        return "--latents needs --captions (a .json list or a .txt with one caption per line)"
    if args.captions and not Path(args.captions).is_file():
        return f"argument --captions: {args.captions} is not a file"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return f"argument --out: {args.out} is a file, not a folder"
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            return f"argument --{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}"
    if not (math.isfinite(args.lr) and args.lr > 0):
        return f"argument --lr: must be a positive number, got {args.lr}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    problem = input_problem(args)
    if problem:
        parser.error(problem)
    device = args.device or default_device()
    try:
        encoder = load_text_encoder(args.text_encoder_kind, args.text_encoder, device)
        if args.latents:
            latents, captions = load_latents(args.latents, args.captions)
        else:
            vae = IdentityVAE() if args.vae == "identity" else DiffusersVAE(args.vae, device)
            latents, captions = encode_images(image_caption_pairs(args.images), vae, args.resolution)
            if args.save_latents:
                save_file({"latents": latents.contiguous()}, args.save_latents,
                          metadata={"latent_space": args.latent_space})
                Path(args.save_latents).with_suffix(".json").write_text(json.dumps(captions), encoding="utf-8")
        if args.config:
            raw = json.loads(Path(args.config).read_text(encoding="utf-8"))
            config = normalize_unet_config(raw, args.config)
        else:
            config = preset_config(args.size, latent_channels=latents.shape[1], text_width=encoder.width)
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                 weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                                 caption_dropout=args.caption_dropout, seed=args.seed,
                                 checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision)
        result = train_oms(latents, captions, encoder, config, args.out, latent_space=args.latent_space,
                           settings=settings, module_name=args.name, resume=args.resume, device=device,
                           fp16_weights=args.fp16, overwrite=args.overwrite)
    except (OMSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.module_path is not None:
        print(f"saved {result.module_path} (final loss {result.losses[-1] if result.losses else math.nan:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
