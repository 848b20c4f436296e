"""A minimal stand-in for the WebUI's ``modules`` package (and gradio), injected into ``sys.modules``.

Enough of A1111 1.6–1.10 for ``scripts/one_more_step.py`` to be imported and driven as the WebUI drives it:
``run(...)`` follows ``process_images_inner`` (seeds → process → per batch: new ImageRNG, process_batch, first draw,
hook, sampler scaling, infotext) and swallows script errors the way ``ScriptRunner`` does; ``xyz_grid(...)`` makes
cells as ``scripts/xyz_grid.py`` does. Samplers scale the start noise exactly as the WebUI's own do, so tests can
check the latent a sampler really starts from. ``modules.rng`` behaves as the real one on the CPU: seeds,
variation seeds (slerp), seed resize, and the global reseeding its ``randn`` does.

Each behaviour copied from a WebUI says in a "Checked against" line which WebUI versions it was read from and which
test of tests/webui (run against a real WebUI by tests/webui/harness/run.py) covers it.
"""

from __future__ import annotations

import copy
import csv
import enum
import importlib.machinery
import importlib.util
import io
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIGMA_MAX = 14.614642


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


# ---------------------------------------------------------------------------------------------------------------
# gradio

class Component:
    """A gradio component as far as the extension makes one; every component made while ``made`` is a list is
    appended to it (WebUI.elem_ids reads the ids a script's ui() gives its components)."""

    made: list | None = None

    def __init__(self, value=None, label=None, **kwargs):
        self.value, self.label, self.kwargs = value, label, kwargs
        self.value = kwargs.get("value", value)
        if Component.made is not None:
            Component.made.append(self)

    @property
    def elem_ids(self) -> list[str]:
        """The ids of the HTML elements the WebUI makes for this component."""
        return [self.kwargs["elem_id"]] if self.kwargs.get("elem_id") else []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_gradio():
    gr = types.ModuleType("gradio")
    for name in ("Row", "Column", "Group", "Accordion", "Dropdown", "Textbox", "Slider", "Radio", "Checkbox", "HTML"):
        setattr(gr, name, type(name, (Component,), {}))
    gr.update = lambda **kwargs: {"__type__": "update", **kwargs}
    return gr


# ---------------------------------------------------------------------------------------------------------------
# fastapi (the WebUI's API server)

class HTTPException(Exception):
    """fastapi.exceptions.HTTPException (starlette's): the status and detail are instance attributes."""

    def __init__(self, status_code, detail=None, headers=None):
        self.status_code, self.detail, self.headers = status_code, detail, headers

    def __str__(self):
        return f"{self.status_code}: {self.detail}"


def make_fastapi():
    fastapi = types.ModuleType("fastapi")
    fastapi.__path__ = []
    # a spec as an imported module has: transformers, first imported while this fake is in place, looks it up
    fastapi.__spec__ = importlib.machinery.ModuleSpec("fastapi", None, is_package=True)
    exceptions = types.ModuleType("fastapi.exceptions")
    exceptions.HTTPException = fastapi.HTTPException = HTTPException
    fastapi.exceptions = exceptions
    return {"fastapi": fastapi, "fastapi.exceptions": exceptions}


@dataclass
class APIError:
    status: int
    traceback_printed: bool
    body: dict


def api_error(error: Exception) -> APIError:
    """What the WebUI's API answers for an exception raised while generating (modules/api/api.py,
    handle_exception): the status is the exception's ``status_code`` instance attribute, else 500, and the
    traceback is printed to the console unless the exception is an HTTPException.

    Checked against A1111 1.10.1, Forge Classic 1f95d71 and Forge Neo f95f632 (modules/api/api.py); covered by
    test_webui_seams.py::test_refused_arguments_answer_422_without_a_traceback."""
    body = {"error": type(error).__name__, "detail": vars(error).get("detail", ""),
            "body": vars(error).get("body", ""), "errors": str(error)}
    return APIError(vars(error).get("status_code", 500), not isinstance(error, HTTPException), body)


# ---------------------------------------------------------------------------------------------------------------
# modules.prompt_parser and modules.extra_networks.parse_prompt: the prompt syntax, re-written here for what the
# extension reads (the first sampling step); tests/test_webui_support.py checks it against the real parser.
# Checked against A1111 1.10.1 and Forge Classic 1f95d71 (modules/prompt_parser.py, modules/extra_networks.py):
# the runner runs that check with the WebUI's own file, and
# test_webui_api.py::test_prompt_solver_and_module_arguments_reach_the_step sends a prompt through the real parser.

