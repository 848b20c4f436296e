"""The GPU fast path on the CPU: CUDA-graph capture and replay driven through a fake ``torch.cuda`` (device, failing
capture, threads, freeing), the OMS step in its own precision under autocast, the text encoder's one-call batches,
and the channels-last option. What only a GPU can show is in test_cuda_graphs.py and test_script_gpu.py."""

import contextlib
import gc
import logging
import threading
import time
import weakref

import pytest
import torch

from lib_oms import cuda_graphs
from lib_oms.cuda_graphs import GraphedCall, replay_mismatch, replay_tolerance
from lib_oms.engine import oms_start, predict_v
from lib_oms.module_files import load_module
from lib_oms.step import SamplerStart
from lib_oms.text_encoders import PromptEmbeddingCache, tower_hidden_states
from tests.factories import (
    TINY_OPENCLIP_H,
    random_state_dict,
    tiny_inputs,
    tiny_openclip_encoder,
    tiny_text_model,
    tiny_unet_config,
    write_released_folder,
)

# ---------------------------------------------------------------------------------------------------------------
# A fake torch.cuda: the calls GraphedCall makes, with CUDA graphs' semantics (a replay re-runs what was recorded
# during capture, reading the static inputs and writing the static output) and a current device that only
# torch.cuda.device changes, as with the WebUI's --device-id.


class FakeGraph:
    def __init__(self, cuda):
        self.cuda, self.recorded, self.replays = cuda, [], 0

    def pool(self):
        return ("pool", id(self))

    def replay(self):
        self.cuda.seen.append(("replay", self.cuda.current))
        with self.cuda.count_active():
            for fn, args, out in self.recorded:
                out.copy_(self.cuda.mis_replay(fn(*args)))
        self.replays += 1


class FakeCuda:
    def __init__(self, fail_capture: Exception | None = None, replay_delay: float = 0.0, mis_replay=None):
        self.current = "cuda:0"  # what torch.cuda.current_device() would say: the WebUI never changes it
        self.capturing: FakeGraph | None = None
        self.fail_capture, self.replay_delay = fail_capture, replay_delay
        self.mis_replay = mis_replay or (lambda out: out)  # what a replay writes instead of the right output
        self.seen, self.graphs, self.captures = [], [], []
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def count_active(self):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.replay_delay)  # a replay takes time: another thread may write the static inputs meanwhile
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1

    def install(self, monkeypatch):
        monkeypatch.setattr(cuda_graphs, "GRAPH_DEVICE_TYPE", "cpu")
        monkeypatch.setattr(cuda_graphs, "CAPTURE_MODE_SUPPORTED", True)
        for name in ("device", "Stream", "current_stream", "stream", "set_stream", "CUDAGraph", "graph",
                     "is_current_stream_capturing"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, str(device)
        try:
            yield
        finally:
            self.current = previous

    def Stream(self, device=None):  # noqa: N802 (torch's name)
        self.seen.append(("stream", str(device), self.current))
        return FakeStream(str(device))

    def current_stream(self, device=None):
        return FakeStream(str(device))

    @contextlib.contextmanager
    def stream(self, stream):
        yield

    def set_stream(self, stream):
        self.seen.append(("set_stream", stream.device, self.current))

    def CUDAGraph(self):  # noqa: N802 (torch's name)
        graph = FakeGraph(self)
        self.graphs.append(graph)
        return graph

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None, capture_error_mode="global"):
        self.captures.append({"device": self.current, "stream": stream.device, "mode": capture_error_mode,
                              "pool": pool})
        if self.fail_capture is not None:
            raise self.fail_capture
        self.capturing = graph
        try:
            yield
        finally:
            self.capturing = None
        for _fn, _args, out in graph.recorded:  # a capture runs no kernel: its outputs hold whatever was there
            out.fill_(float("nan"))

    def is_current_stream_capturing(self):
        return self.capturing is not None


class FakeStream:
    def __init__(self, device):
        self.device = device

    def wait_stream(self, other):
        pass


