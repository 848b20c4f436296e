"""SDXL end to end, once (not in CI): a random SDXL checkpoint, A1111 1.10.1 on it, One More Step on and off.

    python tests/webui/sdxl_end_to_end.py --webui <built A1111 1.10.1 folder> --python <its venv's python> \
        [--work DIR] [--port 7871] [--text-encoder PATH] [--keep]

1. **Checkpoint.** With the WebUI's python (it has `sgm` and its packages), A1111's SDXL config
   (`repositories/generative-models/configs/inference/sd_xl_base.yaml`, the one A1111 picks for SDXL) is built on the
   meta device (no memory), and every parameter is written as random fp16 to `<work>/sdxl_random.safetensors`, one
   tensor at a time (about 7 GB on disk, peak memory about one tensor). Nothing is downloaded: the two CLIP text
   towers are built from their configs, not from a hub.
2. **Modules**, random OMS-B weights written with `lib_oms.save_module` into `<work>/oms/` (the server gets
   `--oms-models-dir <work>/oms`): `oms_b_openclip_xl_random` (SDXL latent space, reads the OpenCLIP-H text encoder,
   as the released SDXL module) and `oms_b_mixclip_xl_random` (reads the checkpoint's own CLIP-L + bigG).
3. **Server.** A1111 on the CPU (`--use-cpu all --no-half --precision full`: fp32, about 14 GB of model) with the
   checkpoint; the OpenCLIP-H encoder is `<webui>/models/oms/text_encoder/` or `--text-encoder`.
4. **Requests**, 64x64 px, 2 steps: OMS off, OMS on with each module. Printed: the time of each step, whether OMS
   applied (infotext) and changed the image, the builder's and the server's peak RSS (VmHWM).

`python tests/webui/sdxl_end_to_end.py keys --webui DIR` (with a python that can import `sgm`) only lists what the
checkpoint would hold and checks that the extension's SDXL "mixclip" loader finds both text towers in it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SDXL_CONFIG = Path("repositories/generative-models/configs/inference/sd_xl_base.yaml")
CHECKPOINT_NAME = "sdxl_random.safetensors"
MODULES = {"oms_b_openclip_xl_random": ("openclip-h", 1024), "oms_b_mixclip_xl_random": ("sdxl-mixclip", 2048)}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint (run with the WebUI's python)

def clip_l_config():
    """CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14), built here so nothing is fetched."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                          hidden_act="quick_gelu")


def sdxl_on_meta(webui: Path):
    """The parts of A1111's SDXL model (sgm DiffusionEngine) that hold weights, from its config, on the meta device,
    under the engine's attribute names: ``model.diffusion_model`` (the UNet), ``conditioner`` (the text encoders and
    size embedders), ``first_stage_model`` (the VAE). The denoiser holds only a schedule the WebUI computes itself."""
    sys.path.insert(0, str(webui / "repositories" / "generative-models"))
    import open_clip
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config
    from transformers import CLIPTextModel, CLIPTokenizer

    config = OmegaConf.load(webui / SDXL_CONFIG)
    params = config.model.params
    params.network_config.params.use_checkpoint = False
    params.network_config.params.spatial_transformer_attn_type = "softmax"  # no xformers needed to build it
    params.first_stage_config.params.ddconfig.attn_type = "vanilla"
    # The text towers from their architectures: no pretrained weights fetched, and open_clip's model left on meta
    # (sgm asks for the CPU).
    CLIPTextModel.from_pretrained = classmethod(lambda cls, *args, **kwargs: cls(clip_l_config()))
    CLIPTokenizer.from_pretrained = classmethod(lambda cls, *args, **kwargs: None)  # not part of the weights
    create = open_clip.create_model_and_transforms
    open_clip.create_model_and_transforms = lambda arch, **kwargs: create(
        arch, **{**kwargs, "device": torch.device("meta"), "pretrained": None})
    engine, engine.model = torch.nn.Module(), torch.nn.Module()
    with torch.device("meta"):
        engine.model.diffusion_model = instantiate_from_config(params.network_config)
        engine.conditioner = instantiate_from_config(params.conditioner_config)
        engine.first_stage_model = instantiate_from_config(params.first_stage_config)
    return engine


