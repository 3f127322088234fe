"""The benchmarks under pytest-xdist: one worker per GPU, one merged run, the suite aggregate at the controller.

``pytest -n auto -m perf --device cuda`` times every engine on one worker pinned to its own GPU
(engines.workers: one worker per GPU, the tests of one engine on one worker).  What this adds:

* **pytest-benchmark on the workers.**  pytest-benchmark turns itself off under xdist: its
  ``BenchmarkSession`` sets ``disabled`` when ``PYTEST_XDIST_WORKER`` is set or ``--dist`` is not
  ``no`` (5.3 also records it in ``xdist_warning``; 5.2 only warns).  :func:`enable_on_worker` turns it
  back on on each worker (unless ``--benchmark-disable`` or ``--benchmark-skip`` asked for it off) and
  takes the worker's own saving away: each worker writes a shard, the controller writes
  ``--benchmark-json`` and ``--benchmark-save``.
* **Never two engines timed on one device at once.**  Timing holds the device's lock
  (:func:`perf.timing.device_lock`, a file lock per physical device): workers that share a device take
  turns, workers on different GPUs never wait.  Each result records its device, GPU index, worker, the
  number of workers and its hold of the lock (``extra_info``: device, gpu_index, worker, workers,
  device_lock).
* **One CPU FP32 baseline per run.**  The first worker to need a (model, shape) times its CPU FP32 median
  and writes it beside the shards (:func:`cpu_baseline_path`); the others read it (perf.timing.CpuBaseline):
  every result of the merged run is set against the same CPU median, as in one process, and each
  ``extra_info`` names the worker that measured it (``cpu_fp32_measured_by``).
* **Shards.**  Each worker rewrites its shard (``gwN.json`` in a folder the controller made for this
  session) after every perf item: pytest-benchmark's own JSON of what it measured (every round kept),
  with its results and their comparisons under :data:`SHARD_KEY`.  An interrupted run keeps what every
  worker had finished.
* **The controller** merges the shards once the workers are done (:func:`merge_shards`: the benchmarks of
  every worker, each once, in collection order; the machine facts checked equal), saves one run
  (``--benchmark-json``, ``--benchmark-save``/``--benchmark-autosave`` into this machine id's baselines,
  interrupted or not), prints the latency gate's summary over every worker's results, and decides
  ``test_suite_aggregate`` (:meth:`perf.session.PerfSession.aggregate_verdict`, the same verdict as in one
  process), reporting it under that test's id: a failing aggregate fails the session.  Results that
  cannot be merged fail it too, and nothing is saved.
* **One machine id per run.**  Each worker compares its items with the baseline of its own machine id
  (its own GPU's); the run is refused when the workers' GPUs are of different models (their timings would
  belong to different baselines, each holding whichever engines the scheduler happened to give it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from engines.workers import pinned_device, worker_id

SHARDS_KEY = "fidelity_perf_shards"  # workerinput: the folder the workers write their shards to
REFUSAL_KEY = "fidelity_perf_refusal"  # workerinput: why the benchmarks may not run (GPUs of different models)
SHARD_KEY = "fidelity_suite_shard"  # in a shard: {"worker", "results", "finished", "baseline", "aggregate"}
AGGREGATE_TEST = "test_suite_aggregate"


class ShardError(ValueError):
    """Worker shards that do not make one run (another machine, a benchmark measured twice, unreadable)."""


def is_controller(config: pytest.Config) -> bool:
    """The pytest-xdist controller of a distributed session (not a worker, not a plain run, not ``-n 0``)."""
    return worker_id(config) is None and getattr(config.option, "dist", "no") != "no"


def timing_device(config: pytest.Config, device: str, gpus: list[int]) -> str:
    """The device whose machine id this process's benchmarks belong to: at the controller, the first worker's."""
    return pinned_device(device, "gw0", gpus) if is_controller(config) else device


def is_aggregate(nodeid: str) -> bool:
    return nodeid.rpartition("::")[2].split("[", 1)[0] == AGGREGATE_TEST


def refusal(machine_ids: dict[str, str]) -> str | None:
    """Why workers on these machine ids ({worker: machine id}) may not time one run; None when they may."""
    if len(set(machine_ids.values())) <= 1:
        return None
    listed = ", ".join(f"{worker} {machine}" for worker, machine in machine_ids.items())
    return (f"the workers' GPUs are of different models ({listed}): their timings belong to different baselines, "
            "and -n hands each engine to whichever worker is free, so no baseline would hold every engine. Time one "
            "GPU model per run: --gpus with the indices of one model (or -n 0 --device cuda:K)")


def check_benchmark_session(config: pytest.Config) -> None:
    """The pytest-benchmark session :func:`enable_on_worker` knows how to turn back on; a usage error otherwise.

    Checked at the controller, before any worker starts (the controller's session is the same class)."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:  # -p no:benchmark
        return
    missing = [name for name in ("disabled", "skip", "json", "save", "autosave") if not hasattr(bs, name)]
    if missing:
        from importlib.metadata import version

        raise pytest.UsageError(
            f"pytest-benchmark {version('pytest-benchmark')} no longer disables itself under pytest-xdist as 5.x did "
            f"(its session has no {', '.join(missing)}): the benchmarks cannot run under -n with it; run them "
            "without -n"
        )


def benchmarks_asked_off(config: pytest.Config) -> bool:
    """``--benchmark-disable`` (and no ``--benchmark-enable``): the user's ask, not pytest-benchmark's own under xdist."""
    return bool(getattr(config.option, "benchmark_disable", False)
                and not getattr(config.option, "benchmark_enable", False))


def enable_on_worker(config: pytest.Config) -> None:
    """pytest-benchmark on a pytest-xdist worker: timing on (unless --benchmark-disable), its own saving off."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:  # -p no:benchmark
        return
    check_benchmark_session(config)  # the controller refused a session it does not know; this is the backstop
    # Off because xdist is active, not because the user said so (pytest-benchmark's own test, 5.1-5.3).
    if bs.disabled and not benchmarks_asked_off(config) and not bs.skip:
        bs.disabled = False
        if hasattr(bs, "xdist_warning"):  # 5.3: else it warns at the end that benchmarks were disabled
            bs.xdist_warning = False
    bs.json, bs.save, bs.autosave = None, None, None


def shard_path(folder: Path, worker: str) -> Path:
    return Path(folder) / f"{worker}.json"


def cpu_baseline_path(folder: Path | str) -> Path:
    """The CPU FP32 medians the workers share (perf.timing.CpuBaseline.shared), beside their shards."""
    return Path(folder) / "cpu-baseline.json"


class WorkerShard:
    """A worker's plugin: its shard rewritten after each perf item and at the end; the suite aggregate left to the
    controller."""

    def __init__(self, config: pytest.Config, session, folder: str | None, refused: str | None) -> None:
        self.config = config
        self.session = session
        self.worker = worker_id(config)
        self.path = None if folder is None else shard_path(Path(folder), self.worker)
        self.refused = refused
        self.aggregate: dict[str, Any] | None = None
        self.touched = False  # a perf item ran here (a fidelity-only worker writes no shard)
        self._infos: tuple[dict, dict] | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        enable_on_worker(self.config)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem) -> bool | None:
        if not is_aggregate(item.nodeid):
            return None
        # The controller decides it over every worker's results; this worker says where the test is.
        self.aggregate = {"nodeid": item.nodeid, "location": list(item.location)}
        self.write()
        return True

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem):
        # The marker, not the report's keywords: those also hold folder names (this suite's own tests/perf/).
        try:
            return (yield)
        finally:
            if item.get_closest_marker("perf") is not None:
                self.write()

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.touched:
            self.write()  # the run record's last word (an interrupt)

    def write(self) -> None:
        self.touched = True
        if self.path is None:
            return
        from pytest_benchmark.utils import safe_dumps

        from engines.files import atomic_write_text

        bs = getattr(self.config, "_benchmarksession", None)
        benchmarks = self.session.finished_benchmarks(list(bs.benchmarks)) if bs is not None else []
        if self._infos is None:  # once per worker: pytest-benchmark's machine info reads the CPU's (a second)
            hook = self.config.hook
            machine_info = hook.pytest_benchmark_generate_machine_info(config=self.config)
            hook.pytest_benchmark_update_machine_info(config=self.config, machine_info=machine_info)
            commit_info = hook.pytest_benchmark_generate_commit_info(config=self.config)
            hook.pytest_benchmark_update_commit_info(config=self.config, commit_info=commit_info)
            self._infos = machine_info, commit_info
        machine_info, commit_info = self._infos
        output = self.config.hook.pytest_benchmark_generate_json(
            config=self.config, benchmarks=benchmarks, include_data=True, machine_info=machine_info,
            commit_info=commit_info,
        )
        self.config.hook.pytest_benchmark_update_json(config=self.config, benchmarks=benchmarks, output_json=output)
        output[SHARD_KEY] = {
            "worker": self.worker,
            "results": [r.record() for r in self.session.results],
            "finished": sorted(self.session.finished),
            "cut_short": self.session.cut_short,
            "baseline": None if self.session.baseline is None else str(self.session.baseline.path),
            "aggregate": self.aggregate,
        }
        atomic_write_text(self.path, safe_dumps(output, ensure_ascii=True, indent=2))


# -- the controller ---------------------------------------------------------------------------------


def read_shards(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every worker's shard in ``folder``, as (worker, data), by worker number; ShardError naming one unreadable."""
    shards = []
    for path in sorted(Path(folder).glob("gw*.json"), key=lambda p: int(p.stem.removeprefix("gw") or 0)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ShardError(f"the shard of {path.stem} ({path}) does not read: {exc}") from None
        shards.append((path.stem, data))
    return shards


@dataclasses.dataclass
class MergedRun:
    """The workers' shards as one run: pytest-benchmark's JSON parts, the results, and how far the workers got."""

    workers: list[str]
    machine_info: dict[str, Any]
    commit_info: dict[str, Any]
    benchmarks: list[dict[str, Any]]
    results: list[dict[str, Any]]  # perf.session.PerfResult records, with their comparisons
    selected: int  # perf items each worker collected (every worker collects them all)
    finished: set[str]  # the perf items the workers finished (node ids)
    cut_short: int  # benchmarks an interrupt cut short, which the workers left out of their shards
    interrupted: bool
    baselines: dict[str, str | None]  # {worker: the baseline it compared with}


def merge_shards(shards: list[tuple[str, dict[str, Any]]], order: list[str] | None = None) -> MergedRun:
    """One run from the workers' shards: the benchmarks (and results) of every worker, each once, in ``order``
    (the collection's node ids; others after them).

    ShardError when the shards do not make one run: different machine facts (machine id, GPU, driver, stack,
    numerics; what perf.baselines.machine_facts records) or commits, or a benchmark that two workers measured.
    """
    from perf.baselines import RUN_RECORD_KEY

    if not shards:
        raise ShardError("no worker wrote a shard")
    (first_worker, first), *rest = shards
    facts = (first.get("machine_info") or {}).get("fidelity_suite")
    for worker, data in rest:
        other = (data.get("machine_info") or {}).get("fidelity_suite")
        if other != facts:
            differ = sorted(k for k in {*(facts or {}), *(other or {})} if (facts or {}).get(k) != (other or {}).get(k))
            detail = ", ".join(f"{k} {(facts or {}).get(k)!r} vs {(other or {}).get(k)!r}" for k in differ)
            raise ShardError(f"{first_worker} and {worker} measured on different machines or stacks ({detail}): "
                             "one run holds one machine id's results")
        for key in ("id", "dirty"):
            if (data.get("commit_info") or {}).get(key) != (first.get("commit_info") or {}).get(key):
                raise ShardError(f"{first_worker} and {worker} ran different commits of the suite")
    seen: dict[str, str] = {}
    benchmarks, results = [], []
    for worker, data in shards:
        for bench in data.get("benchmarks") or []:
            name = bench.get("fullname") or bench.get("name")
            if name in seen:
                raise ShardError(f"{name} was measured by both {seen[name]} and {worker} (--dist each?): each "
                                 "benchmark runs on one worker (-n, xdist's load distribution)")
            seen[name] = worker
            benchmarks.append(bench)
        results.extend((data.get(SHARD_KEY) or {}).get("results") or [])
    rank = {nodeid: i for i, nodeid in enumerate(order or [])}
    benchmarks.sort(key=lambda b: rank.get(b.get("fullname"), len(rank)))
    results.sort(key=lambda r: rank.get(r.get("name"), len(rank)))
    records = [data.get(RUN_RECORD_KEY) or {} for _, data in shards]
    return MergedRun(
        workers=[worker for worker, _ in shards],
        machine_info=first.get("machine_info") or {},
        commit_info=first.get("commit_info") or {},
        benchmarks=benchmarks,
        results=results,
        selected=max(int(r.get("selected") or 0) for r in records),
        finished={nodeid for _, data in shards for nodeid in (data.get(SHARD_KEY) or {}).get("finished") or []},
        cut_short=sum(int((data.get(SHARD_KEY) or {}).get("cut_short") or 0) for _, data in shards),
        interrupted=any(r.get("interrupted") for r in records),
        baselines={worker: (data.get(SHARD_KEY) or {}).get("baseline") for worker, data in shards},
    )


def aggregate_item(shards: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The suite aggregate's node id and location, as the worker handed it wrote them; None when none was."""
    return next((a for _, data in shards if (a := (data.get(SHARD_KEY) or {}).get("aggregate"))), None)


def aggregate_reports(nodeid: str, location: tuple, outcome: str, message: str, *, rootpath: Path) -> list:
    """The setup, call and teardown reports of ``test_suite_aggregate`` decided at the controller."""
    longrepr: Any = None
    if outcome == "failed":
        try:
            pytest.fail(message, pytrace=False)
        except pytest.fail.Exception:
            longrepr = pytest.ExceptionInfo.from_current().getrepr(style="value")
    elif outcome == "skipped":
        lineno = location[1] + 1 if location[1] is not None else 0
        longrepr = (str(rootpath / location[0]), lineno, f"Skipped: {message}")
    now = time.time()
    keywords = {AGGREGATE_TEST: 1, "perf": 1}
    return [
        pytest.TestReport(nodeid, location, keywords, outcome if when == "call" else "passed",
                          longrepr if when == "call" else None, when, [], 0.0, now, now)
        for when in ("setup", "call", "teardown")
    ]


class Controller:
    """The controller's plugin: the shards' folder for the workers, the merge, the aggregate, the one saved run."""

    def __init__(self, config: pytest.Config, session) -> None:
        self.config = config
        self.session = session
        self.folder: Path | None = None  # made when the first worker is set up
        self.order: list[str] = []
        self.refused: str | None = None
        self.merged: MergedRun | None = None
        self.aggregate: dict[str, Any] | None = None  # test_suite_aggregate, when the workers collected it
        self.error: str | None = None

    # -- start: every worker learns the folder, and whether the run is refused ---------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session) -> None:
        check_benchmark_session(self.config)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="fidelity-perf-shards-"))
            self.refused = self._check_machines(int(node.workerinput.get("workercount") or 1))
            if self.refused:
                self.session.run_notes.append(f"refused: {self.refused}")
        node.workerinput[SHARDS_KEY] = str(self.folder)
        node.workerinput[REFUSAL_KEY] = self.refused

    def _check_machines(self, workers: int) -> str | None:
        from engines.env import machine_id
        from engines.plugin import selection_of

        selection = selection_of(self.config)
        devices = {f"gw{i}": pinned_device(selection.device, f"gw{i}", list(selection.gpus)) for i in range(workers)}
        if len(set(devices.values())) <= 1 or not selection.device.startswith("cuda"):
            return None
        return refusal({worker: machine_id(device) for worker, device in devices.items()})

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        if not self.order:
            self.order = list(ids)

    # -- the workers are done: merge, decide the aggregate -----------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session):
        result = yield  # xdist's loop: returns once every worker is down (an interrupt raises past this)
        self.merge()
        aggregate = self.aggregate
        if aggregate is not None:
            if self.error:
                outcome, message = "failed", f"the workers' results could not be merged: {self.error}"
            else:
                outcome, message = self.session.aggregate_verdict()
            location = tuple(aggregate["location"])
            hook = self.config.hook
            hook.pytest_runtest_logstart(nodeid=aggregate["nodeid"], location=location)
            for report in aggregate_reports(aggregate["nodeid"], location, outcome, message,
                                            rootpath=self.config.rootpath):
                hook.pytest_runtest_logreport(report=report)
            hook.pytest_runtest_logfinish(nodeid=aggregate["nodeid"], location=location)
        return result

    def merge(self) -> None:
        """Read and merge whatever shards exist (once): the session's results become every worker's."""
        if self.merged is not None or self.error is not None or self.folder is None:
            return
        from perf.session import PerfResult

        try:
            shards = read_shards(self.folder)
            if not shards:
                return  # no worker ran a perf item
            self.aggregate = aggregate_item(shards)
            merged = merge_shards(shards, self.order)
            baseline = None if self.session.baseline is None else str(self.session.baseline.path)
            other = {w: b for w, b in merged.baselines.items() if b != baseline}
            if other:
                raise ShardError(", ".join(f"{w} compared with {b}" for w, b in other.items())
                                 + f", the controller chose {baseline}: a baseline saved during the run?")
        except ShardError as exc:
            self.error = str(exc)
            self.session.run_notes.append(f"the workers' results were not merged, nothing was saved: {exc} (their "
                                          f"shards are kept in {self.folder})")
            return
        self.merged = merged
        self.session.results = [PerfResult.from_record(r) for r in merged.results]
        self.session.selected = merged.selected
        self.session.finished |= merged.finished  # an item a worker finished whose report an interrupt cut off
        self.session.interrupted = self.session.interrupted or merged.interrupted
        self.session.note_cut_short(merged.cut_short)
        measured = ", ".join(f"{w} {sum(1 for r in merged.results if r.get('worker') == w)}" for w in merged.workers)
        self.session.run_notes.append(
            f"pytest-xdist: {len(merged.benchmarks)} benchmarks from {len(merged.workers)} workers ({measured})"
            + ("; interrupted: what the workers had finished" if self.session.interrupted else "")
        )

    # -- the end: one saved run ------------------------------------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        self.merge()  # an interrupted run: what the workers had written
        if self.error:  # the shards stay to be looked at (the summary names their folder)
            if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
                session.exitstatus = pytest.ExitCode.TESTS_FAILED  # fail closed
            return
        if self.merged is not None:
            self.save(self.merged)  # should saving fail, the shards stay too
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def save(self, merged: MergedRun) -> None:
        bs = getattr(self.config, "_benchmarksession", None)
        if bs is None:
            return
        save = bs.save or bs.autosave
        if not (save or bs.json):
            return
        if not merged.benchmarks:
            if not self.session.benchmarks_disabled:  # as pytest-benchmark in one process: silent when disabled
                bs.logger.warning("Not saving anything, no benchmarks have been run!")
            return
        hook = self.config.hook
        output = hook.pytest_benchmark_generate_json(config=self.config, benchmarks=[], include_data=True,
                                                     machine_info=merged.machine_info, commit_info=merged.commit_info)
        output["benchmarks"] = merged.benchmarks
        hook.pytest_benchmark_update_json(config=self.config, benchmarks=[], output_json=output)  # the run record
        if bs.json:
            bs.save_json(output)
        if save:
            bs.storage.save(output, save)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.folder is not None and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()  # a session that ended before its workers wrote anything
