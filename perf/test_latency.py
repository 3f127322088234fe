"""`pytest -m perf`: latency and memory of every selected engine over the batch x sequence grid.

With --benchmark-compare each item also compares itself with this machine's
baseline and fails when it regressed, and ``test_suite_aggregate`` (run last;
under pytest-xdist decided by the controller over every worker's results) fails
when the suite as a whole slowed beyond --perf-suite-threshold (see perf/plugin.py).
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
    if result is None:  # --benchmark-disable: the engine ran once at this shape; nothing timed or gated
        return
    perf_session.gate(result, list(benchmark.stats.stats.data), threshold=perf_threshold)
    failures = perf_session.failures(result)
    if failures:
        pytest.fail("\n".join(c.message() for c in failures), pytrace=False)


def test_suite_aggregate(perf_session) -> None:
    """The geometric mean of candidate/baseline medians over every compared item: a uniform slowdown fails here.

    Under pytest-xdist no worker runs it: the controller decides it over every worker's results, with the
    same verdict (PerfSession.aggregate_verdict), and reports it under this test's id (perf/workers.py).
    """
    outcome, message = perf_session.aggregate_verdict()
    if outcome == "skipped":
        pytest.skip(message)
    if outcome == "failed":
        pytest.fail(message, pytrace=False)
