"""The latency gate's options, declared once (the engine options are engines.options')."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

from engines.backends.registry import BACKENDS, get_backend
from engines.options import Option, OptionError, parse_list, value_or_default
from perf.stats import (
    DEFAULT_ALPHA,
    DEFAULT_MEMORY_THRESHOLD,
    DEFAULT_SUITE_THRESHOLD,
    DEFAULT_THRESHOLD,
    INCONCLUSIVE_POLICIES,
)

GRIDS: dict[str, list[tuple[int, int]]] = {
    # The targets' shapes: b1 s128 (latency), b32 s128 and b32 s512 (throughput).
    "default": [(1, 128), (8, 128), (32, 128), (32, 512)],
    # A CPU run is a check of the machinery, not a measurement anyone ships on.
    "cpu": [(1, 32), (4, 64)],
    "full": [(b, s) for b in (1, 2, 4, 8, 16, 32) for s in (32, 64, 128, 256, 512)],
}
DEFAULT_GRID = {"cuda": "default", "cpu": "cpu"}
ROUNDS = {"cuda": 50, "cpu": 10}
WARMUP = {"cuda": 10, "cpu": 2}
# On a GPU, eager torch's Python-bound timings moved 1.5x between sessions on the H100:
# compared and reported, not gated, unless named in --perf-gate-backends.
UNGATED_ON_CUDA = frozenset({"torch"})


def _grid_text(name: str) -> str:
    return " ".join(f"b{b}s{s}" for b, s in GRIDS[name]) if len(GRIDS[name]) <= 6 else f"{len(GRIDS[name])} shapes"


PERF_OPTIONS: tuple[Option, ...] = (
    Option(
        "--perf-grid",
        "batch x sequence grid: " + "; ".join(f"{n}: {_grid_text(n)}" for n in GRIDS),
        choices=tuple(GRIDS),
        default_text=", ".join(f"'{g}' on {kind.upper() if kind == 'cpu' else 'CUDA'}" for kind, g in DEFAULT_GRID.items()),
    ),
    Option("--perf-rounds", "timed rounds per benchmark", kind="int",
           default_text=", ".join(f"{n} on {k.upper() if k == 'cpu' else 'CUDA'}" for k, n in ROUNDS.items())),
    Option("--perf-warmup", "untimed warm-up rounds", kind="int",
           default_text=", ".join(f"{n} on {k.upper() if k == 'cpu' else 'CUDA'}" for k, n in WARMUP.items())),
    Option(
        "--perf-threshold",
        "slowdown that fails an item, as a fraction (and significant at --perf-alpha); per test: "
        "@pytest.mark.perf(threshold=...)",
        kind="float",
        default=DEFAULT_THRESHOLD,
    ),
    Option("--perf-memory-threshold", "peak-memory growth that fails an item, as a fraction", kind="float",
           default=DEFAULT_MEMORY_THRESHOLD),
    Option(
        "--perf-suite-threshold",
        "slowdown of the geometric mean of candidate/baseline medians over all compared items that fails the suite",
        kind="float",
        default=DEFAULT_SUITE_THRESHOLD,
    ),
    Option(
        "--perf-inconclusive",
        "items whose difference is within the runs' own spread: 'report' lists them with their spread, 'fail' fails them",
        choices=INCONCLUSIVE_POLICIES,
        default="report",
    ),
    Option("--perf-alpha", "significance level of the Mann-Whitney test", kind="float", default=DEFAULT_ALPHA),
    Option("--require-baseline", "with --benchmark-compare: no stored baseline for this machine is an error", kind="flag"),
    Option(
        "--perf-gate-backends",
        "backends whose regressions fail tests (the others are compared and reported)",
        kind="list",
        default_text=f"on CUDA every backend but {', '.join(sorted(UNGATED_ON_CUDA))} (eager, Python-bound timings); on the CPU all",
    ),
    Option(
        "--perf-memory-cap-gib",
        "cap this process's device memory (torch allocator) at GIB, e.g. to see what a smaller GPU could run: "
        "configurations that need more are skipped as out of memory",
        kind="float",
        metavar="GIB",
    ),
    Option("--no-cpu-baseline", "skip the in-run CPU FP32 baseline (no speedup figures)", kind="flag"),
    Option(
        "--perf-slow-engine",
        "test only: slow every timed call of engines matching PATTERN (model/backend/precision, fnmatch): "
        "PATTERN=MS adds MS milliseconds, PATTERN=xF makes each call F times as long",
        kind="append",
        metavar="PATTERN=MS|xF",
    ),
)


@dataclasses.dataclass(frozen=True)
class Slowdown:
    """A deliberate slowdown for the gate's own tests: ``delay_s`` added, or the call stretched ``factor`` times."""

    pattern: str
    delay_s: float = 0.0
    factor: float = 1.0


