"""Replay the OMS network as CUDA graphs.

One eager OMS-B call is bound by kernel launches, not arithmetic: on an H200 it takes 17.6 ms at batch 1, 64×64,
and 3.9 ms replayed from a captured graph (bench/bench_oms.py). A graph is captured once per input shape and dtype
and replayed for every later generation of that size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    context: torch.Tensor
    output: torch.Tensor


class GraphedNetwork:
    """Calls ``network(sample, context)``; on a CUDA device through a captured graph per input shape.

    A graph reads the weights where they were at capture, so every graph is dropped when the weights move
    (``clear()`` is also called by ``OMSModule.to``). Keeps the ``max_graphs`` most recently used graphs: each holds
    its own activation memory.
    """

    def __init__(self, network: torch.nn.Module, max_graphs: int = 2):
        self.network = network
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._weights_at: int | None = None

    def clear(self) -> None:
        self._graphs.clear()
        self._weights_at = None

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, sample: torch.Tensor, context: torch.Tensor) -> _Captured:
        static_sample, static_context = sample.clone(), context.clone()
        side_stream = torch.cuda.Stream(sample.device)
        side_stream.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(side_stream):  # one eager call first: lets cuBLAS/cuDNN set up outside the graph
            self.network(static_sample, static_context)
        torch.cuda.current_stream(sample.device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.network(static_sample, static_context)
        return _Captured(graph, static_sample, static_context, output)

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if sample.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return self.network(sample, context)
        weights_at = next(self.network.parameters()).data_ptr()
        if weights_at != self._weights_at:
            self.clear()
            self._weights_at = weights_at
        key = (tuple(sample.shape), tuple(context.shape), sample.dtype, context.dtype, sample.device)
        captured = self._graphs.get(key)
        if captured is None:
            with torch.autocast("cuda", enabled=False):  # the graph runs in the module's own dtype
                captured = self._capture(sample, context)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
            captured.sample.copy_(sample)
            captured.context.copy_(context)
        captured.graph.replay()
        return captured.output.clone()
