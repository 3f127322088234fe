"""The one timer: runners never time themselves.

GPU work is asynchronous, so every timed call ends with a device synchronize
before the clock is read, and the device is idle when the clock starts (the
untimed setup synchronizes).  Inputs rotate among several pre-staged batches so
a result is never a cache artifact of one buffer.  Warm-up rounds run first.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from engines.base import Runner, TokenBatch

INPUT_COPIES = 4


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def staged_inputs(runner: Runner, batch: int, seq: int, *, copies: int = INPUT_COPIES) -> list[TokenBatch]:
    """``copies`` different all-valid batches of token ids, already on the engine's device."""
    generator = torch.Generator().manual_seed(batch * 10_007 + seq)
    staged = []
    for _ in range(copies):
        ids = torch.randint(0, runner.model.vocab_size, (batch, seq), generator=generator)
        staged.append(runner.prepare(TokenBatch(ids, torch.ones_like(ids), source=f"perf b{batch}s{seq}")))
    return staged


@dataclasses.dataclass
class TimedEngine:
    """A runner, its staged inputs and an optional injected delay, as one timed call."""

    runner: Runner
    inputs: list[TokenBatch]
    injected_delay_s: float = 0.0  # test-only: a deliberately slowed engine

    def __post_init__(self) -> None:
        self._sync = synchronizer(self.runner.device)
        self._next = 0

    def setup(self):
        """pytest-benchmark's untimed setup: pick the next input, drain the device."""
        prepared = self.inputs[self._next % len(self.inputs)]
        self._next += 1
        self._sync()
        return (prepared,), {}

    def __call__(self, prepared: TokenBatch) -> None:
        self.runner.run(prepared)
        self._sync()
        if self.injected_delay_s:  # after the sync: a host sleep must not hide behind GPU work
            time.sleep(self.injected_delay_s)


def median_seconds(call: TimedEngine, *, warmup: int, rounds: int) -> float:
    """A plain median for the in-run CPU baseline (not a pytest-benchmark test)."""
    for _ in range(warmup):
        args, _ = call.setup()
        call(*args)
    samples = []
    for _ in range(rounds):
        args, _ = call.setup()
        start = time.perf_counter()
        call(*args)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


def peak_device_bytes(call: TimedEngine) -> int | None:
    """Peak allocator bytes during one call, weights included; None off CUDA."""
    device = call.runner.device
    if device.type != "cuda":
        return None
    args, _ = call.setup()
    torch.cuda.reset_peak_memory_stats(device)
    call(*args)
    return int(torch.cuda.max_memory_allocated(device))
