"""Where tests/webui_fakes.py differs from a real WebUI: the facts the probe extension (probe/scripts/fakes_probe.py)
records in the WebUI, compared with the same probe run in the fakes.

``read_by_the_extension`` reads, from the extension's WebUI code, which attributes it reads on ``p``, its sampler,
the loaded model, ``shared.cmd_opts``, ``shared.state`` and ``devices``; for those the fakes must have what the WebUI
has (an attribute the WebUI lacks must be missing from the fake too: the extension's getattr defaults then count).
Everything else the fakes offer (modules and their names, callbacks, settings, the X/Y/Z plot's AxisOption) must
exist in the WebUI as the fakes have it. Each difference is one line naming the fake, the WebUI's value and the
fake's. Needs no WebUI: the real side is the probe's JSON.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "probe"
PROBE_SCRIPT = PROBE / "scripts" / "fakes_probe.py"
# The extension's code that runs in the A1111 family (oms_webui/sdnext.py is SD.Next's).
EXTENSION_FILES = (REPO / "scripts" / "one_more_step.py",
                   *sorted(p for p in (REPO / "oms_webui").glob("*.py") if p.name != "sdnext.py"))
# What the attributes the extension reads are read on, by the name the code gives them.
READ_ON = {"p": "p", "p.sampler": "sampler", "sampler": "sampler", "sd_model": "sd_model", "p.sd_model": "sd_model",
           "shared.cmd_opts": "cmd_opts", "shared.state": "state", "state": "state", "devices": "devices"}
# The generations the real-WebUI test makes, by the key the probe files them under.
GENERATIONS = ("txt2img Euler a", "txt2img DDIM", "img2img Euler a")
# The kinds the runner names (tests/webui/harness/host.py) and their family in webui_fakes.FAMILIES.
FAMILY_OF_KIND = {"Forge Classic": "forge-classic", "Forge Neo": "forge-neo", "reForge": "reforge",
                  "Forge": "forge"}


def family_of(kind: str) -> str:
    return "a1111" if kind.startswith("A1111") else FAMILY_OF_KIND[kind]


def dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def read_by_the_extension(files=EXTENSION_FILES) -> dict[str, set[str]]:
    """{"p": {...}, "sampler": {...}, ...}: the public attributes the extension reads (``x.name``,
    ``getattr(x, "name", ...)``, ``hasattr(x, "name")``) on each of READ_ON's objects."""
    read: dict[str, set[str]] = {kind: set() for kind in set(READ_ON.values())}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                base, name = dotted(node.value), node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr",
                  "hasattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str)):
                base, name = dotted(node.args[0]), node.args[1].value
            else:
                continue
            if base in READ_ON and not name.startswith("_"):
                read[READ_ON[base]].add(name)
    return read


