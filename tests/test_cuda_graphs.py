"""OMSModule.forward and the text encoder: the plain network on the CPU, replayed CUDA graphs on a GPU (those tests
skip without CUDA). The same behaviour with a fake torch.cuda on the CPU: test_fast_path.py."""

import logging
import threading

import pytest
import torch

from lib_oms.cuda_graphs import GraphedCall
from lib_oms.module_files import load_module
from lib_oms.text_encoders import BOS_ID, EOS_ID
from tests.factories import (
    random_state_dict,
    tiny_inputs,
    tiny_openclip_encoder,
    tiny_unet_config,
    write_released_folder,
)

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


@needs_cuda
def test_shapes_in_turn_share_one_pool_and_stay_right(folder):
    module = load_module(folder, device="cuda")
    shapes = [(8, 8, 1), (16, 12, 2), (8, 8, 1), (16, 12, 2), (8, 8, 1)]
    for seed, (height, width, batch) in enumerate(shapes):
        sample, context = (x.cuda() for x in tiny_inputs(module.config, height, width, batch=batch, seed=seed))
        assert torch.allclose(module.forward(sample, context), module.unet(sample, context), atol=1e-5)
    assert len(module._graphed) == 2


class SyncsWhileCapturing(torch.nn.Module):
    """A network that reads a value back to the CPU: legal eagerly, forbidden inside a CUDA-graph capture."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, sample, context):
        return sample * self.scale.item() + context.mean()


@needs_cuda
def test_a_capture_that_fails_on_the_gpu_falls_back_to_eager(caplog):
    network = SyncsWhileCapturing().cuda()
    graphed = GraphedCall(network, [network], name="the syncing network")
    with caplog.at_level(logging.WARNING, logger="lib_oms"):
        for seed in (1, 2, 3):
            sample = torch.randn(2, 4, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            context = torch.randn(2, 5, 6, device="cuda")
            assert torch.allclose(graphed(sample, context), 2 * sample + context.mean())
    assert graphed.failure is not None and len(graphed) == 0
    assert len([r for r in caplog.records if "without CUDA graphs" in r.getMessage()]) == 1
    print("capture failure said:", graphed.failure)
    torch.cuda.synchronize()  # the device is still healthy
    assert torch.ones(3, device="cuda").sum().item() == 3


@needs_cuda
def test_another_thread_using_the_gpu_while_capturing(folder):
    """The WebUI's live preview decodes in the HTTP thread: its allocations and syncs must not break a capture."""
    module = load_module(folder, device="cuda")
    stop, errors = threading.Event(), []

    def preview():
        try:
            while not stop.is_set():
                image = torch.randn(1, 3, 256 + torch.randint(0, 64, ()).item(), 256, device="cuda")
                (image.clamp(-1, 1) * 127.5).byte().cpu()  # a fresh allocation and a device-to-host sync
        except Exception as error:  # reported below: the thread must not fail
            errors.append(error)

    thread = threading.Thread(target=preview)
    thread.start()
    try:
        for height in (8, 16, 24, 8, 16):
            sample, context = (x.cuda() for x in tiny_inputs(module.config, height, 8, seed=height))
            assert torch.allclose(module.forward(sample, context), module.unet(sample, context), atol=1e-5)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and module._graphed.failure is None


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_module_on_the_second_gpu_while_the_current_device_is_the_first(folder):
    module = load_module(folder, device="cuda:1")
    assert torch.cuda.current_device() == 0  # the WebUI with --device-id 1 never calls set_device
    for seed in (1, 2):
        sample, context = (x.to("cuda:1") for x in tiny_inputs(module.config, seed=seed))
        assert torch.allclose(module.forward(sample, context), module.unet(sample, context), atol=1e-5)
    assert len(module._graphed) == 1 and module._graphed.failure is None


def settled_reserved() -> int:
    """GPU memory torch holds once its caches are emptied (cuBLAS keeps a workspace per stream otherwise)."""
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


