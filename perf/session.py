"""State of one perf run: what is measured, the CPU baseline, the gate's verdicts."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import torch

from engines.backends.base import Runner, split_engine_name
from perf.baselines import RUN_RECORD_SCHEMA_VERSION, Baseline
from perf.stats import Comparison, compare_memory, compare_samples, median, percentile
from perf.timing import (
    TimedEngine,
    device_used_bytes,
    first_call_seconds,
    median_seconds,
    peak_device_bytes,
    staged_inputs,
)

GRIDS: dict[str, list[tuple[int, int]]] = {
    # The targets' shapes: b1 s128 (latency), b32 s128 and b32 s512 (throughput).
    "default": [(1, 128), (8, 128), (32, 128), (32, 512)],
    # A CPU run is a check of the machinery, not a measurement anyone ships on.
    "cpu": [(1, 32), (4, 64)],
    "full": [(b, s) for b in (1, 2, 4, 8, 16, 32) for s in (32, 64, 128, 256, 512)],
}
ROUNDS = {"cuda": 50, "cpu": 10}
WARMUP = {"cuda": 10, "cpu": 2}
CPU_BASELINE_ROUNDS = 3


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
        }


class PerfSession:
    def __init__(
        self,
        *,
        device: str,
        grid: str,
        rounds: int | None,
        warmup: int | None,
        threshold: float,
        alpha: float,
        baseline: Baseline | None,
        gate: bool,
        cpu_baseline: bool,
        slow_engines: list[tuple[str, float]],
        gate_backends: frozenset[str] | None = None,
    ) -> None:
        kind = device.split(":")[0]
        self.device = device
        self.grid = grid
        self.rounds = rounds or ROUNDS[kind]
        self.warmup = warmup if warmup is not None else WARMUP[kind]
        self.threshold = threshold
        self.alpha = alpha
        self.baseline = baseline
        self.gate_enabled = gate
        self.cpu_baseline_enabled = cpu_baseline
        self.slow_engines = slow_engines
        self.gate_backends = gate_backends
        self.baseline_notes: list[str] = []  # no baseline; newer incomplete runs passed over
        # How far this run got, saved with it: a save interrupted half-way must not
        # become the baseline that the next compare silently gates with.
        self.selected = 0
        self.finished: set[str] = set()
        self.interrupted = False
        self.results: list[PerfResult] = []
        self._cpu_runners: dict[str, Runner] = {}
        self._cpu_medians: dict[tuple[str, int, int], float] = {}

    def gates(self, backend: str) -> bool:
        """Whether a regression of this backend fails its test (others are compared and reported)."""
        return self.gate_backends is None or backend in self.gate_backends

    def injected_delay(self, engine_id: str) -> float:
        return sum(delay for pattern, delay in self.slow_engines if fnmatch.fnmatch(engine_id, pattern))

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
        if not self.cpu_baseline_enabled:
            return None
        from engines.precision.policy import REFERENCE_POLICY
        from engines.backends.torch_eager import TorchRunner

        key = (runner.model.name, *shape)
        if key not in self._cpu_medians:
            if runner.model.name not in self._cpu_runners:
                self._cpu_runners[runner.model.name] = TorchRunner(runner.model, REFERENCE_POLICY, "cpu").build()
            cpu = self._cpu_runners[runner.model.name]
            call = TimedEngine(cpu, staged_inputs(cpu, *shape, copies=2))
            self._cpu_medians[key] = median_seconds(call, warmup=1, rounds=CPU_BASELINE_ROUNDS)
        return self._cpu_medians[key]

    def measure(self, benchmark, runner: Runner, shape: tuple[int, int]) -> PerfResult:
        call = TimedEngine(runner, staged_inputs(runner, *shape), self.injected_delay(runner.name))
        first_call = first_call_seconds(call)
        engine_bytes = engine_reported_bytes(runner.describe())
        benchmark.pedantic(call, setup=call.setup, rounds=self.rounds, warmup_rounds=self.warmup, iterations=1)
        samples = list(benchmark.stats.stats.data)
        result = PerfResult(
            name=benchmark.fullname,
            engine=runner.name,
            shape=shape,
            median_s=median(samples),
            p90_s=percentile(samples, 90),
            p99_s=percentile(samples, 99),
            peak_device_bytes=_plus(peak_device_bytes(call), engine_bytes),
            cpu_fp32_median_s=self.cpu_fp32_median(runner, shape),
            first_call_s=first_call,
            device_used_bytes=device_used_bytes(runner.device),
            engine_reported_bytes=engine_bytes,
        )
        benchmark.extra_info.update(result.extra_info())
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
            compare_samples(result.name, samples, baseline_samples, threshold=threshold, alpha=self.alpha)
        ]
        baseline_memory = self.baseline.extra(result.name).get("peak_device_bytes")
        if baseline_memory and result.peak_device_bytes:
            comparisons.append(
                compare_memory(result.name, result.peak_device_bytes, baseline_memory, threshold=threshold)
            )
        result.comparisons = comparisons
        return comparisons

    def summary_lines(self) -> list[str]:
        lines = []
        lines.extend(self.baseline_notes)
        if self.baseline is not None:
            lines.append(f"baseline: {self.baseline.path}")
        for r in self.results:
            speed = f"{r.speedup_over_cpu:7.1f}x CPU" if r.speedup_over_cpu else "       -   "
            memory = f"{r.peak_device_bytes / 2**20:8.1f} MiB" if r.peak_device_bytes else "       -    "
            verdicts = ", ".join(c.verdict for c in r.comparisons) or r.note or "measured"
            if r.comparisons and not self.gates(split_engine_name(r.engine)[1]):
                verdicts += " (not gated)"
            first = f"first call {r.first_call_s:6.2f} s" if r.first_call_s is not None else ""
            lines.append(
                f"{r.engine:32} b{r.shape[0]:<2} s{r.shape[1]:<4} median {r.median_s * 1e3:9.3f} ms  {speed}  {memory}  "
                f"{first}  {verdicts}"
            )
        return lines


def engine_reported_bytes(description: dict[str, Any]) -> int | None:
    """Device memory a runner allocates itself, outside torch: TensorRT's activations plus its weights.

    TensorRT's execution context and deserialized plan live in memory the
    torch allocator never sees, so the allocator's peak alone would miss them.
    """
    if "device_memory_bytes" not in description:
        return None
    return int(description["device_memory_bytes"]) + int(description.get("plan_bytes", 0))


def _plus(allocator_peak: int | None, engine_bytes: int | None) -> int | None:
    if allocator_peak is None:
        return None
    return allocator_peak + (engine_bytes or 0)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