_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"\s*:\s*[-+]?(?:\d+\.?|\d*\.\d+)\s*$")
_NUMBER = re.compile(r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*$")
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


class _Unbalanced(Exception):
    pass


def _when(text: str, steps: int) -> int:
    """A prompt-editing step: "0.25" is a fraction of the steps, "5" a step number."""
    value = float(text)
    return min(steps, int(value * steps if "." in text else value))


def _scheduled(opening: str, parts: list, separators: list, steps: int) -> str:
    """One […] group at the first step: [a:when], [a:b:when], [a|b] resolve; [a] (de-emphasis) stays."""
    literal = "".join(part + sep for part, sep in zip(parts, separators + [""], strict=True))
    if opening == "(":
        return f"({literal})"
    if separators and all(sep == "|" for sep in separators):
        return parts[0]
    if separators == [":"] and _NUMBER.match(parts[1]):
        return "" if 1 <= _when(parts[1].strip(), steps) else parts[0]
    if separators == [":", ":"] and _NUMBER.match(parts[2]):
        return parts[0] if 1 <= _when(parts[2].strip(), steps) else parts[1]
    return f"[{literal}]"


def _schedule(text: str, start: int, depth: int, steps: int):
    parts, separators, i = [""], [], start
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            parts[-1] += text[i:i + 2]
            i += 2
        elif char in "([":
            inner, inner_separators, i, closer = _schedule(text, i + 1, depth + 1, steps)
            if closer is None:
                raise _Unbalanced
            parts[-1] += _scheduled(char, inner, inner_separators, steps)
        elif char in ")]" and depth > 0:
            return parts, separators, i + 1, char
        elif char in ":|" and depth > 0 and (char == "|" or text[i - 1:i] != "\\"):
            separators.append(char)
            parts.append("")
            i += 1
        else:
            parts[-1] += char
            i += 1
    return parts, separators, i, None


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    """modules.prompt_parser's, for the first step only: [[[base_steps, the prompt at step 1]], ...]."""
    schedules = []
    for prompt in prompts:
        try:
            text = "".join(_schedule(prompt, 0, 0, base_steps)[0])
        except _Unbalanced:
            text = prompt  # the WebUI leaves a prompt it cannot parse as it is
        schedules.append([[base_steps, text]])
    return schedules


def get_multicond_prompt_list(prompts):
    """modules.prompt_parser's: the AND-separated sub-prompts without their weights, each once."""
    flat, indexes, result = [], {}, []
    for prompt in prompts:
        entries = []
        for subprompt in _AND.split(prompt):
            weight = _AND_WEIGHT.search(subprompt)
            text = subprompt[:weight.start()] if weight else subprompt.rstrip()
            if text not in indexes:
                indexes[text] = len(flat)
                flat.append(text)
            entries.append((indexes[text], float(weight.group().strip(" :")) if weight else 1.0))
        result.append(entries)
    return result, flat, indexes


def parse_prompt_attention(text):
    """modules.prompt_parser's chunks of text without emphasis syntax and escapes; BREAK is ["BREAK", -1]. The
    weights are not modelled (1.0): the extension reads only the text."""
    chunks = []
    for index, piece in enumerate(re.split(r"\s*\bBREAK\b\s*", text)):
        if index:
            chunks.append(["BREAK", -1])
        piece = re.sub(r"(?<!\\):\s*[+-]?[.\d]+\s*(?=\))", "", piece)
        piece = re.sub(r"\\(.)|[()\[\]]", lambda m: m.group(1) or "", piece)
        chunks.append([piece, 1.0])
    return chunks


def parse_extra_network_prompt(prompt):
    """modules.extra_networks.parse_prompt: the prompt without <name:args> tags, and the tags."""
    found = {}
    text = _EXTRA_NETWORK.sub(lambda m: found.setdefault(m.group(1), []).append(m.group(2)) or "", prompt)
    return text, found


# ---------------------------------------------------------------------------------------------------------------
# modules.*

class Opts:
    def __init__(self, **data):
        object.__setattr__(self, "data", dict(data))
        object.__setattr__(self, "added", {})

    def add_option(self, key, info):
        self.added[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, **kwargs):
        self.default, self.label, self.component, self.component_args, self.kwargs = (
            default, label, component, component_args, kwargs)


class KDiffusionSampler:
    """Starts from σ₀·noise, or √(1+σ₀²)·noise with the SGM noise multiplier; img2img from
    init + σ·noise at ``sigmas[steps - t_enc - 1]``.

    Checked against A1111 1.10.1 (modules/sd_samplers_kdiffusion.py) and Forge Classic 1f95d71; covered by
    test_webui_xyz_samplers.py::test_sampler_runs_with_oms_and_differs_from_off and
    test_webui_img2img_hires.py::test_inpainting_from_latent_noise_gets_the_oms_start_inside_the_mask."""

    def __init__(self, funcname="sample_euler", sigmas=None):
        self.funcname = funcname
        self.sigmas = sigmas if sigmas is not None else torch.tensor([SIGMA_MAX, 7.0, 3.0, 1.0, 0.3, 0.0])
        self.calls = 0
        # k-diffusion's denoiser around the model, whose ᾱ it holds (the extension reads it on timestep samplers only)
        self.model_wrap = types.SimpleNamespace(inner_model=types.SimpleNamespace(alphas_cumprod=sd_alphas_cumprod()))

    def get_sigmas(self, p, steps):
        self.calls += 1
        return self.sigmas

    def start(self, p, noise, opts):
        sigma0 = self.sigmas[0]
        if p.mode == "img2img":
            return p.init_latent + noise * sigma0
        return noise * (torch.sqrt(1 + sigma0**2) if opts.data.get("sgm_noise_multiplier") else sigma0)


class CompVisSampler:
    """DDIM/PLMS/UniPC: the noise is the VP latent itself; img2img noises at timesteps[t_enc].

    ᾱ lives on ``model_wrap.inner_model`` (A1111 1.9+, Forge, reForge); A1111 1.6-1.8's sampler has no
    ``model_wrap`` (``with_model_wrap=False``) and reads the loaded model's ᾱ.

    Checked against A1111 1.6.0 and 1.10.1 (modules/sd_samplers_timesteps.py) and Forge Classic 1f95d71; covered by
    test_webui_xyz_samplers.py::test_sampler_runs_with_oms_and_differs_from_off[DDIM]."""

    def __init__(self, funcname, alphas=None, with_model_wrap=True):
        self.funcname = funcname
        if with_model_wrap:
            self.model_wrap = types.SimpleNamespace(
                inner_model=types.SimpleNamespace(alphas_cumprod=alphas if alphas is not None else sd_alphas_cumprod()))

    def get_timesteps(self, p, steps):
        return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)

    def start(self, p, noise, opts):
        if p.mode == "img2img":
            steps, t_enc = setup_img2img_steps(p)
            alphas = self.model_wrap.inner_model.alphas_cumprod if hasattr(self, "model_wrap") else \
                p.sd_model.alphas_cumprod
            alpha = alphas[self.get_timesteps(p, steps)[t_enc]]
            return p.init_latent * alpha.sqrt() + noise * (1 - alpha).sqrt()
        return noise


