"""Where the module and text encoder are while the WebUI works: on the OMS device for the step, the WebUI's memory
manager asked for room first (the Forge family's, found by what it offers; A1111's --lowvram / --medvram otherwise),
and back on the CPU afterwards in low-VRAM mode or when they are not kept in VRAM. Imports the WebUI's ``modules``
when a function runs; ``modules.lowvram`` (A1111, Forge, reForge only) only in A1111's low-VRAM mode."""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass

import torch

from lib_oms.runtime import Prepared
from oms_webui.logic import manager_low_vram, offload_after_use, room_to_ask


@functools.cache  # the WebUI does not change while it runs: look once, not at every generation
def memory_manager():
    """The Forge family's memory manager, which places every model on the GPU itself (Forge and Forge Neo:
    ``backend.memory_management``; reForge and Forge Classic: ``ldm_patched.modules.model_management``), or None
    (A1111, whose --lowvram / --medvram is ``modules.lowvram``)."""
    for name in ("backend.memory_management", "ldm_patched.modules.model_management"):
        try:
            manager = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(manager, "free_memory", None)) and hasattr(manager, "vram_state"):
            return manager
    return None


def low_vram_mode(sd_model) -> bool:
    """A1111's --lowvram / --medvram (set on the model by modules.lowvram), or the Forge family's manager in a
    low-VRAM state: then the module and text encoder leave the GPU after the step."""
    if getattr(sd_model, "lowvram", False):
        return True
    manager = memory_manager()
    return manager is not None and manager_low_vram(getattr(manager.vram_state, "name", str(manager.vram_state)))


@dataclass(frozen=True)
class Placement:
    """Where the OMS step runs and what happens to its weights around it."""

    device: torch.device
    low_vram: bool = False
    offload: bool = False  # back to the CPU after the step

    @classmethod
    def of(cls, device: torch.device, sd_model, keep_in_vram: bool) -> Placement:
        low_vram = low_vram_mode(sd_model)
        return cls(device, low_vram, offload_after_use(keep_in_vram, low_vram, device.type))

    @property
    def home(self) -> torch.device:
        """Where the weights wait between steps."""
        return torch.device("cpu") if self.offload else self.device


def bytes_off(device: torch.device, models) -> int:
    """Bytes of the models' weights that are not on ``device`` yet."""
    return sum(t.numel() * t.element_size() for model in models for t in (*model.parameters(), *model.buffers())
               if t.device.type != device.type)


def managers_device(manager, device: torch.device) -> torch.device:
    """``device`` as the manager names it: it tells its models' devices apart by ``==``, and torch.device("cuda")
    is not torch.device("cuda:0")."""
    own = manager.get_torch_device() if callable(getattr(manager, "get_torch_device", None)) else None
    if device.index is None and own is not None and torch.device(own).type == device.type:
        return torch.device(own)
    return device


def make_room(prepared: Prepared, placement: Placement) -> None:
    """Room on the GPU for the module and text encoder: the Forge family's manager frees what they need as it does
    for its own models (and unloads everything in its no-VRAM state); on A1111 in low-VRAM mode the WebUI's model
    goes to the CPU first (modules.lowvram)."""
    if placement.device.type == "cpu":
        return
    manager = memory_manager()
    if manager is not None:
        inference = manager.minimum_inference_memory() if hasattr(manager, "minimum_inference_memory") else 0
        room = room_to_ask(bytes_off(placement.device, prepared.torch_models()), inference)
        manager.free_memory(room, managers_device(manager, placement.device))
    elif placement.low_vram:
        importlib.import_module("modules.lowvram").send_everything_to_cpu()


@contextlib.contextmanager
def on_device(prepared: Prepared, placement: Placement):
    """The module and text encoder on the OMS device for the step, after ``make_room``; offloaded afterwards in
    low-VRAM mode or when they are not kept in VRAM."""
    from modules import devices

    make_room(prepared, placement)
    prepared.to(placement.device)
    try:
        yield
    finally:
        if placement.offload:
            prepared.to("cpu")
            devices.torch_gc()