class Network:
    """y = 2·sample + mean(context); during a fake capture it records itself on the graph, as kernels would."""

    def __init__(self, cuda):
        self.cuda, self.calls = cuda, 0
        self.weight = torch.nn.Linear(1, 1)

    @staticmethod
    def compute(sample, context):
        return 2 * sample + context.mean()

    def __call__(self, sample, context):
        self.calls += 1
        out = self.compute(sample, context)
        if self.cuda.capturing is not None:
            self.cuda.capturing.recorded.append((self.compute, (sample, context), out))
        return out


def inputs(seed, batch=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 3, 3, generator=generator), torch.randn(batch, 5, 6, generator=generator)


def test_capture_and_replay_run_on_the_inputs_device(monkeypatch):
    cuda = FakeCuda().install(monkeypatch)
    network = Network(cuda)
    graphed = GraphedCall(network, [network.weight], name="the test network")
    for seed in (1, 2, 3):  # capture, then replays with new inputs
        x = inputs(seed)
        assert torch.equal(graphed(*x), Network.compute(*x))
    assert len(cuda.graphs) == 1 and cuda.graphs[0].replays == 3
    device = str(x[0].device)
    assert device != "cuda:0"  # the sample's device is not the current one
    assert cuda.captures == [{"device": device, "stream": device, "mode": "thread_local", "pool": None}]
    assert cuda.seen == [("stream", device, device)] + [("replay", device)] * 3
    assert cuda.current == "cuda:0"  # left as it was


def test_graphs_of_one_call_site_share_a_pool(monkeypatch):
    cuda = FakeCuda().install(monkeypatch)
    network = Network(cuda)
    graphed = GraphedCall(network, [network.weight], name="the test network", max_graphs=2)
    for batch in (1, 2, 1, 2, 3):
        x = inputs(batch, batch)
        assert torch.equal(graphed(*x), Network.compute(*x))
    first = cuda.graphs[0].pool()
    assert [c["pool"] for c in cuda.captures] == [None, first, first]
    assert len(graphed) == 2  # batch 1 was the least recently used
    graphed.clear()
    graphed(*inputs(4, 1))
    assert cuda.captures[-1]["pool"] is None  # a new pool once the old graphs are gone


def test_a_failed_capture_falls_back_to_eager_once_and_says_so(monkeypatch, caplog):
    cuda = FakeCuda(fail_capture=RuntimeError("CUDA error: operation not supported (hipErrorNotSupported)"))
    cuda.install(monkeypatch)
    network = Network(cuda)
    graphed = GraphedCall(network, [network.weight], name="the test network")
    with caplog.at_level(logging.WARNING, logger="lib_oms"):
        for seed in (1, 2, 3):
            x = inputs(seed)
            assert torch.equal(graphed(*x), Network.compute(*x))
    assert len(cuda.captures) == 1 and len(graphed) == 0  # never tried again
    device = str(x[0].device)
    assert ("set_stream", device, device) in cuda.seen  # the caller's stream is current again
    (record,) = caplog.records
    assert "the test network runs without CUDA graphs from now on" in record.getMessage()
    assert "hipErrorNotSupported" in record.getMessage()
    assert "hipErrorNotSupported" in graphed.failure


@pytest.mark.parametrize("mis_replay, what", [
    (lambda out: out + 0.25, "wrong numbers"),
    (lambda out: torch.zeros_like(out), "a stale output buffer"),
    (lambda out: torch.where(out > 0, out, torch.nan), "non-finite values"),
])
def test_a_graph_whose_first_replay_is_wrong_gives_the_eager_result_and_runs_eagerly(monkeypatch, caplog, mis_replay,
                                                                                   what):
    cuda = FakeCuda(mis_replay=mis_replay).install(monkeypatch)
    network = Network(cuda)
    graphed = GraphedCall(network, [network.weight], name="the test network")
    with caplog.at_level(logging.WARNING, logger="lib_oms"):
        for seed in (1, 2, 3):
            x = inputs(seed)
            assert torch.equal(graphed(*x), Network.compute(*x)), what
    assert len(cuda.captures) == 1 and cuda.graphs[0].replays == 1  # the one checked replay, then eager
    assert len(graphed) == 0 and graphed.failure is not None
    (record,) = caplog.records
    message = record.getMessage()
    assert "the test network runs without CUDA graphs from now on" in message
    assert "first replay differs from the eager call by up to" in message and "tolerance" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_replay_within_rounding_of_the_eager_call_stays_graphed(monkeypatch, caplog, dtype):
    eps = torch.finfo(dtype).eps
    cuda = FakeCuda(mis_replay=lambda out: out + 2 * eps * out.abs().max()).install(monkeypatch)
    network = Network(cuda)
    graphed = GraphedCall(network, [network.weight], name="the test network")
    with caplog.at_level(logging.WARNING, logger="lib_oms"):
        for seed in (1, 2):
            x = tuple(t.to(dtype) for t in inputs(seed))
            assert torch.allclose(graphed(*x).float(), Network.compute(*x).float(), atol=4 * eps * 10)
    assert graphed.failure is None and len(graphed) == 1 and cuda.graphs[0].replays == 2 and caplog.records == []


