"""A test-only WebUI extension, not part of One More Step: the real-WebUI runner (tests/webui/harness/run.py) links
this folder into the scratch data folder's extensions/ beside One More Step. At the first noise draw of every
generation it writes what the WebUI really has where tests/webui_fakes.py stands in for it to the JSON file named by
the environment variable OMS_FAKES_PROBE: the modules and the names they offer, the attributes of ``p``, of its
sampler and of the loaded model, the defaults of ``shared.cmd_opts``, ``shared.state``, ``shared.opts`` and of a new
``p``, the callbacks One More Step registered, the Forge family's memory manager and the X/Y/Z plot's AxisOption.
tests/webui/test_webui_fakes_match.py compares that with the same probe run in the fakes.

Only reads: it imports no module the WebUI has not imported, changes no setting and leaves the noise as it is.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path

from modules import scripts

OUT_VARIABLE = "OMS_FAKES_PROBE"
EXTENSION_SCRIPT = "one_more_step.py"  # the file of One More Step's script, whose callbacks are looked for
# Modules whose presence the extension (or the fakes) depend on, looked up without importing them.
ASKED_MODULES = ("modules.rng", "modules.lowvram", "modules.sd_samplers_kdiffusion", "modules.sd_samplers_timesteps",
                 "modules.sd_samplers_common", "modules.processing_args", "backend.memory_management",
                 "ldm_patched.modules.model_management")
MANAGERS = ("backend.memory_management", "ldm_patched.modules.model_management")
XYZ_MODULES = ("xyz_grid.py", "scripts.xyz_grid")
# Attributes of the loaded model and of the sampler looked for (getattr with a default would hide their absence).
MODEL_NAMES = ("is_sd1", "is_sd2", "is_sdxl", "is_sd3", "latent_channels", "lowvram", "alphas_cumprod",
               "sd_checkpoint_info", "cond_stage_model", "conditioner", "state_dict")
SAMPLER_NAMES = ("funcname", "get_sigmas", "get_timesteps", "model_wrap", "sigmas")


def plain(value, depth: int = 0):
    """``value`` as JSON: numbers, strings, None and lists / dicts of them as they are; torch dtypes and devices as
    their names; anything else as its type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth < 3 and isinstance(value, (list, tuple)):
        return [plain(item, depth + 1) for item in value]
    if depth < 3 and isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: plain(item, depth + 1) for key, item in value.items()}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if kind in ("torch.dtype", "torch.device"):
        return {"torch": str(value)}
    return {"type": kind}


def public(obj) -> list[str]:
    """The public names of ``obj``, a module's class included (A1111 makes modules.shared's sd_model a property of
    the module's class, which dir() of the module leaves out)."""
    names = set(dir(obj)) | (set(dir(type(obj))) if isinstance(obj, type(sys)) else set())
    return sorted(name for name in names if not name.startswith("_"))


def modules_facts() -> dict:
    # One More Step's own check, so the record says what the extension sees; imported here, not at the top: the
    # WebUI puts the extension's folder on sys.path only when it loads the extension, after this probe.
    from oms_webui.environment import has_module

    loaded = {name: module for name, module in list(sys.modules.items())
              if module is not None and (name == "modules" or name.startswith("modules."))}
    return {"present": {name: has_module(name) for name in ASKED_MODULES},
            "names": {name: public(module) for name, module in sorted(loaded.items())}}


def manager_facts() -> dict:
    facts = {}
    for name in MANAGERS:
        manager = sys.modules.get(name)
        if manager is None:
            continue
        entry = {"names": public(manager)}
        states = getattr(manager, "VRAMState", None)
        entry["vram_states"] = [member.name for member in states] if states is not None else None
        free = getattr(manager, "free_memory", None)
        entry["free_memory"] = list(inspect.signature(free).parameters) if callable(free) else None
        facts[name] = entry
    return facts


def callback_facts() -> dict:
    from modules import script_callbacks

    registered = {}
    for category, entries in getattr(script_callbacks, "callback_map", {}).items():
        ours = [entry for entry in entries if Path(str(getattr(entry, "script", ""))).name == EXTENSION_SCRIPT]
        registered[category] = len(ours)
    on = {name: list(inspect.signature(getattr(script_callbacks, name)).parameters)
          for name in public(script_callbacks) if name.startswith("on_") and callable(getattr(script_callbacks, name))}
    return {"categories": sorted(registered), "by_one_more_step": {k: v for k, v in registered.items() if v},
            "on_functions": on}


def parser_defaults():
    """The defaults of every command-line flag (the WebUI's parser, with the flags preload.py files add)."""
    for name in ("modules.shared_cmd_options", "modules.cmd_args"):
        parser = getattr(sys.modules.get(name), "parser", None)
        actions = getattr(parser, "_actions", None)
        if actions:
            return {action.dest: plain(action.default) for action in actions if action.dest != "help"}
    return None


def cmd_opts_facts() -> dict:
    from modules import shared

    values = vars(shared.cmd_opts)
    defaults = parser_defaults()
    return {"names": sorted(values), "defaults": defaults if defaults is not None else
            {name: plain(value) for name, value in values.items()}}


