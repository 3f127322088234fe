"""pytest plugin for the latency and memory gate.

Baselines live in ``baselines/<machine id>/`` (pytest-benchmark's own JSON, with
per-round samples).  With ``--benchmark-compare``, every ``perf`` test compares
itself with the newest baseline of this machine and fails *as a test item* when
it is slower beyond the threshold and the difference is significant, or when its
peak device memory grew beyond the threshold.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from perf.baselines import (
    RUN_RECORD_KEY,
    Baseline,
    BaselineMismatchError,
    BaselineSelectionError,
    check_compatible,
    machine_dir,
    machine_facts,
    select_baseline,
)
from perf.session import GRIDS, PerfSession
from perf.stats import DEFAULT_ALPHA, DEFAULT_THRESHOLD

PERF_KEY = pytest.StashKey[PerfSession]()
DEFAULT_STORAGE = "file://./.benchmarks"
MARKER_KWARGS = {"threshold"}
# What pyproject's addopts select by default: everything but the benchmarks.
DEFAULT_MARKEXPR = "not perf"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("perf", "latency and memory regression gate")
    group.addoption(
        "--perf-grid",
        default=None,
        choices=sorted(GRIDS),
        help="batch x sequence grid (default: 'default', b1s128 b8s128 b32s512, on CUDA; 'cpu' on the CPU)",
    )
    group.addoption("--perf-rounds", type=int, default=None, help="timed rounds per benchmark (default 50 on CUDA, 10 on CPU)")
    group.addoption("--perf-warmup", type=int, default=None, help="untimed warm-up rounds (default 10 on CUDA, 2 on CPU)")
    group.addoption(
        "--perf-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="slowdown (and memory growth) that fails a test, as a fraction (default 0.10); per test: @pytest.mark.perf(threshold=...)",
    )
    group.addoption("--perf-alpha", type=float, default=DEFAULT_ALPHA, help="significance level of the Mann-Whitney test")
    group.addoption("--require-baseline", action="store_true", help="fail when this machine has no stored baseline")
    group.addoption(
        "--perf-gate-backends",
        default=None,
        help="backends whose regressions fail tests (default on CUDA: every backend but eager 'torch', whose "
        "Python-bound timings moved 1.5x between sessions on the H100; on the CPU: all)",
    )
    group.addoption(
        "--perf-memory-cap-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="cap this process's device memory (torch allocator) at GIB, e.g. to see what a smaller GPU could "
        "run: configurations that need more are skipped as out of memory",
    )
    group.addoption("--no-cpu-baseline", action="store_true", help="skip the in-run CPU FP32 baseline (no speedup figures)")
    group.addoption(
        "--perf-slow-engine",
        action="append",
        default=[],
        metavar="PATTERN=MS",
        help="test only: add MS milliseconds to every timed call of engines matching PATTERN (model/backend/precision)",
    )


def _parse_slow(items: list[str]) -> list[tuple[str, float]]:
    parsed = []
    for item in items:
        pattern, sep, ms = item.rpartition("=")
        if not sep or not pattern:
            raise pytest.UsageError(f"--perf-slow-engine expects PATTERN=MS, got {item!r}")
        parsed.append((pattern, float(ms) / 1e3))
    return parsed


def _gate_backends(value: str | None, device: str) -> frozenset[str] | None:
    """The backends the gate may fail; None means all."""
    if value:
        return frozenset(v.strip() for v in value.split(",") if v.strip())
    if device.startswith("cuda"):
        from engines.backends.registry import BACKENDS

        return frozenset(BACKENDS) - {"torch"}
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    from engines.env import DeviceUnavailableError, resolve_device

    try:
        device = resolve_device(config.getoption("--device"))
    except DeviceUnavailableError as exc:
        raise pytest.UsageError(str(exc)) from None
    cap = config.getoption("--perf-memory-cap-gib")
    if cap is not None:
        from perf.timing import cap_device_memory

        try:
            cap_device_memory(device, cap)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    folder = machine_dir(device)
    storage_given = config.getoption("benchmark_storage", DEFAULT_STORAGE) != DEFAULT_STORAGE
    if not storage_given and hasattr(config.option, "benchmark_storage"):
        config.option.benchmark_storage = f"file://{folder}"
    saving = bool(getattr(config.option, "benchmark_save", None) or getattr(config.option, "benchmark_autosave", False))
    if saving:
        config.option.benchmark_save_data = True  # the gate needs every round, not just the summary
    compare_spec = getattr(config.option, "benchmark_compare", None)
    compare = bool(compare_spec)
    if (saving or compare) and getattr(config.option, "markexpr", "") == DEFAULT_MARKEXPR:
        # `pytest --benchmark-compare` (or --benchmark-save) means the benchmarks: the
        # project's addopts deselect them from a plain `pytest`, not from these.
        config.option.markexpr = "perf"
    baseline_path, notes = None, []
    if compare:
        storage = Path(str(config.option.benchmark_storage).removeprefix("file://"))
        try:
            baseline_path, notes = select_baseline(storage, compare_spec)
        except BaselineSelectionError as exc:
            raise pytest.UsageError(str(exc)) from None
    if compare and baseline_path is None:
        message = (
            f"no {'complete ' if notes else ''}baseline for machine {folder.name} under {folder}: run "
            f"`pytest -m perf --benchmark-save=baseline` on this machine to record one"
        )
        if config.getoption("--require-baseline"):
            raise pytest.UsageError("; ".join([message, *notes]))
        notes.insert(0, message)
        config.option.benchmark_compare = []  # pytest-benchmark would only warn; the tests say it instead
    elif baseline_path is not None:
        # pytest-benchmark's own table compares with the same file as the gate.
        config.option.benchmark_compare = str(baseline_path)
    baseline = None
    if baseline_path is not None:
        try:
            baseline = Baseline(baseline_path)
            check_compatible(baseline.facts, machine_facts(device), source=baseline_path, backends=baseline.backends)
        except BaselineMismatchError as exc:
            raise pytest.UsageError(str(exc)) from None
    session = PerfSession(
        device=device,
        grid=config.getoption("--perf-grid") or ("default" if device.startswith("cuda") else "cpu"),
        rounds=config.getoption("--perf-rounds"),
        warmup=config.getoption("--perf-warmup"),
        threshold=config.getoption("--perf-threshold"),
        alpha=config.getoption("--perf-alpha"),
        baseline=baseline,
        gate=compare,
        cpu_baseline=not config.getoption("--no-cpu-baseline"),
        slow_engines=_parse_slow(config.getoption("--perf-slow-engine")),
        gate_backends=_gate_backends(config.getoption("--perf-gate-backends"), device),
    )
    session.baseline_notes = notes
    config.stash[PERF_KEY] = session
    config.pluginmanager.register(RunProgress(session), "fidelity-perf-progress")


class RunProgress:
    """Counts the perf items a run selected and finished, and notes an interrupt, for the saved run record."""

    def __init__(self, session: PerfSession) -> None:
        self.session = session

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.session.selected = sum(1 for item in session.items if item.get_closest_marker("perf"))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Finished: its call ran, or setup skipped or failed it (an OOM skip is finished).
        if "perf" in report.keywords and (report.when == "call" or (report.when == "setup" and not report.passed)):
            self.session.finished.add(report.nodeid)

    def pytest_keyboard_interrupt(self, excinfo) -> None:
        self.session.interrupted = True


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "perf_shape" in metafunc.fixturenames:
        session = metafunc.config.stash[PERF_KEY]
        shapes = GRIDS[session.grid]
        metafunc.parametrize("perf_shape", shapes, ids=[f"b{b}s{s}" for b, s in shapes])


@pytest.fixture(scope="session")
def perf_session(request: pytest.FixtureRequest) -> PerfSession:
    return request.config.stash[PERF_KEY]


@pytest.fixture
def perf_threshold(request: pytest.FixtureRequest, perf_session: PerfSession) -> float:
    marker = request.node.get_closest_marker("perf")
    if marker is None:
        return perf_session.threshold
    unknown = set(marker.kwargs) - MARKER_KWARGS
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.perf got unknown arguments {sorted(unknown)}; allowed: {sorted(MARKER_KWARGS)}")
    return float(marker.kwargs.get("threshold", perf_session.threshold))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    session = config.stash.get(PERF_KEY, None)
    if session is not None:
        machine_info["fidelity_suite"] = machine_facts(session.device)


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    session = config.stash.get(PERF_KEY, None)
    if session is not None:
        output_json[RUN_RECORD_KEY] = session.run_record()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(PERF_KEY, None)
    if session is None or not session.results:
        return
    terminalreporter.write_sep("=", "latency gate")
    for line in session.summary_lines():
        terminalreporter.write_line(line)
