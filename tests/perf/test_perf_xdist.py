"""The benchmarks under pytest-xdist, on the CPU with real engines and real workers: one merged run, the device lock,
the per-item gates on the workers and the suite aggregate at the controller.

Every run here gets its own temporary folder (TMPDIR): the workers' shards and the device locks live there, so a
leftover shard is seen and these runs do not wait on the lock of another test session's timing.
"""

import itertools
import json
import math
import os
import re
import subprocess
import sys
import types
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version
from test_perf_gate import SELECT, doctored, junit_failures

from perf.workers import ShardError, merge_shards, read_shards, refusal

ROOT = Path(__file__).resolve().parents[2]
ENGINES = {"tiny-bert/torch/fp32", "tiny-bert/torch/hybrid"}
# Items allowed any slowdown: where a test is about the machinery, this machine's noise must not decide.
LENIENT = ("--perf-threshold=1e6", "--perf-memory-threshold=1e6", "--perf-suite-threshold=1e6")


def private_tmp(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "tmpdir"
    folder.mkdir(exist_ok=True)
    return {"TMPDIR": str(folder)}


def run(tmp_path: Path, *args: str, workers: int | None = 2, cpu_baseline: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **private_tmp(tmp_path))
    xdist = ["-n", str(workers)] if workers else []
    select = [arg for arg in SELECT if cpu_baseline is False or arg != "--no-cpu-baseline"]
    return subprocess.run([sys.executable, "-m", "pytest", *select, *xdist, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def leftover_shards(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "tmpdir").glob("fidelity-perf-shards-*"))


def benchmarks(path: Path) -> dict[str, dict]:
    return {b["fullname"]: b for b in json.loads(path.read_text())["benchmarks"]}


@pytest.fixture(scope="module")
def serial_and_xdist(tmp_path_factory):
    """One run in one process and one with two workers (each call slowed 20 ms, so that the workers' timing
    overlaps in time and the lock has something to keep apart), both with --benchmark-json and the CPU FP32
    baseline (the engines of both workers are tiny-bert's: both need its CPU median at both shapes)."""
    tmp = tmp_path_factory.mktemp("xdist-json")
    serial = run(tmp, f"--benchmark-json={tmp / 'serial.json'}", workers=None, cpu_baseline=True)
    assert serial.returncode == 0, serial.stdout[-3000:] + serial.stderr[-2000:]
    proc = run(tmp, f"--benchmark-json={tmp / 'xdist.json'}", "--perf-slow-engine", "*=20", "-v", cpu_baseline=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return tmp, proc


@pytest.mark.slow
def test_two_workers_give_the_serial_runs_benchmarks_each_naming_its_worker_and_device(serial_and_xdist):
    tmp, proc = serial_and_xdist
    one, two = benchmarks(tmp / "serial.json"), benchmarks(tmp / "xdist.json")
    assert len(one) == 4 and set(two) == set(one)  # 2 engines x 2 shapes, no row lost or doubled
    assert all(b["extra_info"]["worker"] is None and b["extra_info"]["workers"] is None for b in one.values())
    workers = {}
    for name, bench in two.items():
        info = bench["extra_info"]
        assert info["worker"] in ("gw0", "gw1") and info["workers"] == 2, info
        assert info["device"] == "cpu" and info["gpu_index"] is None
        assert len(bench["stats"]["data"]) == 12  # every round, as in one process
        workers.setdefault(info["engine"], set()).add(info["worker"])
    # Each engine timed by one worker, and both workers timed one.
    assert set(workers) == ENGINES and all(len(w) == 1 for w in workers.values()), workers
    assert set().union(*workers.values()) == {"gw0", "gw1"}
    # One CPU FP32 median per shape for the whole run, measured once, by one worker, whichever timed the engine.
    for shape in {(b["extra_info"]["batch"], b["extra_info"]["sequence"]) for b in two.values()}:
        infos = [b["extra_info"] for b in two.values() if (b["extra_info"]["batch"], b["extra_info"]["sequence"]) == shape]
        assert len(infos) == 2 and {info["worker"] for info in infos} == {"gw0", "gw1"}, infos
        assert len({info["cpu_fp32_median_ms"] for info in infos}) == 1, infos
        assert len({info["cpu_fp32_measured_by"] for info in infos}) == 1, infos
        assert infos[0]["cpu_fp32_measured_by"] in ("gw0", "gw1"), infos
        measurer = next(info for info in infos if info["worker"] == infos[0]["cpu_fp32_measured_by"])
        assert measurer["cpu_fp32_lock"]["key"].endswith("-cpu"), measurer  # it measured under the CPU's lock
    # In one process: each shape's CPU hold is given to the one item that asked first.
    holds = [b["extra_info"]["cpu_fp32_lock"] for b in one.values()]
    assert sum(hold is not None for hold in holds) == 2, holds
    assert all(b["extra_info"]["cpu_fp32_measured_by"] is None for b in one.values())
    data = json.loads((tmp / "xdist.json").read_text())
    assert data["fidelity_suite_run"] == {"schema": 1, "selected": 4, "finished": 4, "interrupted": False,
                                          "complete": True}
    assert "fidelity_suite_shard" not in data  # a shard's own block stays in the shards
    assert data["machine_info"]["fidelity_suite"]["machine_id"].startswith("cpu-")
    # One latency gate summary at the controller, over both workers' results; the shards are merged and gone.
    summary = proc.stdout.split("latency gate", 1)[1]
    assert "4 benchmarks from 2 workers" in summary and "gw0 cpu" in summary and "gw1 cpu" in summary
    if Version(version("pytest-benchmark")) >= Version("5.3"):  # 5.2 warns so at start-up, before any plugin can act
        assert "Benchmarks are automatically disabled" not in proc.stdout + proc.stderr
    assert not leftover_shards(tmp)
    # No baseline compared: the suite aggregate is skipped once, with the reason, as in one process.
    assert "perf/test_latency.py::test_suite_aggregate SKIPPED" in proc.stdout
    assert re.search(r"SKIPPED \[1\] perf/test_latency\.py:\d+: no baseline compared", proc.stdout)


@pytest.mark.slow
def test_two_workers_on_one_device_never_time_at_once(serial_and_xdist):
    tmp, _ = serial_and_xdist
    measured = benchmarks(tmp / "xdist.json").values()
    holds = [(b["extra_info"]["worker"], b["extra_info"]["device_lock"]) for b in measured]
    assert len({hold["key"] for _, hold in holds}) == 1  # one CPU, one lock
    assert {worker for worker, _ in holds} == {"gw0", "gw1"}
    for (_, a), (_, b) in itertools.combinations(holds, 2):
        assert a["released"] <= b["acquired"] or b["released"] <= a["acquired"], (a, b)  # the timed spans are apart
    # (Whether the workers asked for the device at once depends on this machine's load: not asserted. With the lock
    # replaced by a no-op, the spans above overlapped.)
    assert all(h["acquired"] >= h["requested"] and h["waited_s"] >= 0 for _, h in holds)


@pytest.fixture(scope="module")
def xdist_saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xdist-save")
    storage = tmp / "baselines" / "cpu-machine"
    proc = run(tmp, f"--benchmark-storage=file://{storage}", "--benchmark-save=baseline")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert not leftover_shards(tmp)
    return storage, proc


@pytest.mark.slow
def test_a_run_saved_under_xdist_is_one_baseline_that_a_compare_under_xdist_passes_against(xdist_saved, tmp_path):
    storage, saved = xdist_saved
    (file,) = storage.rglob("*.json")  # one run saved by the controller, not one per worker
    assert file.name == "0001_baseline.json" and f"Saved benchmark data in: {file}" in saved.stderr
    data = json.loads(file.read_text())
    assert data["fidelity_suite_run"]["complete"] and data["fidelity_suite_run"]["selected"] == 4
    assert {b["extra_info"]["engine"] for b in data["benchmarks"]} == ENGINES and len(data["benchmarks"]) == 4
    assert all(len(b["stats"]["data"]) == 12 for b in data["benchmarks"])  # every round kept for the gate

    junit = tmp_path / "junit.xml"
    proc = run(tmp_path, f"--benchmark-storage=file://{storage}", "--benchmark-compare", *LENIENT,
               f"--junitxml={junit}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout.split("latency gate", 1)[1]
    assert f"baseline: {file}" in summary and "suite aggregate over 4 compared items" in summary
    assert "5 passed" in proc.stdout  # the four items and the suite aggregate, decided at the controller
    assert not junit_failures(junit)
    assert 'name="test_suite_aggregate"' in junit.read_text()


@pytest.mark.slow
def test_items_are_gated_on_their_workers_and_the_suite_aggregate_at_the_controller(xdist_saved, tmp_path):
    """A baseline doctored for one engine (hybrid 1000x faster; doctored, not slowed live: nothing here depends on
    this machine's load): its two items fail, each on its worker, and the aggregate over both workers' four items
    (a geometric mean of ~32x) fails at the controller, failing the session.  fp32's baseline is its own live run:
    the thresholds are far above this machine's noise."""
    storage, _ = xdist_saved
    scaled = doctored(storage, tmp_path / "b", lambda engine: 1e-3 if engine == "tiny-bert/torch/hybrid" else 1.0)
    junit = tmp_path / "junit.xml"
    # Items fail beyond 100x (hybrid's 1000x, not fp32's noise against its own live baseline), the suite beyond 10x.
    proc = run(tmp_path, f"--benchmark-storage=file://{scaled}", "--benchmark-compare", "--perf-threshold=99",
               "--perf-suite-threshold=9", "--perf-memory-threshold=1e6", f"--junitxml={junit}", "-v")
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = junit_failures(junit)
    assert set(failed) == {"test_latency[b1s32-tiny-bert/torch/hybrid]", "test_latency[b4s64-tiny-bert/torch/hybrid]",
                           "test_suite_aggregate"}, failed
    assert all("x slower (median" in m for name, m in failed.items() if name != "test_suite_aggregate")
    assert proc.stdout.count("] FAILED perf/test_latency.py::test_latency[") == 2  # "[gwN] FAILED": a worker's item
    assert "suite aggregate over 4 compared items" in failed["test_suite_aggregate"]
    assert "FAILED perf/test_latency.py::test_suite_aggregate" in proc.stdout  # decided at the controller
    assert not leftover_shards(tmp_path)


@pytest.mark.slow
def test_an_interrupted_run_under_xdist_saves_what_the_workers_measured(tmp_path, interrupted_run):
    storage = tmp_path / "storage"
    # 150 ms per call makes each item last seconds: Ctrl-C (to the controller) lands while both workers time.
    code, output = interrupted_run(
        [*SELECT, "-n", "2", f"--benchmark-storage=file://{storage}", "--benchmark-save=nightly",
         "--perf-slow-engine", "*=150"],
        ROOT, env=private_tmp(tmp_path),
    )
    assert code == 2, output[-3000:]  # pytest's "interrupted"
    (saved,) = storage.rglob("0001_nightly.json")
    data = json.loads(saved.read_text())
    record = data["fidelity_suite_run"]
    assert record["interrupted"] and not record["complete"] and record["selected"] == 4
    assert 1 <= len(data["benchmarks"]) <= record["finished"] < 4  # every item a worker finished is kept
    assert all(b["extra_info"]["worker"] in ("gw0", "gw1") for b in data["benchmarks"])
    assert "interrupted: what the workers had finished" in output.split("latency gate", 1)[1]
    assert not leftover_shards(tmp_path)


@pytest.mark.slow
def test_results_that_are_not_one_run_fail_the_session_and_nothing_is_saved(tmp_path):
    """--dist each: every worker times every engine, so each benchmark comes twice and the merge refuses them."""
    storage = tmp_path / "storage"
    proc = run(tmp_path, "--dist", "each", "--precisions=fp32", f"--benchmark-storage=file://{storage}",
               "--benchmark-save=x")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "was measured by both gw0 and gw1 (--dist each?)" in proc.stdout.split("latency gate", 1)[1]
    assert "FAILED perf/test_latency.py::test_suite_aggregate" in proc.stdout  # the aggregate fails closed
    assert "the workers' results could not be merged" in proc.stdout.split("FAILURES", 1)[1]
    assert not list(storage.rglob("*.json"))
    (kept,) = leftover_shards(tmp_path)  # kept to be looked at, and named in the summary
    assert sorted(p.name for p in kept.iterdir()) == ["gw0.json", "gw1.json"] and str(kept) in proc.stdout


def test_compare_fail_under_xdist_is_a_usage_error(tmp_path):
    proc = run(tmp_path, "--benchmark-compare", "--benchmark-compare-fail=mean:5%", "--co")
    assert proc.returncode == 4 and "--benchmark-compare-fail is pytest-benchmark's own check" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unwritable_lock_folder_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = dict(os.environ, HF_HUB_OFFLINE="1", FIDELITY_DEVICE_LOCKS=str(blocker / "locks"))
    proc = subprocess.run([sys.executable, "-m", "pytest", *SELECT, "--co"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FIDELITY_DEVICE_LOCKS" in proc.stderr and "Traceback" not in proc.stderr


# -- the merge, on shards as the workers write them ---------------------------------------------------------------


def shard(worker: str, names: list[str], *, machine: str = "cpu-x86_64-Test", commit: str = "abc") -> dict:
    return {
        "machine_info": {"node": worker, "cpu": {"hz_actual": [hash(worker), 0]},  # differs between readings
                         "fidelity_suite": {"machine_id": machine, "numerics": "production"}},
        "commit_info": {"id": commit, "dirty": False},
        "benchmarks": [{"fullname": n, "name": n.rpartition("::")[2], "stats": {"data": [1.0] * 5}} for n in names],
        "fidelity_suite_run": {"selected": 3, "finished": len(names), "interrupted": False},
        "fidelity_suite_shard": {"worker": worker, "results": [{"name": n, "worker": worker} for n in names],
                                 "finished": names, "baseline": None, "aggregate": None},
    }


def test_shards_merge_into_one_run_in_collection_order():
    order = ["t.py::a", "t.py::b", "t.py::c"]
    merged = merge_shards([("gw0", shard("gw0", ["t.py::c", "t.py::a"])), ("gw1", shard("gw1", ["t.py::b"]))], order)
    assert [b["fullname"] for b in merged.benchmarks] == order
    assert [r["name"] for r in merged.results] == order
    assert merged.selected == 3 and merged.finished == set(order) and not merged.interrupted
    assert merged.workers == ["gw0", "gw1"]
    assert merged.cut_short == 0


def test_a_benchmark_an_interrupt_cut_short_is_left_out_and_counted_at_the_controller():
    """pytest-benchmark adds an item's benchmark when its timing starts: one whose item never finished is left out
    of the saved run or the worker's shard, and the workers' counts add up at the controller."""
    from perf.session import finished_only

    whole, cut = types.SimpleNamespace(fullname="t.py::a"), types.SimpleNamespace(fullname="t.py::b")
    assert finished_only([whole, cut], {"t.py::a"}) == ([whole], 1)
    assert finished_only([whole], {"t.py::a", "t.py::c"}) == ([whole], 0)
    first, second = shard("gw0", ["t.py::a"]), shard("gw1", ["t.py::c"])
    first["fidelity_suite_shard"]["cut_short"] = 1
    second["fidelity_suite_shard"]["cut_short"] = 1
    assert merge_shards([("gw0", first), ("gw1", second)]).cut_short == 2


@pytest.mark.parametrize("second,message", [
    (shard("gw1", ["t.py::b"], machine="sm90-NVIDIA_H100_80GB_HBM3"), "different machines or stacks (machine_id"),
    (shard("gw1", ["t.py::b"], commit="def"), "ran different commits"),
    (shard("gw1", ["t.py::a"]), "t.py::a was measured by both gw0 and gw1"),
])
def test_shards_that_are_not_one_run_are_refused(second, message):
    with pytest.raises(ShardError, match=message.replace("(", r"\(").replace(".", r"\.")):
        merge_shards([("gw0", shard("gw0", ["t.py::a"])), ("gw1", second)])


def test_an_unreadable_shard_is_named(tmp_path):
    (tmp_path / "gw0.json").write_text(json.dumps(shard("gw0", ["t.py::a"])))
    (tmp_path / "gw1.json").write_text('{"benchmarks": [')  # cut off
    with pytest.raises(ShardError, match="the shard of gw1"):
        read_shards(tmp_path)


def test_workers_on_gpus_of_different_models_are_refused():
    assert refusal({"gw0": "sm90-NVIDIA_H100_80GB_HBM3", "gw1": "sm90-NVIDIA_H100_80GB_HBM3"}) is None
    message = refusal({"gw0": "sm90-NVIDIA_H100_80GB_HBM3", "gw1": "sm80-NVIDIA_A100_SXM4_80GB"})
    assert "gw0 sm90-NVIDIA_H100_80GB_HBM3, gw1 sm80-NVIDIA_A100_SXM4_80GB" in message and "--gpus" in message


def test_a_wait_for_a_device_held_elsewhere_is_said_and_ends_when_it_is_released(tmp_path):
    """Another process holds the CPU's timing lock: the waiting one says so on stderr, then times once it is free."""
    from filelock import FileLock

    import perf.timing as timing

    locks = tmp_path / "locks"
    locks.mkdir()
    env = dict(os.environ, **{timing.DEVICE_LOCKS_ENV: str(locks)})
    holder = FileLock(str(locks / f"{timing.device_key(timing.torch.device('cpu'))}.lock"))
    code = ("import perf.timing as t; t.LOCK_NOTE_AFTER_S = 0.2\n"
            "with t.device_lock('cpu') as hold: print('held', flush=True)")
    with holder:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        note = proc.stderr.readline()  # blocks until the waiting process speaks: the lock is still held here
        assert "note: waiting for" in note and "timing lock" in note, note
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.startswith("held"), err


def test_a_cpu_median_another_worker_wrote_is_read_a_missing_one_measured_and_added_and_another_kind_refused(
        tmp_path, monkeypatch):
    """The shared CPU FP32 baseline with a real CPU engine (tiny-bert): a median in the file is read, named with
    its worker, without the lock; a missing one is measured under the lock and added beside the others."""
    import perf.timing as timing
    from engines.factory import EngineFactory
    from engines.options import EngineSelection

    monkeypatch.setenv(timing.DEVICE_LOCKS_ENV, str(tmp_path / "locks"))
    shared = tmp_path / "cpu-baseline.json"
    shared.write_text(json.dumps({"schema": timing.CPU_BASELINE_SCHEMA_VERSION, "rounds": 1,
                                  "medians": {"tiny-bert b4 s64": {"median_s": 0.25, "worker": "gw1"}}}))
    factory = EngineFactory(EngineSelection.from_values(
        {"models": "tiny-bert", "device": "cpu", "engine_cache": str(tmp_path / "cache")}))
    cpu = timing.CpuBaseline(factory, rounds=1, shared=shared, worker="gw0")
    assert cpu.median_seconds("tiny-bert", (4, 64)) == 0.25 and cpu.measured_by("tiny-bert", (4, 64)) == "gw1"
    assert cpu.lock_hold("tiny-bert", (4, 64)) is None  # read, not waited for
    measured = cpu.median_seconds("tiny-bert", (1, 8))
    hold = cpu.lock_hold("tiny-bert", (1, 8))
    assert 0 < measured < 60 and cpu.measured_by("tiny-bert", (1, 8)) == "gw0"
    assert hold["key"].endswith("-cpu") and hold["requested"] <= hold["acquired"] <= hold["released"]
    assert cpu.lock_hold("tiny-bert", (1, 8)) is None  # given once: to the item whose ask took it
    assert cpu.medians() == {"tiny-bert b4 s64": 250.0, "tiny-bert b1 s8": measured * 1e3}
    cpu.close()
    on_file = json.loads(shared.read_text())["medians"]
    assert on_file == {"tiny-bert b4 s64": {"median_s": 0.25, "worker": "gw1"},
                       "tiny-bert b1 s8": {"median_s": measured, "worker": "gw0"}}
    other = timing.CpuBaseline(None, rounds=1, shared=shared, worker="gw1")  # no engine needed: both are there
    assert other.median_seconds("tiny-bert", (1, 8)) == measured and other.measured_by("tiny-bert", (1, 8)) == "gw0"
    disagreeing = timing.CpuBaseline(None, rounds=5, shared=shared, worker="gw1")  # workers of one run disagree
    with pytest.raises(ValueError, match="1 rounds, this run wants schema 1 and 5 rounds"):
        disagreeing.median_seconds("tiny-bert", (4, 64))


def test_a_cpu_median_in_the_shared_file_is_read_while_another_process_holds_the_cpu_lock(tmp_path, monkeypatch):
    """The read needs no lock (the file is replaced whole): a worker never waits on another's CPU timing for a
    median that is already there. The read runs in a thread; were it to wait for the lock, the thread would still
    be waiting when the holder is told to let go."""
    import threading

    import perf.timing as timing

    locks = tmp_path / "locks"
    monkeypatch.setenv(timing.DEVICE_LOCKS_ENV, str(locks))
    shared = tmp_path / "cpu-baseline.json"
    shared.write_text(json.dumps({"schema": timing.CPU_BASELINE_SCHEMA_VERSION, "rounds": 1,
                                  "medians": {"tiny-bert b4 s64": {"median_s": 0.25, "worker": "gw1"}}}))
    code = ("import sys; import perf.timing as t\n"
            "with t.device_lock('cpu'): print('held', flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, **{timing.DEVICE_LOCKS_ENV: str(locks)}),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got = []
        reader = threading.Thread(target=lambda: got.append(
            timing.CpuBaseline(None, rounds=1, shared=shared, worker="gw0").median_seconds("tiny-bert", (4, 64))),
            daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert got == [0.25], "the read waited for the CPU lock another process holds"
    finally:
        holder.communicate("\n", timeout=60)


def test_the_committed_two_gpu_benchmark_runs_are_what_their_readme_says():
    """docs/results/xdist-h100x2/perf: the benchmarks on two H100s in one process and under -n 2 (perf.sh)."""
    folder = ROOT / "docs" / "results" / "xdist-h100x2"
    for results in (folder / "perf", folder / "perf" / "before-shared-cpu", folder / "perf" / "no-cpu-baseline"):
        args = [sys.executable, str((folder / "analyse_perf.py").relative_to(ROOT)), str(results.relative_to(ROOT))]
        made = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert made == (results / "analysis.txt").read_text(), f"{results}/analysis.txt is stale: rerun {' '.join(args[1:])}"
    one, two = benchmarks(folder / "perf" / "serial.json"), benchmarks(folder / "perf" / "xdist.json")
    assert len(one) == 24 and set(one) == set(two)
    gpus = {}
    for info in (b["extra_info"] for b in two.values()):
        assert info["device"] == f"cuda:{info['gpu_index']}" and info["workers"] == 2, info
        gpus.setdefault(info["worker"], set()).add(info["gpu_index"])
    assert gpus == {"gw0": {0}, "gw1": {1}}  # each worker on its own GPU
    cpu_medians = {}
    for info in (b["extra_info"] for b in two.values()):
        cpu_medians.setdefault((info["engine"].split("/")[0], info["batch"], info["sequence"]), set()).add(
            (info["cpu_fp32_median_ms"], info["cpu_fp32_measured_by"]))
    assert all(len(values) == 1 for values in cpu_medians.values()), cpu_medians
    ratios = [two[name]["extra_info"]["median_ms"] / bench["extra_info"]["median_ms"] for name, bench in one.items()]
    cpu_ratios = {name: two[name]["extra_info"]["cpu_fp32_median_ms"] / bench["extra_info"]["cpu_fp32_median_ms"]
                  for name, bench in one.items()}
    times = dict(re.findall(r"^(\w+) rc=0 wall ([\d.]+) s", (folder / "perf" / "times.txt").read_text(), re.M))
    before = dict(re.findall(r"^(\w+) rc=0 wall ([\d.]+) s",
                             (folder / "perf" / "before-shared-cpu" / "times.txt").read_text(), re.M))
    analysis = (folder / "perf" / "analysis.txt").read_text()
    at_once = re.search(r"seconds the two GPUs timed at once: ([\d.]+)", analysis).group(1)
    readme = " ".join((folder / "README.md").read_text().split())
    main = " ".join((ROOT / "README.md").read_text().split())
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    assert f"{min(ratios):.3f}-{max(ratios):.3f}x of one process's (geometric mean {geomean:.3f})" in readme
    assert f"GPU medians within {min(ratios):.3f}-{max(ratios):.3f}x of one process's" in main
    assert f"{times['xdist']} s with `-n 2` against {times['serial']} s" in readme
    assert f"({times['xdist']} s against {times['serial']} s;" in main
    assert f"{min(cpu_ratios.values()):.2f}-{max(cpu_ratios.values()):.2f}x" in readme
    assert f"up to {max(cpu_ratios.values()):.2f}x one process's" in main
    assert f"timed at once for {at_once} s" in readme
    assert f"took {before['xdist']} s against the one process's {before['serial']} s" in readme
    alone = dict(re.findall(r"^(\w+) rc=0 wall ([\d.]+) s",
                            (folder / "perf" / "no-cpu-baseline" / "times.txt").read_text(), re.M))
    spans = re.findall(r"([\d.]+) s timed, from the first timing's start to the last's end ([\d.]+) s",
                       (folder / "perf" / "no-cpu-baseline" / "analysis.txt").read_text())
    assert f"{alone['serial']} s in one process, {alone['xdist']} s with `-n 2`" in readme
    assert f"without the CPU baseline {alone['xdist']} s against {alone['serial']} s" in main
    lowest, highest = re.search(r"lowest ([\d.]+), highest ([\d.]+)",
                                (folder / "perf" / "no-cpu-baseline" / "analysis.txt").read_text()).groups()
    assert f"GPU medians {lowest}-{highest}x of one process's" in readme
    at_once_alone = re.search(r"seconds the two GPUs timed at once: ([\d.]+)",
                              (folder / "perf" / "no-cpu-baseline" / "analysis.txt").read_text()).group(1)
    assert f"(the GPUs timed at once for {at_once_alone} s)" in readme
    assert (f"{spans[0][0]} s and {spans[1][0]} s of timed spans, which took {spans[0][1]} s from the first to the "
            f"last in one process and {spans[1][1]} s under `-n 2`") in readme
    first = [b["extra_info"] for b in benchmarks(folder / "perf" / "before-shared-cpu" / "xdist.json").values()
             if b["extra_info"]["engine"].startswith("gpt2/") and (b["extra_info"]["batch"], b["extra_info"]["sequence"]) == (1, 128)]
    by_worker = {info["worker"]: f"{info['cpu_fp32_median_ms']:.1f} ms" for info in first}
    assert f"gpt2 b1 s128: {by_worker['gw1']} from gw1, {by_worker['gw0']} from gw0" in readme
    assert "24 items `pass, pass`" in readme and "pass, pass: 24" in (folder / "perf" / "analysis.txt").read_text()
