"""PyTorch with CUDA graphs: one captured graph per (batch, sequence) shape.

The eager precision engine, captured once per static shape and replayed: the
same kernels without the Python and launch overhead that dominates small batches.
Graphs share one memory pool; the least recently used one is dropped beyond
``max_graphs`` so that a Hypothesis run over many shapes stays bounded.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar

import torch

from engines.backends.base import BackendUnavailableError, EngineInfo
from engines.backends.torch_eager import TorchRunner
from engines.batch import TokenBatch

WARMUP_RUNS = 2


class CapturedShape:
    def __init__(self, forward, shape: tuple[int, int], device: torch.device, pool) -> None:
        # Capture on the engine's device: with another current device (a pytest-xdist worker on cuda:1, or
        # --device cuda:1) the capture stream would be the current device's, and the engine's kernels would go
        # to an uncaptured stream ("operation not permitted when stream is capturing", seen on two H200s).
        self.device = device
        with torch.cuda.device(device):
            self._capture(forward, shape, device, pool)

    def _capture(self, forward, shape: tuple[int, int], device: torch.device, pool) -> None:
        self.input_ids = torch.zeros(shape, dtype=torch.int64, device=device)
        self.attention_mask = torch.ones(shape, dtype=torch.int64, device=device)
        # Warm-up on a side stream, as CUDA graph capture requires.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                forward(self.input_ids, self.attention_mask)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = forward(self.input_ids, self.attention_mask)

    def run(self, batch: TokenBatch) -> torch.Tensor:
        with torch.cuda.device(self.device):
            self.input_ids.copy_(batch.input_ids, non_blocking=True)
            self.attention_mask.copy_(batch.attention_mask, non_blocking=True)
            self.graph.replay()
            # The static output is overwritten by the next replay: hand out a copy.
            return self.output.clone()


class CapturedGraphs:
    """One captured graph per shape for ``forward``, in one memory pool, least recently used dropped beyond ``max_graphs``."""

    def __init__(self, forward, device: torch.device, max_graphs: int) -> None:
        self.forward = forward
        self.device = device
        self.max_graphs = max_graphs
        with torch.cuda.device(device):
            self._pool = torch.cuda.graph_pool_handle()
        self._graphs: collections.OrderedDict[tuple[int, int], CapturedShape] = collections.OrderedDict()

    def run(self, batch: TokenBatch) -> torch.Tensor:
        """Replay the graph of ``batch.shape`` (captured on first use) on ``batch``; a copy of the output."""
        shape = batch.shape
        captured = self._graphs.get(shape)
        if captured is None:
            captured = CapturedShape(self.forward, shape, self.device, self._pool)
            self._graphs[shape] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(shape)
        return captured.run(batch)

    def clear(self) -> None:
        """Drop every captured graph, and with them the pool: the next capture starts a new one.

        A pool whose graphs are all gone is freed by the allocator; capturing into
        its old handle again fails an internal assert (``use_count > 0``, torch 2.11
        on the H100, seen when the sweep released one shape's graphs before the next).
        """
        self._graphs.clear()
        with torch.cuda.device(self.device):
            self._pool = torch.cuda.graph_pool_handle()


class KeepsCapturedGraphs:
    """Mixin for a runner whose captured graphs live in ``self._graphs``: dropped per shape on request, and on close."""

    _graphs: CapturedGraphs | None = None

    def release_shapes(self) -> None:
        if self._graphs is not None:
            self._graphs.clear()

    def _close(self) -> None:
        self.release_shapes()
        self._graphs = None
        super()._close()


class TorchCudaGraphRunner(KeepsCapturedGraphs, TorchRunner):
    backend: ClassVar[str] = "torch-cudagraph"

    def __init__(self, model, policy, device: str, options=None, *, max_graphs: int = 8) -> None:
        super().__init__(model, policy, device, options)
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"{self.backend} needs a CUDA device, got {self.device}")
        self.max_graphs = max_graphs

    def _build(self) -> None:
        super()._build()
        self._graphs = CapturedGraphs(self.forward, self.device, self.max_graphs)

    @torch.inference_mode()
    def _run(self, staged: TokenBatch) -> torch.Tensor:
        return self._graphs.run(staged).float()

    def _info(self) -> EngineInfo:
        return dataclasses.replace(super()._info(), mode=f"CUDA graph per shape (max {self.max_graphs} cached)")