def checkpoint_tensors(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of what the checkpoint holds: every parameter in fp16, and the CLIP position ids."""
    entries = {name: (tuple(p.shape), torch.float16) for name, p in model.named_parameters()}
    for name, buffer in model.named_buffers():
        if name.endswith("position_ids"):
            entries[name] = (tuple(buffer.shape), torch.int64)
    return entries


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator) -> torch.Tensor:
    """Weights ~ N(0, 1/fan_in), 1-D weights (norm scales) ~ 1 + N(0, 0.02²), biases ~ N(0, 0.02²): no layer is zero
    (zero-initialised output layers would make the UNet predict exactly nothing)."""
    if dtype == torch.int64:
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    tensor = torch.randn(shape, generator=generator)
    if name.endswith("bias") or len(shape) == 0:
        tensor *= 0.02
    elif len(shape) == 1:
        tensor = 1 + 0.02 * tensor
    else:
        tensor /= math.sqrt(math.prod(shape[1:]))
    return tensor.to(dtype)


def write_safetensors_streaming(path: Path, entries: dict, make) -> int:
    """A safetensors file written tensor by tensor: ``make(name, shape, dtype)`` gives each tensor just before it is
    written, so memory holds one tensor at a time. Returns the file's size."""
    header, offset = {}, 0
    for name, (shape, dtype) in entries.items():
        size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        for name, (shape, dtype) in entries.items():
            tensor = make(name, shape, dtype)
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(partial, path)
    return path.stat().st_size


def build_checkpoint(webui: Path, out: Path, seed: int = 0) -> dict:
    started = time.perf_counter()
    entries = checkpoint_tensors(sdxl_on_meta(webui))
    generator = torch.Generator().manual_seed(seed)
    size = write_safetensors_streaming(out, entries,
                                       lambda name, shape, dtype: random_tensor(name, shape, dtype, generator))
    return {"checkpoint": str(out), "tensors": len(entries), "bytes": size,
            "parameters": sum(math.prod(s) for s, d in entries.values() if d == torch.float16),
            "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def check_keys(webui: Path) -> dict:
    """What the checkpoint would hold, and that the extension's mixclip loader finds SDXL's two text towers in it."""
    sys.path.insert(0, str(ROOT))
    from lib_oms import text_encoders

    entries = checkpoint_tensors(sdxl_on_meta(webui))
    shapes = {name: shape for name, (shape, _dtype) in entries.items()}
    towers = text_encoders._find_towers(shapes)
    for spec in (text_encoders.CLIP_VIT_L14, text_encoders.OPENCLIP_VIT_BIGG14):
        text_encoders._pick_tower(towers, spec, CHECKPOINT_NAME, "")
    prefixes = sorted({name.split(".")[0] + "." + name.split(".")[1] for name in entries})
    return {"tensors": len(entries), "parameters": sum(math.prod(s) for s, d in entries.values() if d == torch.float16),
            "prefixes": prefixes, "text_towers": len(towers)}


# ---------------------------------------------------------------------------------------------------------------
# Modules, server, requests (run with any python that has this project's requirements)

def write_modules(folder: Path, config_of=None) -> None:
    """MODULES as random OMS-B modules; ``config_of(text width)`` gives another config (tests use tiny ones)."""
    sys.path.insert(0, str(ROOT))
    from lib_oms import save_module
    from tests.factories import oms_b_config, random_state_dict

    for name, (text_encoder, width) in MODULES.items():
        config = (config_of or (lambda text_width: oms_b_config(cross_attention_dim=text_width)))(width)
        save_module(folder / name, random_state_dict(config, seed=width), config, latent_space="sdxl",
                    text_encoder=text_encoder, fp16=True, overwrite=True)


def server_command(python: str, checkpoint: Path, port: int, modules: Path) -> list[str]:
    return [python, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-python-version-check",
            "--skip-version-check", "--no-download-sd-model", "--api", "--server-name", "127.0.0.1", "--port",
            str(port), "--ckpt", str(checkpoint), "--use-cpu", "all", "--no-half", "--precision", "full",
            "--oms-models-dir", str(modules)]


def peak_rss_gib(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return float("nan")


def call(url: str, path: str, body: dict | None = None, timeout: float = 3600) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, {"text": error.read().decode(errors="replace")[:2000]}


def wait_until_ready(url: str, process, limit_s: float = 1800) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}: see its log")
        try:
            if call(url, "/sdapi/v1/options", timeout=10)[0] == 200:
                return round(time.perf_counter() - started, 1)
        except OSError:
            pass
        time.sleep(5)
    raise SystemExit(f"the server did not answer within {limit_s} s")


def payload(oms: dict | None) -> dict:
    body = {"prompt": "a black cat in a dark room", "seed": 1234, "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler a", "cfg_scale": 7.0, "save_images": False, "send_images": True}
    if oms is not None:
        body["alwayson_scripts"] = {"One More Step": {"args": [oms]}}
    return body


def run_requests(url: str) -> list[dict]:
    results, images = [], {}
    for label, oms in [("off", None)] + [(name, {"enabled": True, "module": name}) for name in MODULES]:
        started = time.perf_counter()
        status, reply = call(url, "/sdapi/v1/txt2img", payload(oms))
        seconds = round(time.perf_counter() - started, 1)
        info = json.loads(reply["info"]) if status == 200 else {}
        infotext = (info.get("infotexts") or [""])[0]
        images[label] = reply.get("images", [None])[0]
        results.append({"request": label, "status": status, "seconds": seconds,
                        "oms_applied": "OMS: True" in infotext, "infotext": infotext[-300:] or reply.get("text")})
    for result in results[1:]:
        result["image_differs_from_off"] = images[result["request"]] != images["off"]
    return results


def end_to_end(args) -> dict:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / CHECKPOINT_NAME
    summary = {}
    if not checkpoint.is_file():
        built = subprocess.run([args.python, str(Path(__file__).resolve()), "build", "--webui", str(args.webui),
                                "--out", str(checkpoint)], check=True, capture_output=True, text=True)
        summary["build"] = json.loads(built.stdout.strip().splitlines()[-1])
    write_modules(work / "oms")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    url = f"http://127.0.0.1:{args.port}"
    settings = args.webui / "config.json"  # the options this run sets are saved there: put back afterwards
    saved = settings.read_bytes() if settings.is_file() else None
    with open(work / "server.log", "w") as log:
        process = subprocess.Popen(server_command(args.python, checkpoint, args.port, work / "oms"), cwd=args.webui,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        summary["server_ready_seconds"] = wait_until_ready(url, process)
        # SDXL's live-preview approximation is downloaded on first use: no previews offline
        options = {"live_previews_enable": False}
        if args.text_encoder:
            options["oms_text_encoder_path"] = str(args.text_encoder)
        call(url, "/sdapi/v1/options", options)
        summary["requests"] = run_requests(url)
        summary["server_peak_rss_gib"] = peak_rss_gib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=120)
        if saved is None:
            settings.unlink(missing_ok=True)
        else:
            settings.write_bytes(saved)
    if not args.keep:
        checkpoint.unlink()
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    build = sub.add_parser("build", help="write the random SDXL checkpoint (run with the WebUI's python)")
    build.add_argument("--webui", type=Path, required=True)
    build.add_argument("--out", type=Path, required=True)
    keys = sub.add_parser("keys", help="list what the checkpoint would hold (a python that imports sgm)")
    keys.add_argument("--webui", type=Path, required=True)
    parser.add_argument("--webui", type=Path, help="the built A1111 1.10.1 folder")
    parser.add_argument("--python", help="the WebUI's python (its virtual environment)")
    parser.add_argument("--work", type=Path, default=Path("sdxl_end_to_end"), help="where files and the log go")
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--text-encoder", type=Path, help="the OpenCLIP-H text encoder (default: the WebUI's "
                        "models/oms/text_encoder/)")
    parser.add_argument("--keep", action="store_true", help="keep the 7 GB checkpoint for another run")
    args = parser.parse_args(argv)
    if args.command is None and (args.webui is None or args.python is None):
        parser.error("--webui and --python are required")
    if args.webui is not None and not (args.webui / SDXL_CONFIG).is_file():
        parser.error(f"{args.webui} is not a built A1111 1.10.1 folder: {SDXL_CONFIG} is missing")
    # absolute (the server runs in the WebUI's folder), without resolving links (a venv's python is one)
    for name in ("webui", "python", "work", "text_encoder", "out"):
        if getattr(args, name, None) is not None:
            setattr(args, name, type(getattr(args, name))(os.path.abspath(getattr(args, name))))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "build":
        result = build_checkpoint(args.webui, args.out)
    elif args.command == "keys":
        result = check_keys(args.webui)
    else:
        result = end_to_end(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
