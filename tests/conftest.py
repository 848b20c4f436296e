"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """Tiny networks on one CPU thread: on a small shared machine two threads fight and get many times slower."""
    torch.set_num_threads(1)