def load_probe():
    """The probe's module, imported as the WebUI imports an extension's script (the fakes must be installed)."""
    spec = importlib.util.spec_from_file_location("fakes_probe.py", PROBE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_the_fakes(family: str, work: Path) -> dict:
    """The probe's record of the fakes of ``family``: the fake WebUI with One More Step and the probe, its UI built,
    then the three generations of GENERATIONS (One More Step off: what is recorded does not depend on it)."""
    import pytest
    import torch

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests import webui_fakes as fakes

    out = work / "fakes.json"
    out.unlink(missing_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMS_FAKES_PROBE", str(out))
        webui = fakes.install(patch, work / "models", family=family)
        fakes.add_xyz_script(webui)
        webui.other_scripts.append(load_probe().FakesProbeScript())
        webui.build_ui()

        def ddim():
            pass

        for sampler, name in ((fakes.KDiffusionSampler(), "Euler a"), (fakes.CompVisSampler(ddim), "DDIM")):
            webui.run(fakes.StableDiffusionProcessingTxt2Img(
                sd_model=fakes.FakeSDModel(webui=family), sampler=sampler, sampler_name=name), [False])
        image = torch.zeros(1, 4, 5, 6)
        webui.run(fakes.StableDiffusionProcessingImg2Img(
            sd_model=fakes.FakeSDModel(webui=family), sampler=fakes.KDiffusionSampler(), sampler_name="Euler a",
            image_mask="a mask", inpainting_fill=2, denoising_strength=1.0, init_latent=image,
            nmask=torch.ones(4, 5, 6)), [False])
        assert webui.errors == [], webui.errors
        facts = json.loads(out.read_text())
        facts["elem_ids"] = webui.elem_ids(False) + webui.elem_ids(True)
    return facts


def same(a, b) -> bool:
    """Equal as the WebUI would see them: 0 == 0.0 == False is not enough for a default (a bool is not a number)."""
    return a == b and type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                             and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def presence(what: str, names, fake_has, host_has) -> list[str]:
    lines = []
    for name in sorted(names):
        if fake_has(name) and not host_has(name):
            lines.append(f"{what}.{name}: the fake has it, the WebUI does not")
        elif host_has(name) and not fake_has(name):
            lines.append(f"{what}.{name}: the WebUI has it, the fake does not")
    return lines


def defaults(what: str, names, fake: dict, host: dict) -> list[str]:
    return [f"{what}.{name}: the WebUI's default is {host[name]!r}, the fake's {fake[name]!r}"
            for name in sorted(names) if name in fake and name in host and not same(fake[name], host[name])]


def processing_drift(fake: dict, host: dict, read: dict, request_fields) -> list[str]:
    lines = []
    checked = read["p"] - set(request_fields)
    for mode in ("txt2img", "img2img"):
        real, ours = host["processing"][mode], fake["processing"][mode]
        if real["error"]:
            lines.append(f"p ({mode}): the WebUI's class could not be made without arguments ({real['error']}): "
                         "its field defaults were compared")
        what = f"StableDiffusionProcessing{'Txt2Img' if mode == 'txt2img' else 'Img2Img'}"
        names = {name for name in checked if name in real["values"] or name in ours["values"]}
        lines += presence(what, names, ours["values"].__contains__, real["values"].__contains__)
        lines += defaults(what, names, ours["values"], real["values"])
    for generation in GENERATIONS:
        if generation not in host["generations"]:
            lines.append(f"the WebUI's record has no {generation!r} generation (it has "
                         f"{sorted(host['generations'])})")
            continue
        real, ours = host["generations"][generation], fake["generations"][generation]
        lines += presence(f"p ({generation}, at the first draw)", read["p"], set(ours["p"]).__contains__,
                          set(real["p"]).__contains__)
    return lines


def sampler_and_model_drift(fake: dict, host: dict, read: dict) -> list[str]:
    lines = []
    for generation in GENERATIONS:
        if generation not in host["generations"]:
            continue  # said by processing_drift
        real, ours = host["generations"][generation], fake["generations"][generation]
        # ᾱ on the sampler's model_wrap is read for timestep samplers only (Forge Neo's k-diffusion samplers have it
        # only once a timestep sampler has run)
        keys = ("k_diffusion", "timesteps") + (("model_wrap.inner_model.alphas_cumprod",)
                                               if real["sampler"]["timesteps"] else ())
        for key in keys:
            if ours["sampler"][key] != real["sampler"][key]:
                lines.append(f"sampler of {generation!r} ({real['sampler']['class']}): {key} is "
                             f"{real['sampler'][key]} in the WebUI, {ours['sampler'][key]} in the fake")
        for what, key, names in ((f"sampler of {generation!r}", "sampler", lambda facts: facts["sampler"]["names"]),
                                 (f"sd_model ({generation})", "sd_model", lambda facts: facts["sd_model"])):
            ours_names, real_names = set(names(ours)), set(names(real))
            lines += presence(what, read[key] & (ours_names | real_names), ours_names.__contains__,
                              real_names.__contains__)
        if ours["sd_checkpoint_info.filename"] != real["sd_checkpoint_info.filename"]:
            lines.append(f"sd_model.sd_checkpoint_info.filename ({generation}): "
                         f"{real['sd_checkpoint_info.filename']} in the WebUI, {ours['sd_checkpoint_info.filename']} "
                         "in the fake")
    return lines


def shared_drift(fake: dict, host: dict, read: dict) -> list[str]:
    """shared.cmd_opts, shared.state and modules.devices: what the extension reads, and the defaults the fakes give."""
    lines = []
    for what, key in (("shared.cmd_opts", "cmd_opts"), ("shared.state", "state")):
        real, ours = host[key]["defaults"], fake[key]["defaults"]
        names = read[key] | {n for n in ours if n in real}
        lines += presence(what, names, ours.__contains__, real.__contains__)
        lines += defaults(what, names, ours, real)
    real_devices = set(host["modules"]["names"].get("modules.devices", []))
    ours_devices = set(fake["modules"]["names"]["modules.devices"])
    lines += presence("modules.devices", read["devices"], ours_devices.__contains__, real_devices.__contains__)
    return lines


def opts_drift(fake: dict, host: dict) -> list[str]:
    """Every setting the fakes hold (the WebUI's that the extension or the fakes read, and the extension's own once
    registered) with the WebUI's default."""
    lines = []
    for name in sorted(fake["opts"]):
        if name not in host["opts"]:
            lines.append(f"shared.opts[{name!r}]: the fake has the setting, the WebUI does not")
        elif not same(fake["opts"][name], host["opts"][name]):
            lines.append(f"shared.opts[{name!r}]: the WebUI's default is {host['opts'][name]!r}, the fake's "
                         f"{fake['opts'][name]!r}")
    return lines


def modules_drift(fake: dict, host: dict, fakes_own: dict) -> list[str]:
    lines = [f"{name}: the WebUI {'has' if real else 'lacks'} it, the fake {'has' if ours else 'lacks'} it"
             for name, real in sorted(host["modules"]["present"].items())
             if (ours := fake["modules"]["present"][name]) != real]
    real_modules = host["modules"]["names"]
    for name, names in sorted(fake["modules"]["names"].items()):
        if name == "modules":
            continue
        if name not in real_modules:
            lines.append(f"{name}: the fake has it, the WebUI has not imported it"
                         + (" (it has it)" if host["modules"]["present"].get(name) else ""))
            continue
        missing = set(names) - set(real_modules[name]) - fakes_own.get(name, set())
        lines += [f"{name}.{missing_name}: the fake has it, the WebUI does not" for missing_name in sorted(missing)]
    return lines


def manager_drift(fake: dict, host: dict, fakes_own_names=("freed",)) -> list[str]:
    lines = []
    for name in sorted(set(fake["managers"]) | set(host["managers"])):
        if name not in host["managers"]:
            lines.append(f"memory manager {name}: the fake has it, the WebUI does not")
            continue
        if name not in fake["managers"]:
            lines.append(f"memory manager {name}: the WebUI has it, the fake does not")
            continue
        real, ours = host["managers"][name], fake["managers"][name]
        lines += [f"{name}.{n}: the fake has it, the WebUI does not"
                  for n in sorted(set(ours["names"]) - set(real["names"]) - set(fakes_own_names))]
        for key in ("vram_states", "free_memory"):
            if ours[key] != real[key]:
                lines.append(f"{name} {key}: {real[key]} in the WebUI, {ours[key]} in the fake")
    return lines


def callbacks_drift(fake: dict, host: dict) -> list[str]:
    real, ours = host["callbacks"], fake["callbacks"]
    lines = [f"script_callbacks {category}: the fake has it, the WebUI does not"
             for category in sorted(set(ours["categories"]) - set(real["categories"]))]
    if ours["by_one_more_step"] != real["by_one_more_step"]:
        lines.append(f"callbacks One More Step registered: {real['by_one_more_step']} in the WebUI, "
                     f"{ours['by_one_more_step']} in the fakes")
    for name, parameters in sorted(ours["on_functions"].items()):
        if real["on_functions"].get(name) != parameters:
            lines.append(f"script_callbacks.{name}: parameters {real['on_functions'].get(name)} in the WebUI, "
                         f"{parameters} in the fake")
    return lines


def script_and_xyz_drift(fake: dict, host: dict) -> list[str]:
    lines = [f"modules.scripts.Script.{name}: the fake has it, the WebUI does not"
             for name in sorted(set(fake["script"]["names"]) - set(host["script"]["names"]))]
    if fake["script"]["always_visible"] != host["script"]["always_visible"]:
        lines.append("modules.scripts.AlwaysVisible: present in one, not the other")
    real, ours = host["xyz"], fake["xyz"]
    if real is None:
        return [*lines, "the WebUI has no X/Y/Z plot script where the extension looks for it"]
    if ours["axis_option"] != real["axis_option"]:
        lines.append(f"AxisOption parameters [name, required]: {real['axis_option']} in the WebUI, "
                     f"{ours['axis_option']} in the fake")
    lines += [f"xyz_grid.{name}: the fake has it, the WebUI does not"
              for name in sorted(set(ours["names"]) - set(real["names"]))]
    if ours["oms_axes"] != real["oms_axes"]:
        lines.append(f"the OMS axes: {real['oms_axes']} in the WebUI, {ours['oms_axes']} in the fake")
    return lines


def family_drift(family: str, host: dict, families) -> list[str]:
    """webui_fakes.FAMILIES[family] against what the WebUI has."""
    expected = families[family]
    lines = []
    if expected.has_lowvram != host["modules"]["present"]["modules.lowvram"]:
        lines.append(f"FAMILIES[{family!r}].has_lowvram is {expected.has_lowvram}; the WebUI "
                     f"{'has' if host['modules']['present']['modules.lowvram'] else 'lacks'} modules.lowvram")
    managers = sorted(host["managers"])
    if [expected.manager] != (managers or [None]):
        lines.append(f"FAMILIES[{family!r}].manager is {expected.manager}; the WebUI has {managers or 'none'}")
    has_use_cpu = "use_cpu" in host["cmd_opts"]["defaults"]
    if expected.has_use_cpu != has_use_cpu:
        lines.append(f"FAMILIES[{family!r}].has_use_cpu is {expected.has_use_cpu}; the WebUI "
                     f"{'has' if has_use_cpu else 'lacks'} --use-cpu")
    return lines


def elem_ids_drift(fake_ids: set[str], host_ids: set[str]) -> list[str]:
    return ([f"element id {i!r}: the WebUI makes it, the fakes do not" for i in sorted(host_ids - fake_ids)]
            + [f"element id {i!r}: the fakes make it, the WebUI does not" for i in sorted(fake_ids - host_ids)])