class FlowSampler:
    funcname = "flow"


def setup_img2img_steps(p, steps=None):
    """modules.sd_samplers_common.setup_img2img_steps without "img2img: exact steps": t_enc = ⌊min(denoise,
    0.999)·steps⌋. Checked against A1111 1.10.1; covered by test_webui_img2img_hires.py (inpainting at denoise 1, and
    img2img that keeps the input)."""
    requested = steps or p.steps
    return requested, int(min(p.denoising_strength, 0.999) * requested)


def manual_seed(seed):
    torch.manual_seed(int(seed))


def randn(seed, shape, generator=None):
    """modules.rng.randn: reseeds the global generator with ``seed`` (a side effect), then draws from ``generator``
    or, without one, from the global generator."""
    manual_seed(seed)
    return torch.randn(shape, generator=generator)


def randn_local(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


def create_generator(seed):
    return torch.Generator().manual_seed(int(seed))


def slerp(t, low, high):
    """modules.rng.slerp: spherical interpolation from ``low`` (t = 0) to ``high`` (t = 1) with the angle taken along
    dim 1; nearly parallel inputs get the WebUI's linear fallback, whose weights are the other way round."""
    cos = ((low / low.norm(dim=1, keepdim=True)) * (high / high.norm(dim=1, keepdim=True))).sum(dim=1)
    if cos.mean() > 0.9995:
        return t * low + (1 - t) * high
    angle = torch.acos(cos)
    weight_low = (torch.sin((1.0 - t) * angle) / torch.sin(angle)).unsqueeze(1)
    weight_high = (torch.sin(t * angle) / torch.sin(angle)).unsqueeze(1)
    return weight_low * low + weight_high * high


def paste_centred(small, big):
    """``big`` with ``small`` laid over its centre on the last two axes; where ``small`` is larger, its centre is
    cropped symmetrically (so with an odd difference one edge row or column of ``big`` stays, as in the WebUI)."""
    target, source = [slice(None)], [slice(None)]
    for small_size, big_size in zip(small.shape[1:], big.shape[1:], strict=True):
        offset = (big_size - small_size) // 2
        length = small_size if offset >= 0 else small_size + 2 * offset
        target.append(slice(max(offset, 0), max(offset, 0) + length))
        source.append(slice(max(-offset, 0), max(-offset, 0) + length))
    big[tuple(target)] = small[tuple(source)]
    return big


class ImageRNG:
    """modules.rng.ImageRNG: the first draw is each image's seeded unit Gaussian, slerped toward its variation seed's
    by ``subseed_strength`` and, with "resize seed from", drawn at that size and laid over the centre of a draw of the
    real size; later draws continue each image's stream (restarted from seed + eta noise seed delta if set).

    Checked against A1111 1.10.1 and Forge Neo f95f632 (modules/rng.py); covered in test_webui_api.py by
    test_variation_strength_changes_an_oms_image_as_much_as_a_plain_one,
    test_variation_batch_with_oms_gives_distinct_images and test_batch_of_two_equals_two_single_images."""

    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(int(n) for n in shape)
        self.seeds, self.subseeds, self.subseed_strength = seeds, subseeds, subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w = seed_resize_from_h, seed_resize_from_w
        self.generators = [create_generator(seed) for seed in seeds]
        self.draws = 0

    def first(self):
        resized = self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0
        drawn = (self.shape[0], int(self.seed_resize_from_h) // 8, int(self.seed_resize_from_w) // 8) if resized \
            else self.shape
        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators, strict=True)):
            variation = None
            if self.subseeds is not None and self.subseed_strength != 0:
                variation = randn(self.subseeds[i] if i < len(self.subseeds) else 0, drawn)
            noise = randn(seed, drawn) if drawn != self.shape else randn(seed, self.shape, generator=generator)
            if variation is not None:
                noise = slerp(self.subseed_strength, noise, variation)
            if drawn != self.shape:
                noise = paste_centred(noise, randn(seed, self.shape, generator=generator))
            images.append(noise)
        delta = sys.modules["modules.shared"].opts.eta_noise_seed_delta  # as the real one reads it
        if delta:
            self.generators = [create_generator(seed + delta) for seed in self.seeds]
        return torch.stack(images).to(sys.modules["modules.shared"].device)

    def next(self):
        self.draws += 1
        if self.draws == 1:
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(
            sys.modules["modules.shared"].device)