@dataclasses.dataclass
class PerfOptions:
    grid: str
    rounds: int
    warmup: int
    threshold: float
    memory_threshold: float
    suite_threshold: float
    inconclusive: str
    alpha: float
    require_baseline: bool
    gate_backends: frozenset[str]
    memory_cap_gib: float | None
    cpu_baseline: bool
    slowdowns: tuple[Slowdown, ...]

    @classmethod
    def from_values(cls, values: dict[str, Any], *, device: str) -> "PerfOptions":
        kind = device.split(":")[0]
        for flag, key in (("--perf-threshold", "perf_threshold"), ("--perf-memory-threshold", "perf_memory_threshold"),
                          ("--perf-suite-threshold", "perf_suite_threshold")):
            value = values.get(key)
            if value is not None and value <= 0:
                raise OptionError(f"{flag} must be a positive fraction (0.10 = 10%), got {value}")
        alpha = values.get("perf_alpha")
        if alpha is not None and not 0 < alpha < 1:
            raise OptionError(f"--perf-alpha must be in (0, 1), got {alpha}")
        rounds = values.get("perf_rounds")
        if rounds is not None and rounds < 5:
            raise OptionError(f"--perf-rounds must be at least 5 (the gate's significance test needs them), got {rounds}")
        warmup = values.get("perf_warmup")
        if warmup is not None and warmup < 0:
            raise OptionError(f"--perf-warmup must be 0 or more, got {warmup}")
        gate = values.get("perf_gate_backends")
        if gate is None:
            gate_backends = frozenset(BACKENDS) - (UNGATED_ON_CUDA if kind == "cuda" else frozenset())
        else:
            names = parse_list(gate, flag="--perf-gate-backends")
            for name in names:
                get_backend(name)
            gate_backends = frozenset(names)
        cap = values.get("perf_memory_cap_gib")
        if cap is not None and kind != "cuda":
            raise OptionError(
                f"--perf-memory-cap-gib caps GPU memory; the device is {device}. Drop the option or use --device cuda"
            )
        given = lambda dest: value_or_default(values, PERF_OPTIONS, dest)  # noqa: E731
        return cls(
            grid=values.get("perf_grid") or DEFAULT_GRID[kind],
            rounds=rounds or ROUNDS[kind],
            warmup=warmup if warmup is not None else WARMUP[kind],
            threshold=given("perf_threshold"),
            memory_threshold=given("perf_memory_threshold"),
            suite_threshold=given("perf_suite_threshold"),
            inconclusive=given("perf_inconclusive"),
            alpha=given("perf_alpha"),
            require_baseline=bool(values.get("require_baseline")),
            gate_backends=gate_backends,
            memory_cap_gib=cap,
            cpu_baseline=not values.get("no_cpu_baseline"),
            slowdowns=tuple(parse_slowdown(item) for item in values.get("perf_slow_engine") or []),
        )

    def slowdown_for(self, engine_id: str) -> tuple[float, float]:
        """``(seconds added, factor)`` for an engine: every matching pattern applies."""
        delay, factor = 0.0, 1.0
        for s in self.slowdowns:
            if fnmatch.fnmatch(engine_id, s.pattern):
                delay += s.delay_s
                factor *= s.factor
        return delay, factor

    def record(self) -> dict[str, Any]:
        """What a saved run records about how it was measured and gated (an injected slowdown above all)."""
        return {
            "grid": self.grid,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "threshold": self.threshold,
            "memory_threshold": self.memory_threshold,
            "suite_threshold": self.suite_threshold,
            "inconclusive": self.inconclusive,
            "alpha": self.alpha,
            "gate_backends": sorted(self.gate_backends),
            "memory_cap_gib": self.memory_cap_gib,
            "cpu_baseline": self.cpu_baseline,
            "slowdowns": [dataclasses.asdict(s) for s in self.slowdowns],
        }


def parse_slowdown(item: str) -> Slowdown:
    pattern, sep, amount = item.rpartition("=")
    try:
        if not sep or not pattern:
            raise ValueError
        if amount.startswith("x"):
            factor = float(amount[1:])
            if factor < 1:
                raise ValueError
            return Slowdown(pattern, factor=factor)
        delay_ms = float(amount)
        if delay_ms < 0:
            raise ValueError
        return Slowdown(pattern, delay_s=delay_ms / 1e3)
    except ValueError:
        raise OptionError(f"--perf-slow-engine expects PATTERN=MS or PATTERN=xF (F >= 1), got {item!r}") from None
