"""State of one perf run: what is measured, the CPU baseline, the gate's verdicts.

Measure (:meth:`PerfSession.measure`, through the one timer in ``perf/timing.py``),
store (pytest-benchmark's JSON, ``perf/baselines.py``) and compare
(:meth:`PerfSession.gate` and :meth:`PerfSession.aggregate`, with ``perf/stats.py``)
are kept apart.  Engines come from the shared :class:`engines.factory.EngineFactory`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from engines.backends.base import Runner, split_engine_name
from engines.factory import EngineFactory
from engines.tables import render_table
from perf.baselines import RUN_RECORD_SCHEMA_VERSION, Baseline
from perf.options import PerfOptions
from perf.stats import Comparison, SuiteAggregate, compare_memory, compare_samples, median, percentile, suite_aggregate
from perf.timing import (
    CpuBaseline,
    TimedEngine,
    device_lock,
    device_used_bytes,
    first_call_seconds,
    gpu_index,
    peak_device_bytes,
    staged_inputs,
)


@dataclasses.dataclass
class PerfResult:
    name: str
    engine: str
    shape: tuple[int, int]
    median_s: float
    p90_s: float
    p99_s: float
    peak_device_bytes: int | None
    cpu_fp32_median_s: float | None
    # The first call at this shape, untimed by the benchmark: compilation and
    # CUDA-graph capture for engines that do them lazily.
    first_call_s: float | None = None
    # NVML's view of the whole device after the run (context, workspaces, other
    # allocators); device-wide, so informative, not gated.
    device_used_bytes: int | None = None
    # What the engine holds outside the torch allocator by its own report
    # (TensorRT: device_memory_size_v2 + the plan's weights); included in the peak.
    engine_reported_bytes: int | None = None
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    note: str = ""
    device: str | None = None  # where it ran: "cuda:1", "cpu"
    gpu_index: int | None = None
    worker: str | None = None  # the pytest-xdist worker that measured it (gw0, ...); None in one process

    @classmethod
    def of(
        cls, name: str, call: TimedEngine, shape: tuple[int, int], samples: list[float], *,
        cpu_fp32_median_s: float | None, first_call_s: float,
    ) -> "PerfResult":
        """The result of ``call``'s timed ``samples`` at ``shape``, with one more call for its peak memory."""
        runner = call.runner
        device = runner.device
        return cls(
            name=name,
            engine=runner.name,
            shape=shape,
            median_s=median(samples),
            p90_s=percentile(samples, 90),
            p99_s=percentile(samples, 99),
            peak_device_bytes=peak_device_bytes(call),
            cpu_fp32_median_s=cpu_fp32_median_s,
            first_call_s=first_call_s,
            device_used_bytes=device_used_bytes(runner.device),
            engine_reported_bytes=runner.memory().outside_allocator_bytes or None,
            device=str(device),
            gpu_index=gpu_index(device),
        )

    def record(self) -> dict[str, Any]:
        """This result as JSON data (a pytest-xdist worker's shard): :meth:`from_record` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> "PerfResult":
        return cls(**{**data, "shape": tuple(data["shape"]),
                      "comparisons": [Comparison(**c) for c in data.get("comparisons") or []]})

    @property
    def speedup_over_cpu(self) -> float | None:
        return None if not self.cpu_fp32_median_s else self.cpu_fp32_median_s / self.median_s

    def extra_info(self) -> dict[str, Any]:
        batch, seq = self.shape
        return {
            "engine": self.engine,
            "batch": batch,
            "sequence": seq,
            "median_ms": self.median_s * 1e3,
            "p90_ms": self.p90_s * 1e3,
            "p99_ms": self.p99_s * 1e3,
            "sequences_per_s": batch / self.median_s,
            "tokens_per_s": batch * seq / self.median_s,
            "peak_device_bytes": self.peak_device_bytes,
            "device_used_bytes_nvml": self.device_used_bytes,
            "engine_reported_bytes": self.engine_reported_bytes,
            "first_call_s": self.first_call_s,
            "cpu_fp32_median_ms": None if self.cpu_fp32_median_s is None else self.cpu_fp32_median_s * 1e3,
            "speedup_over_cpu_fp32": self.speedup_over_cpu,
            "device": self.device,
            "gpu_index": self.gpu_index,
        }


def finished_only(benchmarks: list, finished: set[str]) -> tuple[list, int]:
    """The benchmarks whose items finished, and how many others there were.

    pytest-benchmark adds an item's benchmark when its timing starts, so one an interrupt cut short would be
    saved with part of its rounds: left out of a saved run (one process) and of a worker's shard (pytest-xdist).
    """
    kept = [b for b in benchmarks if b.fullname in finished]
    return kept, len(benchmarks) - len(kept)


DISABLED_NOTE = ("benchmarks disabled (--benchmark-disable): each engine ran once per shape, untimed; nothing "
                 "measured, compared or saved")


class PerfSession:
    def __init__(
        self, options: PerfOptions, factory: EngineFactory, *, baseline: Baseline | None, compare: bool
    ) -> None:
        self.options = options
        self.factory = factory
        self.device = factory.device
        self.baseline = baseline
        self.gate_enabled = compare
        self.baseline_notes: list[str] = []  # no baseline; newer incomplete runs passed over
        # How far this run got, saved with it: a save interrupted half-way must not
        # become the baseline that the next compare silently gates with.
        self.selected = 0
        self.finished: set[str] = set()
        self.interrupted = False
        self.results: list[PerfResult] = []
        self.cut_short = 0  # benchmarks an interrupt cut short, not saved (finished_benchmarks)
        self.benchmarks_disabled = False  # --benchmark-disable asked for: each item runs its engine once, untimed
        self.cpu = CpuBaseline(factory)
        # pytest-xdist: this process's worker id and the number of workers (None, None in one process), and
        # at the controller what it says about the workers' merged results (perf.workers).
        self.worker: str | None = None
        self.workers: int | None = None
        self.run_notes: list[str] = []

    def finished_benchmarks(self, benchmarks: list) -> list:
        """pytest-benchmark's benchmarks of the items that finished (:func:`finished_only`), the others counted
        and said."""
        kept, cut = finished_only(benchmarks, self.finished)
        self.cut_short = max(self.cut_short, cut)
        self.note_cut_short(self.cut_short)
        return kept

    def note_cut_short(self, count: int) -> None:
        note = f"not saved: {count} benchmark(s) an interrupt cut short (part of their rounds only)"
        if count and note not in self.run_notes:
            self.run_notes.append(note)

    def gates(self, backend: str) -> bool:
        """Whether a regression of this backend fails its test (others are compared and reported)."""
        return backend in self.options.gate_backends

    def run_record(self) -> dict[str, Any]:
        """What a saved run says about its own completeness (perf.baselines.RUN_RECORD_KEY)."""
        finished = len(self.finished)
        return {
            "schema": RUN_RECORD_SCHEMA_VERSION,
            "selected": self.selected,
            "finished": finished,
            "interrupted": self.interrupted,
            "complete": not self.interrupted and finished >= self.selected,
        }

    # -- measuring ----------------------------------------------------------------------
    def cpu_fp32_median(self, runner: Runner, shape: tuple[int, int]) -> float | None:
        """The same model's FP32 eager engine on the CPU, same shape, measured in this run."""
        if not self.options.cpu_baseline:
            return None
        return self.cpu.median_seconds(runner.model.name, shape)

    def measure(self, benchmark, runner: Runner, shape: tuple[int, int]) -> PerfResult | None:
        """One engine at one shape, timed by pytest-benchmark; None under --benchmark-disable (run once, untimed)."""
        delay, factor = self.options.slowdown_for(runner.name)
        call = TimedEngine(runner, staged_inputs(runner, *shape), delay, factor)
        # Everything that runs the engine is timed or measured: under its device's lock (perf.timing.device_lock).
        if benchmark.disabled:
            # --benchmark-disable: pytest-benchmark runs the call once and keeps no stats: a check that the
            # engine runs at this shape. Nothing is measured, compared or saved.
            with device_lock(runner.device):
                benchmark.pedantic(call, setup=call.setup, rounds=1, iterations=1)
            return None
        with device_lock(runner.device) as hold:
            first_call = first_call_seconds(call)
            benchmark.pedantic(
                call, setup=call.setup, rounds=self.options.rounds, warmup_rounds=self.options.warmup, iterations=1
            )
            result = PerfResult.of(
                benchmark.fullname, call, shape, list(benchmark.stats.stats.data),
                cpu_fp32_median_s=None, first_call_s=first_call,
            )
        result.worker = self.worker
        result.cpu_fp32_median_s = self.cpu_fp32_median(runner, shape)  # after: under the CPU's own lock
        benchmark.extra_info.update(result.extra_info())
        model = runner.model.name
        benchmark.extra_info.update(worker=self.worker, workers=self.workers, device_lock=hold.record(),
                                    cpu_fp32_measured_by=self.cpu.measured_by(model, shape),
                                    cpu_fp32_lock=self.cpu.lock_hold(model, shape))
        self.results.append(result)
        return result

    # -- the gate -----------------------------------------------------------------------
    def gate(self, result: PerfResult, samples: list[float], *, threshold: float) -> list[Comparison]:
        """Comparisons against the baseline; empty when no gate runs or no baseline entry exists."""
        if not self.gate_enabled or self.baseline is None:
            return []
        baseline_samples = self.baseline.samples(result.name)
        if baseline_samples is None:
            result.note = f"not in baseline {self.baseline.path.name}"
            return []
        comparisons = [
            compare_samples(result.name, samples, baseline_samples, threshold=threshold, alpha=self.options.alpha)
        ]
        baseline_memory = self.baseline.extra(result.name).get("peak_device_bytes")
        if baseline_memory and result.peak_device_bytes:
            comparisons.append(
                compare_memory(
                    result.name, result.peak_device_bytes, baseline_memory, threshold=self.options.memory_threshold
                )
            )
        result.comparisons = comparisons
        return comparisons

    def failures(self, result: PerfResult) -> list[Comparison]:
        """The comparisons that fail ``result``'s test item (none for a backend that is not gated)."""
        if not self.gates(split_engine_name(result.engine)[1]):
            return []
        return [c for c in result.comparisons if c.fails(inconclusive=self.options.inconclusive)]

    def aggregate(self) -> SuiteAggregate:
        """The suite-level latency aggregate over every compared item of a gated backend."""
        compared = [
            c
            for r in self.results
            if self.gates(split_engine_name(r.engine)[1])
            for c in r.comparisons
        ]
        return suite_aggregate(compared, threshold=self.options.suite_threshold)

    def aggregate_verdict(self) -> tuple[str, str]:
        """``test_suite_aggregate``'s outcome ("skipped", "passed" or "failed") and its message.

        The one definition for both places it is decided: the test item in one process, and the
        pytest-xdist controller over every worker's merged results (perf.workers).
        """
        if self.benchmarks_disabled:
            return "skipped", DISABLED_NOTE
        if not self.gate_enabled or self.baseline is None:
            return "skipped", "no baseline compared (--benchmark-compare with a stored baseline): nothing to aggregate"
        aggregate = self.aggregate()
        return ("failed" if aggregate.failed else "passed"), aggregate.message()

    def summary_lines(self) -> list[str]:
        lines = [*self.baseline_notes, *self.run_notes, *([DISABLED_NOTE] if self.benchmarks_disabled else [])]
        if self.baseline is not None:
            lines.append(f"baseline: {self.baseline.path}")
        placed = any(r.worker for r in self.results)  # pytest-xdist: which worker and device measured each
        rows = []
        for r in self.results:
            verdicts = ", ".join(c.verdict for c in r.comparisons) or r.note or "measured"
            if r.comparisons and not self.gates(split_engine_name(r.engine)[1]):
                verdicts += " (not gated)"
            rows.append((
                *((f"{r.worker} {r.device}",) if placed else ()),
                r.engine,
                f"b{r.shape[0]} s{r.shape[1]}",
                f"{r.median_s * 1e3:.3f}",
                f"{r.p99_s * 1e3:.3f}",
                "-" if r.speedup_over_cpu is None else f"{r.speedup_over_cpu:.1f}x",
                "-" if r.peak_device_bytes is None else f"{r.peak_device_bytes / 2**20:.1f}",
                "-" if r.first_call_s is None else f"{r.first_call_s:.2f}",
                verdicts,
            ))
        if not rows:  # pytest-xdist: the workers' results could not be merged (the notes say why)
            return lines
        headers = ("engine", "shape", "median ms", "p99 ms", "vs CPU FP32", "peak MiB", "first call s", "verdict")
        lines.append(render_table((*(("worker",) if placed else ()), *headers), rows))
        inconclusive = [c for r in self.results for c in r.comparisons if c.verdict == "inconclusive"]
        if inconclusive:
            what = "failed (--perf-inconclusive=fail)" if self.options.inconclusive == "fail" else "passed, not decided"
            lines.append(f"inconclusive ({what}):")
            lines.extend(f"  {c.message()}" for c in inconclusive)
        faster = [c for r in self.results for c in r.comparisons if c.verdict in ("faster", "smaller")]
        if faster:
            lines.append("better than the baseline beyond the threshold (refresh the baseline):")
            lines.extend(f"  {c.message()}" for c in faster)
        if self.gate_enabled and self.baseline is not None:
            lines.append(self.aggregate().message())
        return lines


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
