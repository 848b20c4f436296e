"""Runs in a real ComfyUI's Python (test_comfyui.py starts it): samples with tiny random SD 1.5- and SDXL-shaped
models (the SDXL refiner and Playground 2.5 among them) through ComfyUI's own KSampler, KSamplerAdvanced and
SamplerCustomAdvanced, with and without the One More Step nodes, and writes as JSON, per case, what the sampler's
first model call gets against what it should get.

    COMFYUI_PYTHON tests/comfyui/probe_sampling.py COMFYUI_PATH WORK_DIR OUT_JSON

WORK_DIR becomes ComfyUI's --base-directory (its models/oms gets tiny OMS files); nothing of COMFYUI_PATH changes.

Per case: ``expect`` "oms" (the first x must be x̂0 + σ₀·z: ``diff`` against it, ``scale`` its size, ``plain_diff``
how far it is from the plain run) or "skipped" (``diff`` against the plain run, which must be 0); inpainting cases
add ``outside``, the difference to the plain run outside the mask (0). ``sigma0`` is the first call's σ, ``module``
the OMS module "Automatic" must pick for the family (None: none fits), ``said`` what the nodes logged while they ran.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple

COMFYUI, WORK, OUT = (Path(arg) for arg in sys.argv[1:4])
REPO = Path(__file__).resolve().parents[2]
sys.argv = ["main.py", "--cpu", "--base-directory", str(WORK)]
sys.path[:0] = [str(COMFYUI), str(REPO), str(REPO / "tests")]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402
from comfy_extras import nodes_custom_sampler, nodes_model_advanced  # noqa: E402
from tiny_oms_files import MODULE, SDXL_MODULE, tiny_encoder_loader, write_oms_folder  # noqa: E402

from lib_oms import text_encoders  # noqa: E402
from lib_oms.engine import Z_SEED_OFFSET  # noqa: E402
from lib_oms.module_files import load_module  # noqa: E402

text_encoders.load_openclip_text_encoder = tiny_encoder_loader()  # the tiny architecture of the test files
oms = write_oms_folder(WORK / "models" / "oms")
from oms_comfyui import nodes  # noqa: E402

PROMPT, SEED = "a dark room at night", 7
TINY_UNET = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1], "channel_mult": [1],
             "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
             "context_dim": 32, "use_linear_in_transformer": False, "adm_in_channels": None,
             "use_temporal_attention": False, "use_spatial_transformer": True, "legacy": False, "image_size": 32}
# SDXL's UNet reads its pooled text embedding and size conditioning (1280 + 6·256, the refiner 1280 + 5·256) through a
# "sequential" label embedding; its attention has 64 channels a head (ComfyUI sets that for every model but SD 1.x).
TINY_XL = {**TINY_UNET, "model_channels": 64, "adm_in_channels": 2816, "num_classes": "sequential",
           "use_linear_in_transformer": True}
# By family: ComfyUI's model config, its UNet config, the state-dict keys its model detection reads (Playground 2.5
# is an SDXL checkpoint with edm_mean/edm_std: its own latent format on an EDM schedule), and the OMS module that
# "Automatic" must pick (None: OMS must skip the model).
class Family(NamedTuple):
    config: type
    unet: dict
    detected_keys: tuple[str, ...]
    module: str | None


FAMILIES = {
    "sd15": Family(comfy.supported_models.SD15, TINY_UNET, (), MODULE),
    "sdxl": Family(comfy.supported_models.SDXL, TINY_XL, (), SDXL_MODULE),
    "sdxl refiner": Family(comfy.supported_models.SDXLRefiner, {**TINY_XL, "adm_in_channels": 2560}, (), None),
    "playground 2.5": Family(comfy.supported_models.SDXL, TINY_XL, ("edm_mean", "edm_std"), None),
}

# Model patches of ComfyUI's own nodes, by name: (node class, its inputs after the model).
SAMPLING_PATCHES = {
    "v_prediction": (nodes_model_advanced.ModelSamplingDiscrete, ("v_prediction", False)),
    "lcm": (nodes_model_advanced.ModelSamplingDiscrete, ("lcm", False)),
    "zsnr": (nodes_model_advanced.ModelSamplingDiscrete, ("eps", True)),
    "edm": (nodes_model_advanced.ModelSamplingContinuousEDM, ("eps", 120.0, 0.002)),
    "flow": (nodes_model_advanced.ModelSamplingSD3, (3.0,)),
}


def tiny_model(family: str):
    torch.manual_seed(0)
    chosen = FAMILIES[family]
    config = chosen.config(dict(chosen.unet))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({key: torch.zeros(1, 4, 1, 1) for key in chosen.detected_keys})
    with torch.no_grad():
        for parameter in model.diffusion_model.parameters():  # ComfyUI's layers start uninitialised
            parameter.copy_(torch.randn_like(parameter) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def patch_sampling(model, name: str | None):
    if name is None:
        return model
    node, inputs = SAMPLING_PATCHES[name]
    return node().patch(model, *inputs)[0]


def watched(model, seen: list):
    """The model with a unet wrapper that keeps the input x and σ of every model call."""
    model = model.clone()

    def wrapper(apply_model, args):
        seen.append((args["input"].detach().clone(), float(args["timestep"].flatten()[0])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    return model


def oms_loader():
    return nodes.OMSLoader.execute("Automatic", "Automatic", "penultimate", "Automatic", False).args[0]


def latent(kind: str) -> dict:
    shape = (2, 4, 8, 8)
    if kind == "empty":
        return {"samples": torch.zeros(shape)}
    if kind == "from batch":  # as Latent From Batch leaves it: images 2 and 0 of a batch
        return {"samples": torch.zeros(shape), "batch_index": [2, 0]}
    image = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    if kind == "image":
        return {"samples": image}
    mask = torch.zeros(2, 64, 64)
    mask[:, :, :32] = 1  # the left half: latent columns 0–3
    return {"samples": image, "noise_mask": mask}


def positive():
    return [[torch.zeros(1, 77, 32), {"pooled_output": torch.zeros(1, 1280)}]]  # SD 1.5 ignores the pooled output


def ksampler(model, case, lat):
    """KSampler, or KSamplerAdvanced (add noise, start at step) when the case sets them."""
    return comfy_nodes.common_ksampler(model, SEED, case["steps"], 1.0, case["sampler"], case["scheduler"],
                                       positive(), positive(), lat, denoise=case.get("denoise", 1.0),
                                       disable_noise=not case.get("add_noise", True),
                                       start_step=case.get("start_at_step"))


def custom_advanced(model, case, lat, noise=None):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive(), positive())
    guider.set_cfg(1.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), case["scheduler"],
                                             case["steps"])
    noise = noise(sigmas) if noise is not None else nodes_custom_sampler.Noise_RandomNoise(SEED)
    return nodes_custom_sampler.SamplerCustomAdvanced.execute(noise, guider, comfy.samplers.sampler_object(
        case["sampler"]), sigmas, lat)


@contextlib.contextmanager
def console():
    """What the nodes log meanwhile (ComfyUI shows INFO in its console)."""
    said = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield said
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def first_x(run, model, case) -> tuple[torch.Tensor, float]:
    seen = []
    run(watched(model, seen), case, latent(case["latent"]))
    return seen[0]


@functools.cache
def oms_files(module_name: str):
    return load_module(oms / module_name), text_encoders.load_openclip_text_encoder(oms / "text_encoder")


def expected_oms(module_name: str, x_T_prime: torch.Tensor, sigma0: float, batch_index=None) -> torch.Tensor:
    """x̂0 + σ₀·z, from the files: the k-diffusion start of the SDE solver (z at the latent's batch indices)."""
    module, encoder = oms_files(module_name)
    with torch.no_grad():
        x0_hat = -module.forward(x_T_prime, encoder.encode([PROMPT] * len(x_T_prime)))
    return x0_hat + sigma0 * comfy.sample.prepare_noise(x_T_prime, SEED + Z_SEED_OFFSET, batch_index)


EULER = {"sampler": "euler", "scheduler": "normal", "steps": 3}
CASES = {
    "ksampler euler normal": EULER,
    "ksampler euler_ancestral normal": {**EULER, "sampler": "euler_ancestral"},
    "ksampler dpmpp_2m karras": {"sampler": "dpmpp_2m", "scheduler": "karras", "steps": 3},
    "ksampler ddim ddim_uniform": {"sampler": "ddim", "scheduler": "ddim_uniform", "steps": 20},
    "ksampler uni_pc normal": {"sampler": "uni_pc", "scheduler": "normal", "steps": 3},
    "ksampler lcm sgm_uniform": {"sampler": "lcm", "scheduler": "sgm_uniform", "steps": 3},
    "ksampler euler inpainting": {**EULER, "latent": "inpaint"},
    "ksampler v_prediction": {**EULER, "sampling": "v_prediction"},
    "ksampler lcm model sampling": {"sampler": "lcm", "scheduler": "sgm_uniform", "steps": 3, "sampling": "lcm"},
    "ksampler advanced start at step 1": {**EULER, "start_at_step": 1},
    "ksampler latent from batch": {**EULER, "latent": "from batch"},
    "custom advanced latent from batch": {**EULER, "run": "custom", "latent": "from batch"},
    "ksampler denoise 0.6 image": {**EULER, "denoise": 0.6, "latent": "image", "expect": "skipped"},
    "ksampler denoise 0.6 inpainting": {**EULER, "denoise": 0.6, "latent": "inpaint", "expect": "skipped"},
    "ksampler advanced add noise off": {**EULER, "add_noise": False, "expect": "skipped"},
    "ksampler zsnr": {**EULER, "sampling": "zsnr", "expect": "skipped"},
    "ksampler edm": {**EULER, "scheduler": "karras", "sampling": "edm", "expect": "skipped"},
    "ksampler edm patched after OMS": {**EULER, "scheduler": "karras", "sampling": "edm", "after": True,
                                       "expect": "skipped"},
    "ksampler flow patched after OMS": {**EULER, "scheduler": "simple", "sampling": "flow", "after": True,
                                        "expect": "skipped"},
    "custom advanced euler": {**EULER, "run": "custom"},
    "custom advanced OMS noise": {"sampler": "dpmpp_2m", "scheduler": "karras", "steps": 3, "run": "noise"},
    "custom advanced OMS noise inpainting": {**EULER, "run": "noise", "latent": "inpaint"},
    "sdxl ksampler euler normal": {**EULER, "family": "sdxl"},
    "sdxl ksampler dpmpp_2m karras": {"sampler": "dpmpp_2m", "scheduler": "karras", "steps": 3, "family": "sdxl"},
    "sdxl custom advanced OMS noise": {**EULER, "run": "noise", "family": "sdxl"},
    "sdxl ksampler denoise 0.6 image": {**EULER, "denoise": 0.6, "latent": "image", "family": "sdxl",
                                        "expect": "skipped"},
    "sdxl refiner ksampler": {**EULER, "family": "sdxl refiner", "expect": "skipped"},
    "playground 2.5 ksampler": {**EULER, "scheduler": "karras", "family": "playground 2.5", "expect": "skipped"},
}


def probe(case: dict) -> dict:
    case = {"latent": "empty", "expect": "oms", "run": "ksampler", "family": "sd15", **case}
    before = patch_sampling(tiny_model(case["family"]), None if case.get("after") else case.get("sampling"))
    plain = patch_sampling(before, case.get("sampling")) if case.get("after") else before
    loader = oms_loader()
    with console() as said:  # the nodes' own run: what they apply, or why not
        if case["run"] == "noise":
            def with_noise(model, case, lat):
                def make(sigmas):
                    return nodes.OMSNoiseNode.execute(nodes_custom_sampler.Noise_RandomNoise(SEED), plain, sigmas,
                                                      loader, PROMPT, "", 1.0, "SDE").args[0]
                return custom_advanced(model, case, lat, make)
            run, model = with_noise, plain
        else:
            run = custom_advanced if case["run"] == "custom" else ksampler
            model = nodes.OneMoreStep.execute(before, loader, PROMPT, "", 1.0, "SDE").args[0]
            if case.get("after"):
                model = patch_sampling(model, case["sampling"])
        x, sigma0 = first_x(run, model, case)
    x_plain, _ = first_x(ksampler if case["run"] == "ksampler" else custom_advanced, plain, case)
    module = FAMILIES[case["family"]].module
    result = {"expect": case["expect"], "sigma0": sigma0, "module": module,
              "said": [line for line in said if nodes.TITLE in line]}
    if case["expect"] == "skipped":
        return {**result, "diff": float((x - x_plain).abs().max())}
    start = latent(case["latent"])
    batch_index = start.get("batch_index")
    want = expected_oms(module, comfy.sample.prepare_noise(start["samples"], SEED, batch_index), sigma0, batch_index)
    inside = torch.ones(x.shape, dtype=torch.bool)
    if case["latent"] == "inpaint":
        inside = torch.zeros(x.shape, dtype=torch.bool)
        inside[..., :4] = True
        result["outside"] = float((x[~inside] - x_plain[~inside]).abs().max())
    return {**result, "diff": float((x[inside] - want[inside]).abs().max()), "scale": float(want[inside].abs().max()),
            "plain_diff": float((x[inside] - x_plain[inside]).abs().max())}


if __name__ == "__main__":
    OUT.write_text(json.dumps({name: probe(case) for name, case in CASES.items()}, indent=1))