class FakeSDModel:
    """The loaded model (shared.sd_model, p.sd_model) as far as the extension reads it: the family flags, the latent
    channels, A1111's low-VRAM flag, ᾱ, the checkpoint file, the text encoder (cond_stage_model; SDXL's conditioner)
    and state_dict().

    ``webui``: the WebUI family (FAMILIES) whose model it is: the attributes its model lacks are left out.
    Checked against A1111 1.10.1, Forge Classic 1f95d71 and Forge Neo 5692d2d with an SD 1.5 checkpoint; covered by
    test_webui_fakes_match.py::test_sampler_and_model_have_what_the_webuis_have."""

    def __init__(self, family="sd1", latent_channels=4, checkpoint="", webui="a1111"):
        self.is_sd1, self.is_sd2, self.is_sdxl = family == "sd1", family == "sd2", family in ("sdxl", "sdxl-refiner")
        self.is_sd3 = family == "sd3"
        self.latent_channels = latent_channels
        self.lowvram = False
        self.alphas_cumprod = sd_alphas_cumprod()  # LatentDiffusion's buffer
        self.sd_checkpoint_info = types.SimpleNamespace(filename=checkpoint)
        self.cond_stage_model = types.SimpleNamespace()  # its weights are read from the checkpoint file in the tests
        if self.is_sdxl:
            keys = ["txt"] if family == "sdxl-refiner" else ["txt", "txt"]
            embedders = [types.SimpleNamespace(input_key=k) for k in keys + ["original_size_as_tuple"]]
            self.conditioner = types.SimpleNamespace(embedders=embedders)

        self.state_dict = dict  # nn.Module's: {} here, as the tests give every checkpoint a file, which is read
        for name in FAMILIES[webui].model_lacks:
            delattr(self, name)


# The fields of ``p`` that every request sets (the API and the UI always send them) or that process_images sets
# before the scripts read them: their values in Processing are the tests' own, not the WebUI's defaults.
REQUEST_FIELDS = frozenset({"prompt", "seed", "subseed", "steps", "width", "height", "sampler_name", "batch_size",
                            "sd_model", "sampler", "all_prompts", "all_seeds", "all_subseeds", "script_args"})


@dataclass
class Processing:
    """The fields of StableDiffusionProcessing the extension reads. Every field outside REQUEST_FIELDS has the
    WebUI's own default, as a ``p`` made without arguments has it after its ``__post_init__`` (so
    ``extra_generation_params`` is {}); ``mode`` is the fake's own (the fake samplers read it).

    Checked against A1111 1.10.1, Forge Classic 1f95d71 and Forge Neo 5692d2d (modules/processing.py); covered by
    test_webui_fakes_match.py::test_processing_has_what_the_webui_has."""

    sd_model: object = None
    prompt: str = "a dark alley"
    all_prompts: list = field(default_factory=list)
    seed: int = 11
    subseed: int = 1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    all_seeds: list = field(default_factory=list)
    all_subseeds: list = field(default_factory=list)
    batch_size: int = 1
    steps: int = 20
    width: int = 48
    height: int = 40
    sampler_name: str = "Euler"
    sampler: object = None
    extra_generation_params: dict = field(default_factory=dict)
    script_args: tuple = ()
    is_hr_pass: bool = False
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    firstpass_image: object = None  # a PIL image: hires fix of an image given instead of a first pass
    # set by process_images for each batch (WebUI.run does)
    prompts: list | None = None
    seeds: list | None = None
    subseeds: list | None = None
    rng: object = None
    mode: str = "txt2img"


@dataclass
class StableDiffusionProcessingTxt2Img(Processing):
    enable_hr: bool = False
    denoising_strength: float = 0.75


@dataclass
class StableDiffusionProcessingImg2Img(Processing):
    """``image_mask`` is what the request's ``mask`` becomes in ``__post_init__`` (None without one);
    ``initial_noise_multiplier`` is the setting's value there (its default, 1.0) unless the request gives one."""

    mode: str = "img2img"
    image_mask: object = None
    inpainting_fill: int = 0
    denoising_strength: float = 0.75
    initial_noise_multiplier: float = 1.0
    init_latent: torch.Tensor | None = None
    nmask: torch.Tensor | None = None


