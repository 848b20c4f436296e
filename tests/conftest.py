"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """Tiny networks on one CPU thread: on a small shared machine two threads fight and get many times slower."""
    torch.set_num_threads(1)


@pytest.fixture
def as_on_torch_2_0(monkeypatch):
    """Call it to make ``load_state_dict`` as torch 2.0 (A1111 1.6/1.7) has it, without the ``assign`` keyword, and
    lib_oms's capability flag say so; on a torch 2.0 stack that is already the case."""
    from lib_oms import unet

    real = torch.nn.Module.load_state_dict

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        if kwargs:
            raise TypeError(f"load_state_dict() got an unexpected keyword argument {next(iter(kwargs))!r}")
        return real(self, state_dict, strict=strict)

    def apply():
        monkeypatch.setattr(torch.nn.Module, "load_state_dict", load_state_dict)
        monkeypatch.setattr(unet, "_CAN_ASSIGN", False)

    return apply
