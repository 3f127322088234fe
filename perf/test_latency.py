"""`pytest -m perf`: latency and memory of every selected engine over the batch x sequence grid.

With --benchmark-compare each test also compares itself with this machine's
baseline and fails when it regressed (see perf/plugin.py).
"""

from __future__ import annotations

import pytest
import torch

from perf.session import is_oom

pytestmark = pytest.mark.perf


def test_latency(engine, perf_shape, benchmark, perf_session, perf_threshold) -> None:
    batch, seq = perf_shape
    max_batch, max_seq = engine.input_limits()
    if seq > max_seq or (max_batch is not None and batch > max_batch):
        pytest.skip(f"b{batch} s{seq} is outside {engine.name}'s limits ({max_batch}, {max_seq})")
    benchmark.group = f"{engine.model.name} b{batch} s{seq}"
    try:
        result = perf_session.measure(benchmark, engine, perf_shape)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is turned into a skip
        if is_oom(exc):
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()  # what the failed shape held goes back before the next one
            pytest.skip(f"out of device memory at b{batch} s{seq}: {str(exc).splitlines()[0]}")
        raise
    comparisons = perf_session.gate(result, list(benchmark.stats.stats.data), threshold=perf_threshold)
    failures = [c.message() for c in comparisons if c.verdict == "regression"]
    if failures and perf_session.gates(engine.backend):
        pytest.fail("\n".join(failures), pytrace=False)