class Script:
    """modules.scripts.Script of A1111 1.10 (with_hook=True) or 1.6–1.9 (without process_before_every_sampling). The
    WebUI sets ``is_txt2img`` and ``is_img2img`` on each instance before it calls ``ui()`` (WebUI.script does).

    ``elem_id``: "script_", then the tab ("txt2img_" or "img2img_") only when ``show(True) == show(False)`` (a script
    shown alike in both tabs, as an AlwaysVisible one is), then the title lower-cased with each whitespace character
    made "_" and every character other than a-z, 0-9 and "_" dropped, then "_" and the item id.
    Checked against A1111 1.10.1, Forge Classic 1f95d71 and Forge Neo 5692d2d (modules/scripts.py Script.elem_id and
    ScriptRunner.initialize_scripts); covered by test_webui_fakes_match.py::test_elem_ids_are_the_webuis, and by
    test_webui_browser.py, whose selectors (and javascript/oms_hints.js) use the real ids."""

    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def elem_id(self, item_id):
        tab = ("img2img_" if self.is_img2img else "txt2img_") if self.show(True) == self.show(False) else ""
        title = re.sub(r"[^0-9a-z_]", "", "".join("_" if char.isspace() else char for char in self.title().lower()))
        return f"script_{tab}{title}_{item_id}"


class InputAccordion(Component):
    """modules.ui_components.InputAccordion: the component is the accordion's checkbox, whose element id is the given
    one + "-checkbox"; the accordion around it has the given id.
    Checked against A1111 1.10.1 and Forge Neo 5692d2d (modules/ui_components.py); covered by
    test_webui_fakes_match.py::test_elem_ids_are_the_webuis."""

    @property
    def elem_ids(self) -> list[str]:
        given = self.kwargs.get("elem_id")
        return [given, f"{given}-checkbox"] if given else []


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    """modules.ui_common.create_refresh_button: a tool button with the given element id."""
    return Component(elem_id=elem_id)


# ---------------------------------------------------------------------------------------------------------------
# The WebUI families: which of the modules the extension reads each one has, the Forge family's memory manager, the
# flags and settings that differ.
# Checked against A1111 1.10.1, Forge Classic 1f95d71 and Forge Neo 5692d2d (exo101/sd-webui-forge-neo-v3; v3.5,
# f95f632, before): every module in make_modules exists in all three except modules.lowvram (A1111, Forge, reForge
# only); Forge Neo has no --use-cpu and draws its noise on the CPU by default; the models of Forge Classic and Forge
# Neo lack some of A1111's attributes (model_lacks), and Classic's on_* take no name. Covered by
# test_webui_fakes_match.py (test_family_is_the_webuis, test_cmd_opts_and_state_are_the_webuis,
# test_settings_the_fakes_set_have_the_webuis_defaults). Forge and reForge were not run here: their entries are read
# from their sources only.

@dataclass(frozen=True)
class Family:
    has_lowvram: bool  # modules.lowvram (A1111's --lowvram / --medvram)
    manager: str | None  # the module path of the WebUI's own memory manager
    has_use_cpu: bool = True  # the --use-cpu flag (shared.cmd_opts.use_cpu)
    opts: dict = field(default_factory=dict)  # settings whose default differs from A1111's
    model_lacks: frozenset = frozenset()  # attributes of FakeSDModel the family's loaded model does not have
    callback_name: bool = True  # script_callbacks.on_<kind>(callback, *, name=None) rather than on_<kind>(callback)


FAMILIES = {
    "a1111": Family(has_lowvram=True, manager=None),
    "forge": Family(has_lowvram=True, manager="backend.memory_management"),
    "reforge": Family(has_lowvram=True, manager="ldm_patched.modules.model_management"),
    "forge-classic": Family(has_lowvram=False, manager="ldm_patched.modules.model_management",
                            model_lacks=frozenset({"is_sd3", "latent_channels", "lowvram"}), callback_name=False),
    "forge-neo": Family(has_lowvram=False, manager="backend.memory_management", has_use_cpu=False,
                        opts={"randn_source": "CPU", "forge_model_mode": "local"},
                        model_lacks=frozenset({"is_sd2", "is_sd3", "latent_channels", "lowvram", "state_dict"})),
}
# The settings of A1111 1.10.1 the extension or the fakes read, with their defaults.
A1111_OPTS = {"randn_source": "GPU", "sd_noise_schedule": "Default", "sgm_noise_multiplier": False,
              "img2img_extra_noise": 0.0, "eta_noise_seed_delta": 0, "initial_noise_multiplier": 1.0}


class VRAMState(enum.Enum):
    """The memory manager's VRAMState (the same members in Forge Classic's ldm_patched and Forge Neo's backend)."""

    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