def test_replay_tolerance_is_rounding_at_the_outputs_scale():
    assert replay_tolerance(torch.full((3,), 100.0, dtype=torch.float16)) == pytest.approx(8 * 2**-10 * 100)
    assert replay_tolerance(torch.full((3,), 0.01)) == pytest.approx(8 * 2**-23)  # at least one unit of scale
    assert replay_mismatch(torch.ones(2, 3), torch.ones(3, 2)).startswith("the replay gave (2, 3)")
    assert replay_mismatch(torch.ones(4), torch.ones(4) + 1e-7) is None


def test_an_error_of_the_network_itself_is_not_swallowed(monkeypatch):
    FakeCuda().install(monkeypatch)

    def broken(sample, context):
        raise ValueError("shapes do not fit")

    graphed = GraphedCall(broken, [torch.nn.Linear(1, 1)], name="the test network")
    with pytest.raises(ValueError, match="shapes do not fit"):
        graphed(*inputs(1))
    assert graphed.failure is None


def test_torch_without_thread_local_capture_runs_eagerly(monkeypatch, caplog):
    cuda = FakeCuda().install(monkeypatch)
    monkeypatch.setattr(cuda_graphs, "CAPTURE_MODE_SUPPORTED", False)
    network = Network(cuda)
    graphed = GraphedCall(network, [network.weight], name="the test network")
    with caplog.at_level(logging.WARNING, logger="lib_oms"):
        for seed in (1, 2):
            x = inputs(seed)
            assert torch.equal(graphed(*x), Network.compute(*x))
    assert cuda.captures == [] and len(caplog.records) == 1 and "torch 2.1" in caplog.records[0].getMessage()


def test_concurrent_callers_each_get_their_own_result(monkeypatch):
    """The static input buffers are shared: without the lock a replay reads another thread's inputs."""
    cuda = FakeCuda(replay_delay=0.002).install(monkeypatch)
    network = Network(cuda)
    graphed = GraphedCall(network, [network.weight], name="the test network")
    graphed(*inputs(0))  # captured before the threads start
    wrong = []

    def caller(thread):
        for call in range(10):
            x = inputs(100 * thread + call)
            if not torch.equal(graphed(*x), Network.compute(*x)):
                wrong.append((thread, call))

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == [] and cuda.max_active == 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = tiny_unet_config(cross_attention_dim=TINY_OPENCLIP_H.width)
    return write_released_folder(tmp_path_factory.mktemp("modules"), "tiny_sd15", config, random_state_dict(config),
                                 latent_space="sd", text_encoder="openclip-h")


def graph_refs(cuda):
    return [weakref.ref(graph) for graph in cuda.graphs]


def test_a_modules_graphs_go_when_its_weights_move_or_it_is_dropped(monkeypatch, folder):
    cuda = FakeCuda().install(monkeypatch)
    gc.disable()  # dropping the module must free its graphs by itself: no reference cycle left for the collector
    try:
        module = load_module(folder)
        sample, context = tiny_inputs(module.config)
        eager = module.unet(sample, context)
        assert torch.equal(module.forward(sample, context), eager)
        assert len(module._graphed) == 1
        module.to("cpu")  # not moved: the graphs stay
        assert len(module._graphed) == 1
        module.to(dtype=torch.float64)  # moved: they read the old weights
        assert len(module._graphed) == 0
        module.forward(sample.double(), context.double())
        refs = graph_refs(cuda)
        assert refs[-1]() is not None
        cuda.graphs.clear()
        del module
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------------------------
# The text encoder