def state_facts() -> dict:
    """The class-level defaults of shared.state (an instance between generations, in the fakes)."""
    from modules import shared

    state = shared.state
    own = {name: value for name, value in vars(type(state)).items()
           if not name.startswith("_") and not callable(value) and not isinstance(value, (property, staticmethod,
                                                                                          classmethod))}
    if not own:
        own = dict(vars(state))
    return {"names": public(state), "defaults": {name: plain(value) for name, value in own.items()}}


def opts_facts() -> dict:
    from modules import shared

    labels = getattr(shared.opts, "data_labels", None)
    if labels:
        return {name: plain(info.default) for name, info in labels.items()}
    return {name: plain(value) for name, value in shared.opts.data.items()}


def new_processing(cls) -> dict:
    """What a ``p`` made without arguments holds after its __post_init__ (the WebUI's own defaults)."""
    try:
        made = cls()
    except Exception as error:  # noqa: BLE001 - said in the record: the field defaults are used instead
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return {"error": f"{type(error).__name__}: {error}", "values": {k: plain(v) for k, v in fields.items()}}
    names = {f.name for f in dataclasses.fields(cls)} | set(vars(made))  # a field not set in __init__ is the class's
    return {"error": None, "values": {name: plain(getattr(made, name)) for name in sorted(names) if has(made, name)}}


def processing_facts() -> dict:
    from modules import processing

    return {"txt2img": new_processing(processing.StableDiffusionProcessingTxt2Img),
            "img2img": new_processing(processing.StableDiffusionProcessingImg2Img)}


def script_facts() -> dict:
    return {"names": public(scripts.Script), "always_visible": hasattr(scripts, "AlwaysVisible")}


def xyz_facts() -> dict | None:
    for data in getattr(scripts, "scripts_data", []):
        if data.script_class.__module__ in XYZ_MODULES:
            module = data.module
            break
    else:
        return None
    parameters = inspect.signature(module.AxisOption).parameters
    axes = {}
    for option in getattr(module, "axis_options", []):
        if str(getattr(option, "label", "")).startswith("[OMS]"):
            axes[option.label] = {"type": getattr(option.type, "__name__", str(option.type)),
                                  "cost": plain(getattr(option, "cost", None)),
                                  "choices": callable(getattr(option, "choices", None)),
                                  "confirm": callable(getattr(option, "confirm", None)),
                                  "prepare": callable(getattr(option, "prepare", None))}
    return {"axis_option": [[name, param.default is inspect.Parameter.empty] for name, param in parameters.items()],
            "names": public(module), "oms_axes": axes}


def has(obj, name: str) -> bool:
    try:
        return name in dir(obj) or hasattr(obj, name)
    except Exception:  # noqa: BLE001 - a property that raises: not usable as an attribute
        return False


def generation_facts(p) -> dict:
    from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

    sampler = getattr(p, "sampler", None)
    wrap = getattr(sampler, "model_wrap", None)
    return {
        "p": sorted(set(dir(p))),
        "sampler": None if sampler is None else {
            "class": f"{type(sampler).__module__}.{type(sampler).__qualname__}",
            "k_diffusion": isinstance(sampler, sd_samplers_kdiffusion.KDiffusionSampler),
            "timesteps": isinstance(sampler, sd_samplers_timesteps.CompVisSampler),
            "names": [name for name in SAMPLER_NAMES if has(sampler, name)],
            "model_wrap.inner_model.alphas_cumprod": getattr(getattr(wrap, "inner_model", None), "alphas_cumprod",
                                                             None) is not None,
        },
        "sd_model": [name for name in MODEL_NAMES if has(p.sd_model, name)],
        "sd_checkpoint_info.filename": has(getattr(p.sd_model, "sd_checkpoint_info", None), "filename"),
    }


def host_facts() -> dict:
    return {"modules": modules_facts(), "managers": manager_facts(), "callbacks": callback_facts(),
            "cmd_opts": cmd_opts_facts(), "state": state_facts(), "opts": opts_facts(),
            "processing": processing_facts(), "script": script_facts(), "xyz": xyz_facts()}


def record(p, out: Path) -> None:
    from modules import processing

    mode = "img2img" if isinstance(p, processing.StableDiffusionProcessingImg2Img) else "txt2img"
    facts = json.loads(out.read_text()) if out.is_file() else {"generations": {}}
    facts.update(host_facts())
    facts["generations"][f"{mode} {p.sampler_name}"] = generation_facts(p)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(facts, indent=1, sort_keys=True))
    os.replace(partial, out)


class FirstDrawProbe:
    """Wraps ``p.rng`` as One More Step does: at the first draw (the sampler exists by then) the facts are written."""

    def __init__(self, inner, p, out: Path):
        self.inner, self.p, self.out, self.done = inner, p, out, False

    def next(self):
        x = self.inner.next()
        if not self.done:
            self.done = True
            try:
                record(self.p, self.out)
            except Exception as error:  # noqa: BLE001 - a probe must not break the generation it looks at
                print(f"[fakes probe] could not record: {type(error).__name__}: {error}")
        return x

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FakesProbeScript(scripts.Script):
    def title(self):
        return "Fakes probe (tests)"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process_batch(self, p, *args, **kwargs):
        out = os.environ.get(OUT_VARIABLE)
        if out and hasattr(p, "rng"):
            p.rng = FirstDrawProbe(p.rng, p, Path(out))
