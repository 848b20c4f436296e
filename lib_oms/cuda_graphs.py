"""Replay the OMS network and its text encoder as CUDA graphs.

One eager OMS-B call is bound by kernel launches, not arithmetic: on an H200 it takes 17.6 ms at batch 1, 64×64,
and 3.9 ms replayed from a captured graph (bench/bench_oms.py). A graph is captured once per input shape and dtype
and replayed for every later call of that shape; the text encoder's input is always [batch, 77] token ids, so it
is captured the same way.

What makes it safe on every setup:

- Capture and replay run under ``torch.cuda.device(inputs' device)`` with a capture stream made on that device:
  the WebUI never calls ``torch.cuda.set_device``, so with ``--device-id 1`` the current device stays cuda:0.
- Capture uses ``capture_error_mode="thread_local"`` (what torch.compile's own CUDA graphs use). "global" would
  forbid unsafe CUDA calls in *every* thread while we capture, so the WebUI's live preview, which decodes latents
  in the HTTP thread, could fail or break the capture. "relaxed" would also allow our own thread's unsafe calls,
  so a broken capture could go unnoticed. Torch older than 2.1 has no such mode: there the calls run eagerly.
- One process-wide lock: torch allows one capture at a time per process, and a graph's input and output buffers
  are shared by every caller.
- A capture that fails (ROCm or ZLUDA builds, drivers, out of memory during capture) is said once in the console
  and that call site runs eagerly from then on; errors of the eager call itself are not caught.
- A capture that succeeds but replays wrong numbers (a stale buffer, a kernel reading outside the captured pool, a
  build that mis-replays) would give plausible images that are not OMS's: the first replay of every graph is
  compared with the eager call made on the same inputs just before the capture (``replay_mismatch``). A mismatch is
  said once with the measured difference, the caller gets the eager result, and that call site runs eagerly from
  then on.
- The graphs of one call site share one memory pool (safe: they never run at the same time and each output is
  copied out at once), which keeps its activation memory; ``torch.cuda.empty_cache`` cannot return it while the
  graphs live. They are dropped, and the pool freed, when the weights move, by ``clear()``, and with their owner:
  nothing here holds a reference back to the module or encoder that owns it.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

LOG = logging.getLogger("lib_oms")
GRAPH_DEVICE_TYPE = "cuda"  # calls on this device type are captured (the CPU tests use "cpu" with a fake torch.cuda)
CAPTURE_ERROR_MODE = "thread_local"
# torch.cuda.graph gained capture_error_mode in torch 2.1 (the WebUI 1.6/1.7 ship torch 2.0.1)
CAPTURE_MODE_SUPPORTED = "capture_error_mode" in inspect.signature(torch.cuda.graph.__init__).parameters
_LOCK = threading.RLock()
# A replay runs the captured kernels on the same inputs, so it matches the eager call up to the rounding of a few
# differently ordered reductions: allowed, this many units of the dtype's rounding at the output's largest value.
REPLAY_TOLERANCE_ULPS = 8


def replay_tolerance(eager: torch.Tensor) -> float:
    """The largest difference allowed between a graph's first replay and the eager call: REPLAY_TOLERANCE_ULPS
    roundings (machine epsilon of the output's dtype: 9.8e-4 for fp16, 1.2e-7 for fp32) at its largest magnitude."""
    scale = max(float(eager.abs().max()), 1.0) if eager.numel() else 1.0
    return REPLAY_TOLERANCE_ULPS * torch.finfo(eager.dtype).eps * scale


def replay_mismatch(replayed: torch.Tensor, eager: torch.Tensor) -> str | None:
    """Why a graph's first replay is not the eager result for the same inputs (shape, non-finite values where the
    eager ones are finite, a difference above ``replay_tolerance``), or None when it is."""
    if replayed.shape != eager.shape or replayed.dtype != eager.dtype:
        return (f"the replay gave {tuple(replayed.shape)} {replayed.dtype}, the eager call {tuple(eager.shape)} "
                f"{eager.dtype}")
    difference = (replayed.float() - eager.float()).abs()
    difference = torch.where(torch.isfinite(eager) & ~torch.isfinite(replayed), torch.inf,
                             torch.nan_to_num(difference, nan=0.0))
    largest, tolerance = float(difference.max()) if difference.numel() else 0.0, replay_tolerance(eager)
    if largest > tolerance:
        return f"its first replay differs from the eager call by up to {largest:.3g} (tolerance {tolerance:.3g})"
    return None


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    eager: torch.Tensor | None  # the eager output for ``inputs``, until the first replay is checked against it


class GraphedCall:
    """Calls ``fn(*inputs) -> Tensor``; on a CUDA device through a graph captured per input shapes and dtypes.

    ``weights`` are the modules ``fn`` reads: a graph reads them where they were at capture, so every graph is
    dropped when they move. Keeps the ``max_graphs`` most recently used graphs. ``fn`` must not hold a reference to
    the object that owns this GraphedCall, so that dropping the owner frees the graphs at once.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], weights: Sequence[torch.nn.Module], *, name: str,
                 max_graphs: int = 2):
        self.fn = fn
        self.weights = list(weights)
        self.name = name
        self.max_graphs = max_graphs
        self.failure: str | None = None  # why graphs are off for good at this call site, once said
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._weights_at: tuple | None = None
        self._stream: torch.cuda.Stream | None = None  # one capture stream and one pool for all the graphs
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph; their memory pools go back to torch's allocator (``empty_cache`` then frees them)."""
        with _LOCK:
            self._graphs.clear()
            self._weights_at = self._stream = self._pool = None

    def _where_weights_are(self) -> tuple:
        return tuple(next(module.parameters()).data_ptr() for module in self.weights)

    def clear_if_moved(self) -> None:
        """Drop the graphs if the weights are no longer where they were captured (call after moving them)."""
        with _LOCK:
            if self._weights_at is not None and self._where_weights_are() != self._weights_at:
                self.clear()

    def _fail(self, why: str) -> None:
        self.failure = why
        LOG.warning(f"One More Step: {self.name} runs without CUDA graphs from now on ({why}); its results are "
                    "the plain network's, only slower")

    def _capture(self, inputs: Sequence[torch.Tensor]) -> _Captured | None:
        device = inputs[0].device
        static = tuple(x.clone() for x in inputs)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # one eager call first: lets cuBLAS/cuDNN set up outside the graph
            eager = self.fn(*static)  # and is what the first replay must give
        caller_stream = torch.cuda.current_stream(device)
        caller_stream.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
                output = self.fn(*static)
        except Exception as error:  # ROCm/ZLUDA builds, drivers, out of memory during capture
            torch.cuda.set_stream(caller_stream)  # torch.cuda.graph leaves its stream current when capture_end fails
            self._fail(f"capture failed: {type(error).__name__}: {error}")
            return None
        if self._pool is None:
            self._pool = graph.pool()
        return _Captured(graph, static, output, eager)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        device = inputs[0].device
        if device.type != GRAPH_DEVICE_TYPE or self.failure is not None or torch.cuda.is_current_stream_capturing():
            return self.fn(*inputs)
        if not CAPTURE_MODE_SUPPORTED:
            self._fail(f"torch {torch.__version__} cannot capture without blocking other threads; torch 2.1 can")
            return self.fn(*inputs)
        with _LOCK, torch.cuda.device(device), torch.autocast(device.type, enabled=False):  # in the weights' dtype
            weights_at = self._where_weights_are()
            if weights_at != self._weights_at:
                self.clear()
                self._weights_at = weights_at
            key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
            captured = self._graphs.get(key)
            if captured is None:
                captured = self._capture(inputs)
                if captured is None:
                    return self.fn(*inputs)
                self._graphs[key] = captured
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
                for static, x in zip(captured.inputs, inputs, strict=True):
                    static.copy_(x)
            captured.graph.replay()
            if captured.eager is not None:
                eager, captured.eager = captured.eager, None
                mismatch = replay_mismatch(captured.output, eager)
                if mismatch is not None:
                    self.clear()
                    self._fail(mismatch)
                    return eager
            return captured.output.clone()
