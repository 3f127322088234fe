"""pytest plugin for the latency and memory gate.

Baselines live in ``baselines/<machine id>/`` (pytest-benchmark's own JSON, with
per-round samples).  With ``--benchmark-compare``, every ``perf`` test compares
itself with the newest complete baseline of this machine and fails *as a test
item* when it is slower beyond the threshold and the difference is significant,
or when its peak device memory grew beyond the memory threshold; a last item,
``test_suite_aggregate``, fails when the geometric mean over all compared items
moved beyond the suite threshold.  Engines come from :mod:`engines.plugin`; this
plugin imports nothing from ``fidelity/``.

Under pytest-xdist (``-n``; :mod:`perf.workers`): each worker times its engines on its
own device (holding the device's lock, :func:`perf.timing.device_lock`), gates its
items against its machine id's baseline and writes a shard; the controller merges the
shards into one ``--benchmark-json`` / ``--benchmark-save`` run, prints one summary and
decides ``test_suite_aggregate`` over every worker's items.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.options import OptionError, add_options, collect, usage_errors
from engines.plugin import factory_of, selection_of
from engines.workers import worker_id
from perf.baselines import (
    OPTIONS_KEY,
    RUN_RECORD_KEY,
    Baseline,
    BaselineMismatchError,
    BaselineSelectionError,
    check_compatible,
    default_storage,
    machine_facts,
    machine_id,
    select_baseline,
)
from perf.options import GRIDS, PERF_OPTIONS, PerfOptions
from perf.session import PerfSession
from perf.workers import (
    REFUSAL_KEY,
    SHARDS_KEY,
    Controller,
    WorkerShard,
    benchmarks_asked_off,
    cpu_baseline_path,
    is_aggregate,
    is_controller,
    timing_device,
)

PERF_KEY = pytest.StashKey[PerfSession]()
MARKERS = {"perf": "latency and memory benchmarks (pytest-benchmark)"}
MARKER_KWARGS = {"threshold"}
DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own default
# What pyproject's addopts select by default: everything but the benchmarks.
DEFAULT_MARKEXPR = "not perf"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("perf", "latency and memory regression gate")
    add_options(group.addoption, PERF_OPTIONS)


def _storage(config: pytest.Config, device: str) -> Path:
    """The folder baselines are saved to and read from: --benchmark-storage, else baselines/<machine id>."""
    given = getattr(config.option, "benchmark_storage", DEFAULT_STORAGE)
    if given != DEFAULT_STORAGE:
        return Path(str(given).removeprefix("file://"))
    folder = default_storage(config.rootpath) / machine_id(device)
    if hasattr(config.option, "benchmark_storage"):
        config.option.benchmark_storage = f"file://{folder}"
    return folder


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    selection = selection_of(config)
    # This process's device (a worker's own GPU); at a pytest-xdist controller, its first worker's.
    device = timing_device(config, selection.device, list(selection.gpus))
    controller = is_controller(config)
    try:
        options = PerfOptions.from_values(collect(config.getoption, PERF_OPTIONS), device=device)
        compare_spec = getattr(config.option, "benchmark_compare", None)
        compare = bool(compare_spec)
        if options.require_baseline and not compare:
            raise OptionError(
                "--require-baseline only applies when comparing: add --benchmark-compare (or drop --require-baseline)"
            )
        if controller and getattr(config.option, "benchmark_compare_fail", None):
            raise OptionError(
                "--benchmark-compare-fail is pytest-benchmark's own check, which does not run under pytest-xdist: the "
                "suite's gate does (--perf-threshold per item, --perf-suite-threshold for the suite); drop it or -n"
            )
        from perf.timing import check_device_locks_folder

        check_device_locks_folder()
        if options.memory_cap_gib is not None:
            from perf.timing import cap_device_memory

            try:
                cap_device_memory(device, options.memory_cap_gib)
            except ValueError as exc:
                raise OptionError(str(exc)) from None
    except usage_errors() as exc:
        raise pytest.UsageError(str(exc)) from None

    storage = _storage(config, device)
    saving = bool(getattr(config.option, "benchmark_save", None) or getattr(config.option, "benchmark_autosave", False))
    if saving:
        config.option.benchmark_save_data = True  # the gate needs every round, not just the summary
    if (saving or compare) and getattr(config.option, "markexpr", "") == DEFAULT_MARKEXPR:
        # `pytest --benchmark-compare` (or --benchmark-save) means the benchmarks: the
        # project's addopts deselect them from a plain `pytest`, not from these.
        config.option.markexpr = "perf"
    factory = factory_of(config)
    baseline_path, notes = None, []
    if compare:
        try:
            baseline_path, notes = select_baseline(storage, compare_spec)
        except BaselineSelectionError as exc:
            raise pytest.UsageError(str(exc)) from None
    if compare and baseline_path is None:
        message = (
            f"no {'complete ' if notes else ''}baseline for machine {machine_id(device)} in {storage}: run "
            f"`pytest -m perf --benchmark-save=baseline` on this machine to record one"
        )
        if options.require_baseline:
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
            current = machine_facts(device, factory.environment(), factory.numerics_record())
            check_compatible(baseline.facts, current, source=baseline_path, backends=baseline.backends)
            baseline.check_policies(selection.record()["policies"])
        except BaselineMismatchError as exc:
            raise pytest.UsageError(str(exc)) from None
    session = PerfSession(options, factory, baseline=baseline, compare=compare)
    session.baseline_notes = notes
    session.benchmarks_disabled = benchmarks_asked_off(config)
    config.stash[PERF_KEY] = session
    config.pluginmanager.register(RunProgress(session), "fidelity-perf-progress")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # a pytest-xdist worker: its results go to its shard (perf/workers.py)
        session.worker, session.workers = worker_id(config), int(workerinput.get("workercount") or 1)
        if workerinput.get(SHARDS_KEY):  # one CPU FP32 median per (model, shape) for the whole run
            session.cpu.shared, session.cpu.worker = cpu_baseline_path(workerinput[SHARDS_KEY]), session.worker
        config.pluginmanager.register(
            WorkerShard(config, session, workerinput.get(SHARDS_KEY), workerinput.get(REFUSAL_KEY)),
            "fidelity-perf-worker",
        )
    elif controller:  # the controller merges the workers' shards and decides the suite aggregate
        config.pluginmanager.register(Controller(config, session), "fidelity-perf-controller")


class RunProgress:
    """Counts the perf items a run selected and finished, and notes an interrupt, for the saved run record."""

    def __init__(self, session: PerfSession) -> None:
        self.session = session

    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config, items: list) -> None:
        # The suite aggregate reads every other item's comparisons: it runs last.
        last = [item for item in items if is_aggregate(item.nodeid)]
        if last:
            items[:] = [item for item in items if not is_aggregate(item.nodeid)] + last

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.session.selected = sum(
            1 for item in session.items if item.get_closest_marker("perf") and not is_aggregate(item.nodeid)
        )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Finished: its call ran, or setup skipped or failed it (an OOM skip is finished).
        if is_aggregate(report.nodeid):
            return
        if "perf" in report.keywords and (report.when == "call" or (report.when == "setup" and not report.passed)):
            self.session.finished.add(report.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_keyboard_interrupt(self, excinfo) -> None:
        self.session.interrupted = True

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session):
        # Before pytest-benchmark's own wrapper saves (--benchmark-save, --benchmark-json): finished items only.
        bs = getattr(session.config, "_benchmarksession", None)
        if bs is not None and self.session.interrupted:
            bs.benchmarks[:] = self.session.finished_benchmarks(list(bs.benchmarks))
        return (yield)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "perf_shape" in metafunc.fixturenames:
        session = metafunc.config.stash[PERF_KEY]
        shapes = GRIDS[session.options.grid]
        metafunc.parametrize("perf_shape", shapes, ids=[f"b{b}s{s}" for b, s in shapes])


@pytest.fixture(scope="session")
def perf_session(request: pytest.FixtureRequest) -> PerfSession:
    worker = request.config.pluginmanager.get_plugin("fidelity-perf-worker")
    if worker is not None and worker.refused:
        pytest.fail(worker.refused, pytrace=False)
    return request.config.stash[PERF_KEY]


@pytest.fixture
def perf_threshold(request: pytest.FixtureRequest, perf_session: PerfSession) -> float:
    marker = request.node.get_closest_marker("perf")
    if marker is None:
        return perf_session.options.threshold
    unknown = set(marker.kwargs) - MARKER_KWARGS
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.perf got unknown arguments {sorted(unknown)}; allowed: {sorted(MARKER_KWARGS)}")
    return float(marker.kwargs.get("threshold", perf_session.options.threshold))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    session = config.stash.get(PERF_KEY, None)
    if session is not None:
        machine_info["fidelity_suite"] = machine_facts(
            session.device, session.factory.environment(), session.factory.numerics_record()
        )


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    """pytest-benchmark's own check only warns, and crashes (INTERNALERROR) while wording the warning when the
    baseline folder is outside the working directory (it makes the path relative to it); an upgrade changes
    machine_info by design (driver, stack).  What must match is checked by perf.baselines.check_compatible."""
    try:
        return (yield)
    except ValueError as exc:
        if "subpath" not in str(exc):
            raise
        benchmarksession.logger.warning("the baseline's machine_info differs from this run's (the stack facts are "
                                        "compared by the gate; the machine id and runtimes were checked)")
        return None


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    session = config.stash.get(PERF_KEY, None)
    if session is not None:
        output_json[RUN_RECORD_KEY] = session.run_record()
        output_json[OPTIONS_KEY] = {**session.options.record(), "engines": session.factory.selection.record()}


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(PERF_KEY, None)
    if session is None or not (session.results or session.run_notes or session.benchmarks_disabled):
        return
    terminalreporter.write_sep("=", "latency gate")
    for line in session.summary_lines():
        terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(PERF_KEY, None)
    if session is not None:
        session.cpu.close()