@pytest.mark.parametrize("final_norm", [True, False])
def test_tower_hidden_states_equal_the_transformers_forward(final_norm):
    model = tiny_text_model(seed=3)
    ids = torch.randint(1, TINY_OPENCLIP_H.vocab_size - 2, (3, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        ours = tower_hidden_states(model, ids, final_norm=final_norm)
    reference = out.last_hidden_state if final_norm else out.hidden_states[-1]
    assert (ours - reference).abs().max().item() < 1e-5


def test_a_batch_of_prompts_encodes_as_each_alone():
    encoder = tiny_openclip_encoder(seed=3)
    prompts = ["a black cat in a dark room", "", "a white background, bright"]
    together = encoder.encode(prompts)
    for row, prompt in enumerate(prompts):
        assert (together[row] - encoder.encode([prompt])[0]).abs().max().item() < 1e-5


def test_the_encoders_graphs_are_captured_per_batch_size_and_dropped_when_moved(monkeypatch):
    cuda = FakeCuda().install(monkeypatch)
    encoder = tiny_openclip_encoder(seed=3)
    eager = encoder._features(*encoder.token_ids(["a dark alley"]))
    for prompts in (["a dark alley"], ["a dark alley", "night"], ["a dark alley"]):
        assert (encoder.encode(prompts)[0] - eager[0]).abs().max().item() < 1e-5
    assert len(encoder._graphed) == 2 and len(cuda.captures) == 2
    refs = graph_refs(cuda)
    cuda.graphs.clear()
    encoder.to(dtype=torch.float64)
    assert len(encoder._graphed) == 0 and all(ref() is None for ref in refs)


def test_cfg_with_new_prompts_matches_each_image_alone(monkeypatch, folder):
    """Negative and positive prompts of a batch go through the encoder in one call; each start equals its own."""
    module = load_module(folder)
    encoder = PromptEmbeddingCache(tiny_openclip_encoder(seed=3))
    calls = []
    real_encode = encoder.encoder.encode
    monkeypatch.setattr(encoder.encoder, "encode", lambda prompts: calls.append(list(prompts)) or real_encode(prompts))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    start = SamplerStart.k_diffusion(14.614641)
    prompts = ["a dark alley at night", "a snowy field at noon"]
    batch = oms_start(module, encoder, noise, prompts, start=start, cfg=2.0, negative_prompt="blurry", z=z)
    assert calls == [["blurry", "a dark alley at night", "a snowy field at noon"]]
    for i, prompt in enumerate(prompts):
        alone = oms_start(module, PromptEmbeddingCache(encoder.encoder), noise[i:i + 1], [prompt], start=start,
                          cfg=2.0, negative_prompt="blurry",
                          z=z[i:i + 1])
        assert (alone[0] - batch[i]).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Precision under the WebUI's autocast, and the channels-last option


def test_an_fp32_step_ignores_the_callers_autocast(folder):
    """The WebUI samples under fp16 autocast (bf16 on the CPU): an fp32 module must still compute in fp32."""
    module = load_module(folder)
    encoder = tiny_openclip_encoder(seed=3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    plain = predict_v(module, encoder, x, ["a dark alley"], ["blurry"], 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = predict_v(module, encoder, x, ["a dark alley"], ["blurry"], 2.0)
    assert torch.equal(under_autocast, plain)


def test_channels_last_gives_the_same_prediction(folder):
    module = load_module(folder)
    sample, context = tiny_inputs(module.config, 16, 12)
    plain = module.forward(sample, context)
    module.set_speed_options(channels_last=True)
    assert module.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    attention = module.unet.down_blocks[1].attentions[0]
    hidden = torch.randn(2, 32, 8, 6).contiguous(memory_format=torch.channels_last)
    assert attention(hidden, context).is_contiguous(memory_format=torch.channels_last)  # stays in its layout
    assert (module.forward(sample, context) - plain).abs().max().item() < 1e-5
    module.set_speed_options()
    assert torch.equal(module.forward(sample, context), plain)