@needs_cuda
def test_graph_memory_is_freed_with_the_module(folder):
    config = tiny_unet_config(block_out_channels=[64, 128, 128], norm_num_groups=32)
    root = write_released_folder(folder.parent, "wide_sd15", config, random_state_dict(config))
    mib, tolerance = 2**20, 2 * 2**20

    def capture_two(module):
        for batch in (1, 2):
            module.forward(*(x.to("cuda", torch.float16) for x in tiny_inputs(module.config, 128, 128, batch=batch)))

    baseline = settled_reserved()
    module = load_module(root, device="cuda", dtype=torch.float16)
    loaded = settled_reserved()
    capture_two(module)
    held = settled_reserved()
    module.release_graphs()
    released = settled_reserved()
    print(f"weights {(loaded - baseline) / mib:.1f} MiB; two graphs at 128x128 held {(held - released) / mib:.1f} MiB")
    assert held - released > 8 * mib and released <= loaded + tolerance  # empty_cache alone could not free it
    capture_two(module)
    module.to("cpu")
    assert settled_reserved() <= baseline + tolerance  # moving the module freed its graphs and their pool
    module.to("cuda")
    capture_two(module)
    del module
    assert settled_reserved() <= baseline + tolerance  # and so did dropping it


@needs_cuda
def test_channels_last_on_the_gpu(folder):
    module = load_module(folder, device="cuda", dtype=torch.float16)
    sample, context = (x.to("cuda", torch.float16) for x in tiny_inputs(module.config, 16, 16))
    plain = module.forward(sample, context)
    module.set_speed_options(channels_last=True)
    fast = module.forward(sample, context)
    assert close_in_fp16(fast, plain) and len(module._graphed) == 1


# ---------------------------------------------------------------------------------------------------------------
# The text encoder on the fast path (token ids made by hand: no tokenizer needed on the GPU machine)


def close_in_fp16(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within a few fp16 roundings of the largest value (fp16 keeps 11 significant bits)."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() <= 8 * 2**-11 * b.abs().max().item()


def token_ids(batch: int, seed: int) -> torch.Tensor:
    """[batch, 77] ids laid out as the tokenizer does: BOS, words, EOS, padding 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for row in range(batch):
        length = int(torch.randint(1, 40, (), generator=generator))
        words = torch.randint(300, 40000, (length,), generator=generator)
        ids[row, : length + 2] = torch.cat([torch.tensor([BOS_ID]), words, torch.tensor([EOS_ID])])
    return ids


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_text_encoder_replays_graphs_per_batch_size(dtype):
    encoder = tiny_openclip_encoder(seed=4, device="cuda", dtype=dtype)
    for batch, seed in ((1, 1), (2, 2), (1, 3), (2, 4)):
        ids = token_ids(batch, seed)
        graphed = encoder.features(ids)
        eager = encoder._features(ids.cuda())
        assert close_in_fp16(graphed, eager) if dtype == torch.float16 else torch.allclose(graphed, eager, atol=1e-5)
    assert len(encoder._graphed) == 2 and encoder._graphed.failure is None


@needs_cuda
def test_a_batch_of_prompts_on_the_gpu_encodes_as_each_alone():
    encoder = tiny_openclip_encoder(seed=4, device="cuda", dtype=torch.float16)
    ids = token_ids(3, 7)
    together = encoder.features(ids)
    alone = torch.cat([encoder.features(ids[i:i + 1]) for i in range(3)])
    print("fp16 batch of 3 vs each alone, max |diff|:", (together.float() - alone.float()).abs().max().item())
    assert close_in_fp16(together, alone)  # the rounding of differently batched kernels


@needs_cuda
def test_the_text_encoders_graphs_go_when_it_moves():
    encoder = tiny_openclip_encoder(seed=4, device="cuda")
    encoder.features(token_ids(1, 1))
    assert len(encoder._graphed) == 1
    encoder.to("cpu")
    assert len(encoder._graphed) == 0
