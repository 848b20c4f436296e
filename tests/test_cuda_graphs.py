"""OMSModule.forward: the plain network on the CPU, replayed CUDA graphs on a GPU (those tests skip without CUDA)."""

import pytest
import torch

from lib_oms.modules import load_module
from tests.factories import random_state_dict, tiny_inputs, tiny_unet_config, write_released_folder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = tiny_unet_config()
    return write_released_folder(tmp_path_factory.mktemp("modules"), "tiny_sd15", config, random_state_dict(config),
                                 latent_space="sd", text_encoder="openclip-h")


def test_forward_on_the_cpu_is_the_network(folder):
    module = load_module(folder)
    sample, context = tiny_inputs(module.config)
    assert torch.equal(module.forward(sample, context), module.unet(sample, context))
    assert len(module._graphed) == 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replayed_graph_equals_the_eager_network(folder, dtype):
    module = load_module(folder, device="cuda", dtype=dtype)
    for seed in (1, 2):  # the second call replays the graph captured by the first, with new inputs
        sample, context = (x.to("cuda", dtype) for x in tiny_inputs(module.config, 16, 12, seed=seed))
        eager = module.unet(sample, context)
        assert torch.allclose(module.forward(sample, context), eager, atol=1e-3 if dtype == torch.float16 else 1e-5)
    assert len(module._graphed) == 1


@needs_cuda
def test_graphs_per_shape_and_dropped_when_the_weights_move(folder):
    module = load_module(folder, device="cuda")
    for height in (8, 16, 24):
        module.forward(*(x.cuda() for x in tiny_inputs(module.config, height, 8)))
    assert len(module._graphed) == 2  # the least recently used graph was dropped
    module.to("cuda")
    assert len(module._graphed) == 2  # not moved: the graphs stay
    module.to("cpu")
    assert len(module._graphed) == 0
    module.to("cuda")
    sample, context = (x.cuda() for x in tiny_inputs(module.config, 8, 8))
    assert torch.allclose(module.forward(sample, context), module.unet(sample, context), atol=1e-5)  # new weights
    assert len(module._graphed) == 1


@needs_cuda
def test_graphs_off_runs_the_network_eagerly(folder):
    module = load_module(folder, device="cuda")
    module.cuda_graphs = False
    module.forward(*(x.cuda() for x in tiny_inputs(module.config)))
    assert len(module._graphed) == 0