def make_memory_manager(name: str) -> types.ModuleType:
    """The Forge family's memory manager as far as the extension calls it: ``vram_state``, ``free_memory(
    memory_required, device, keep_loaded=[])`` (recorded in ``.freed``), ``minimum_inference_memory()`` (1 GiB,
    Forge Classic's figure) and ``get_torch_device()``."""
    manager = types.ModuleType(name)
    manager.VRAMState = VRAMState
    manager.vram_state = VRAMState.NORMAL_VRAM
    manager.freed = []
    manager.free_memory = lambda memory_required, device, keep_loaded=(): manager.freed.append(
        (memory_required, torch.device(device)))
    manager.minimum_inference_memory = lambda: 1024**3
    manager.get_torch_device = lambda: torch.device("cuda", 0)  # with its index, as torch.cuda.current_device() gives
    return manager


def host_modules(family: str) -> dict[str, types.ModuleType]:
    """The packages of the family's memory manager, for ``sys.modules`` (empty for A1111)."""
    path = FAMILIES[family].manager
    if path is None:
        return {}
    parts = path.split(".")
    modules = {}
    for i in range(1, len(parts)):
        package = types.ModuleType(".".join(parts[:i]))
        package.__path__ = []
        modules[package.__name__] = package
    modules[path] = make_memory_manager(path)
    for name, module in modules.items():
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(modules[parent], child, module)
    return modules


CALLBACK_KINDS = ("app_started", "model_loaded", "ui_settings", "before_ui")


@dataclass
class ScriptCallback:
    """modules.script_callbacks.ScriptCallback: the file of the script that registered it, the callback, a name."""

    script: str
    callback: object
    name: str = "unnamed"


def add_callback(callbacks, kind, callback, *, name=None, depth=1):
    """script_callbacks.on_<kind>(callback, *, name=None), which records the registering script's file."""
    caller = sys._getframe(depth).f_code.co_filename
    callbacks.callback_map[f"callbacks_{kind}"].append(ScriptCallback(caller, callback, name or "unnamed"))
    callbacks.registered[kind].append(callback)


def on_callback(callbacks, kind, *, with_name: bool):
    """The on_<kind> function of a WebUI whose on_* functions take a name (A1111 1.10) or only the callback."""
    if with_name:
        return lambda callback, *, name=None: add_callback(callbacks, kind, callback, name=name, depth=2)
    return lambda callback: add_callback(callbacks, kind, callback, depth=2)


# What the fakes hold for the tests' sake, which the WebUI's modules do not have.
FAKES_OWN = {"modules.devices": {"gc_calls"}, "modules.lowvram": {"calls"}, "modules.script_callbacks": {"registered"}}


def make_modules(models_path: Path, *, with_hook: bool, opts: dict | None = None, family: str = "a1111"):
    """The fake ``modules`` package of a WebUI ``family`` (FAMILIES); returns (package, {name: submodule})."""
    names = ["scripts", "script_callbacks", "shared", "paths", "processing", "rng", "devices", "sd_models",
             "sd_samplers_kdiffusion", "sd_samplers_timesteps", "sd_samplers_common", "ui_components", "ui_common",
             "prompt_parser", "extra_networks"] + (["lowvram"] if FAMILIES[family].has_lowvram else [])
    subs = {name: types.ModuleType(f"modules.{name}") for name in names}
    base = type("Script", (Script,), {})
    if with_hook:
        base.process_before_every_sampling = lambda self, p, *args, **kwargs: None
    subs["scripts"].Script = base
    subs["scripts"].AlwaysVisible = object()
    subs["scripts"].scripts_data = []
    # script_callbacks.on_<name>(callback, *, name=None): the callbacks each kind has, in order (the WebUI's
    # callback_map["callbacks_<name>"]). Checked against A1111 1.10.1, Forge Classic 1f95d71 and Forge Neo 5692d2d
    # (modules/script_callbacks.py); covered by test_webui_fakes_match.py::test_callbacks_are_the_webuis.
    callbacks = subs["script_callbacks"]
    callbacks.callback_map = {f"callbacks_{kind}": [] for kind in CALLBACK_KINDS}
    callbacks.registered = {kind: [] for kind in CALLBACK_KINDS}  # the fake's own view: the callbacks of each kind
    for kind in CALLBACK_KINDS:
        setattr(callbacks, f"on_{kind}", on_callback(callbacks, kind, with_name=FAMILIES[family].callback_name))
    shared = subs["shared"]
    shared.opts = Opts(**{**A1111_OPTS, **FAMILIES[family].opts, **(opts or {})})
    shared.OptionInfo = OptionInfo
    # shared.cmd_opts with the flags' defaults (--oms-models-dir and --oms-no-download: this extension's preload.py).
    # Checked against A1111 1.10.1, Forge Classic 1f95d71 and Forge Neo 5692d2d (modules/cmd_args.py); covered by
    # test_webui_fakes_match.py::test_cmd_opts_and_state_are_the_webuis.
    shared.cmd_opts = types.SimpleNamespace(oms_models_dir=None, oms_no_download=False,
                                            **({"use_cpu": []} if FAMILIES[family].has_use_cpu else {}))
    # shared.state (modules/shared_state.py State) with its defaults between generations. Checked against A1111
    # 1.10.1, Forge Classic 1f95d71 and Forge Neo 5692d2d; covered by the same test.
    shared.state = types.SimpleNamespace(interrupted=False, skipped=False, stopping_generation=False, textinfo=None)
    subs["sd_models"].checkpoints_list = {}  # title -> CheckpointInfo (.filename), the WebUI's checkpoint folders
    shared.sd_model = FakeSDModel()
    shared.device = torch.device("cpu")  # where ImageRNG's draws go
    subs["paths"].models_path = str(models_path)
    processing = subs["processing"]
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    processing.StableDiffusionProcessingImg2Img = StableDiffusionProcessingImg2Img
    for function in (randn, randn_local, manual_seed, create_generator, slerp, ImageRNG):
        setattr(subs["rng"], function.__name__, function)
    devices = subs["devices"]
    devices.device = devices.cpu = torch.device("cpu")
    devices.dtype_unet = torch.float32
    devices.get_device_for = lambda task: torch.device("cpu")
    devices.gc_calls = []
    devices.torch_gc = lambda: devices.gc_calls.append(1)
    if "lowvram" in subs:
        subs["lowvram"].calls = []
        subs["lowvram"].send_everything_to_cpu = lambda: subs["lowvram"].calls.append(1)
    subs["sd_samplers_kdiffusion"].KDiffusionSampler = KDiffusionSampler
    subs["sd_samplers_timesteps"].CompVisSampler = CompVisSampler
    subs["sd_samplers_common"].setup_img2img_steps = setup_img2img_steps
    for function in (get_learned_conditioning_prompt_schedules, get_multicond_prompt_list, parse_prompt_attention):
        setattr(subs["prompt_parser"], function.__name__, function)
    subs["extra_networks"].parse_prompt = parse_extra_network_prompt
    subs["ui_components"].InputAccordion = InputAccordion
    subs["ui_common"].create_refresh_button = create_refresh_button
    package = types.ModuleType("modules")
    package.__path__ = []
    for name, module in subs.items():
        setattr(package, name, module)
    return package, subs


@dataclass
class WebUI:
    """The injected fakes and the loaded script module."""

    modules: dict
    script_module: types.ModuleType
    errors: list = field(default_factory=list)  # what ScriptRunner would have reported (and swallowed)
    infotexts: list = field(default_factory=list)  # each image's generation parameters from the script, in order
    memory_manager: types.ModuleType | None = None  # the Forge family's (make_memory_manager)
    other_scripts: list = field(default_factory=list)  # other extensions' scripts, run after this one

    @property
    def opts(self):
        return self.modules["shared"].opts

    def script(self, is_img2img: bool = False):
        """The script as the WebUI's ScriptRunner makes it for the txt2img or the img2img tab."""
        script = self.script_module.OneMoreStepScript()
        script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
        return script

    def elem_ids(self, is_img2img: bool) -> list[str]:
        """The element ids of the HTML elements made for the script's controls in one tab, in the order made."""
        Component.made = []
        try:
            self.script(is_img2img).ui(is_img2img)
            return [elem_id for component in Component.made for elem_id in component.elem_ids]
        finally:
            Component.made = None

    def _call(self, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as error:  # ScriptRunner: errors.report(...), generation goes on
            self.errors.append(error)

    def build_ui(self) -> None:
        """What the WebUI does with the callbacks while it builds its UI: the before_ui callbacks (webui.py, before
        create_ui), then the ui_settings ones (the Settings tab). Checked against A1111 1.10.1 (webui.py,
        modules/ui.py, modules/ui_settings.py)."""
        for kind in ("before_ui", "ui_settings"):
            for callback in self.modules["script_callbacks"].registered[kind]:
                callback()

    def run(self, p, args, *, batches: int = 1, with_script: bool = True) -> list[torch.Tensor]:
        """process_images for ``p``: returns the latent each batch's sampler starts from (VE units for k-diffusion,
        VP for timestep samplers, as the sampler itself holds it). With a variation strength every image keeps the
        seed and only the subseed counts up (the seed collapse of process_images). ``with_script=False``: the
        WebUI without this extension.

        Checked against A1111 1.6.0 and 1.10.1 (modules/processing.py process_images_inner, modules/scripts.py
        ScriptRunner) and Forge Classic 1f95d71; covered by
        test_webui_api.py::test_enabled_changes_the_image_and_writes_its_infotext and
        test_webui_seams.py::test_an_error_while_sampling_stops_the_generation."""
        script = self.script() if with_script else self.modules["scripts"].Script()
        with_hook = hasattr(self.modules["scripts"].Script, "process_before_every_sampling")
        p.script_args = tuple(args)
        images = p.batch_size * batches
        if not p.all_prompts:
            p.all_prompts = [p.prompt] * images
        if not p.all_seeds:  # with a variation strength every image keeps the seed and only the subseed counts up
            p.all_seeds = [int(p.seed) + (i if p.subseed_strength == 0 else 0) for i in range(images)]
        if not p.all_subseeds:
            p.all_subseeds = [int(p.subseed) + i for i in range(images)]
        self._call(script.process, p, *args)
        for other in self.other_scripts:
            self._call(other.process, p)
        starts = []
        for n in range(batches):
            batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.seeds, p.subseeds = p.all_prompts[batch], p.all_seeds[batch], p.all_subseeds[batch]
            shape = (getattr(p.sd_model, "latent_channels", 4), p.height // 8, p.width // 8)  # Classic: opt_C
            p.rng = ImageRNG(shape, p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength,
                             seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w)
            self._call(script.process_batch, p, *args, batch_number=n, prompts=p.prompts, seeds=p.seeds)
            for other in self.other_scripts:
                self._call(other.process_batch, p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
            x = p.rng.next()  # not wrapped: an exception here reaches the user
            if with_hook:
                noise = x
                if p.mode == "img2img":
                    noise = x * p.initial_noise_multiplier if p.initial_noise_multiplier != 1 else x
                self._call(script.process_before_every_sampling, p, *args, x=x if p.mode == "txt2img" else
                           p.init_latent, noise=noise, c=None, uc=None)
                x = noise
            starts.append(p.sampler.start(p, x, self.opts))
            # create_infotext, once per image after its batch: the script's keys whose value is not None
            self.infotexts += [{k: v for k, v in p.extra_generation_params.items() if v is not None} for _ in p.seeds]
        return starts

    def xyz_grid(self, p, args, x_axis, y_axis=None) -> dict:
        """scripts/xyz_grid.py: each cell is a shallow ``copy(p)`` (so every cell shares p's
        ``extra_generation_params`` dict) with the axes applied, made in its default order (y outer, x inner).
        Checked against A1111 1.10.1, Forge Classic 1f95d71 (extensions-builtin/xyz) and Forge Neo f95f632; covered by
        test_webui_xyz_samplers.py::test_xyz_off_cell_after_an_on_cell_carries_no_oms_infotext.
        ``x_axis`` / ``y_axis``: (AxisOption, values). Returns {(ix, iy): (start, infotext of its image)}."""
        x_option, xs = x_axis
        y_option, ys = y_axis or (None, [None])
        cells = {}
        for iy, y in enumerate(ys):
            for ix, x in enumerate(xs):
                cell = copy.copy(p)
                x_option.apply(cell, x, xs)
                if y_option is not None:
                    y_option.apply(cell, y, ys)
                cells[ix, iy] = (self.run(cell, args)[0], self.infotexts[-1])
        return cells


class AxisOption:
    """scripts/xyz_grid.py's AxisOption: ``apply(p, value, values)`` sets a cell's value on its copy of ``p``.
    Checked against A1111 1.6.0 / 1.10.1, Forge Classic 1f95d71 and Forge Neo f95f632; covered by
    test_webui_xyz_samplers.py::test_oms_axes_are_offered."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm, self.choices, self.cost = (
            label, type, apply, confirm, choices, cost)
        self.prepare = prepare  # A1111 1.9+, Forge, reForge; 1.6-1.8 have no prepare


def csv_string_to_list_strip(text):
    """xyz_grid's: the comma-separated values, stripped (CSV quoting allowed)."""
    return [value.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for value in row]


_XYZ_NUMBER = r"\s*([+-]?\s*\d+(?:.\d*)?)"


def add_xyz_script(webui: WebUI) -> types.SimpleNamespace:
    """The X/Y/Z plot script as the extension finds it in ``scripts.scripts_data``; returns its module."""
    module = types.SimpleNamespace(
        AxisOption=AxisOption, axis_options=[AxisOption("Seed", int, None)],
        csv_string_to_list_strip=csv_string_to_list_strip,
        re_range_float=re.compile(  # 1-2 (+0.5)
            _XYZ_NUMBER + r"\s*-" + _XYZ_NUMBER + r"(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*"),
        re_range_count_float=re.compile(  # 1-2 [3]
            _XYZ_NUMBER + r"\s*-" + _XYZ_NUMBER + r"(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*"))
    data = types.SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=module)
    webui.modules["scripts"].scripts_data.append(data)
    return module


def install(monkeypatch, models_path: Path, *, with_hook: bool = True, opts: dict | None = None,
            family: str = "a1111") -> WebUI:
    """Inject fake gradio and ``modules`` of a WebUI ``family`` (``models_path``: the WebUI's models folder) and
    import the script file fresh, as the WebUI loads it."""
    package, subs = make_modules(models_path, with_hook=with_hook, opts=opts, family=family)
    host = host_modules(family)
    for name, module in host.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "gradio", make_gradio())
    for name, module in make_fastapi().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "modules", package)
    for name, module in subs.items():
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
    from oms_webui import memory

    memory.memory_manager.cache_clear()  # a WebUI started anew: its manager is looked up again
    path = ROOT / "scripts" / "one_more_step.py"
    spec = importlib.util.spec_from_file_location("one_more_step.py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return WebUI(subs, module, memory_manager=host.get(FAMILIES[family].manager))
