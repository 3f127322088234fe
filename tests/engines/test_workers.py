"""pytest-xdist: workers pinned to their GPU, one engine per worker, --rebuild-engines once per session, one merged report."""

import collections
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from engines.options import EngineSelection, OptionError
from engines.workers import engine_scope, parse_gpus, pinned_device

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("device,worker,gpus,expected", [
    ("cuda", "gw0", [0, 1], "cuda:0"),
    ("cuda", "gw3", [0, 1], "cuda:1"),
    ("cuda", "gw1", [2, 5], "cuda:5"),
    ("cuda:1", "gw0", [0, 1], "cuda:1"),  # one GPU named: every worker there
    ("cuda", None, [0, 1], "cuda"),  # the controller, or no xdist
    ("cpu", "gw1", [], "cpu"),
])
def test_each_worker_gets_its_own_gpu(device, worker, gpus, expected):
    assert pinned_device(device, worker, gpus) == expected


@pytest.mark.parametrize("nodeid,scope", [
    ("fidelity/test_fidelity.py::test_natural_text[tiny-bert/onnxrt/fp16]", "tiny-bert/onnxrt/fp16"),
    ("perf/test_latency.py::test_latency[b32s512-bert-base/torch-cudagraph/hybrid]", "bert-base/torch-cudagraph/hybrid"),
    ("perf/test_latency.py::test_suite_aggregate", "perf/test_latency.py::test_suite_aggregate"),
    ("tests/x.py::test_y[a-b]", "tests/x.py::test_y[a-b]"),
])
def test_the_unit_of_work_is_the_engine(nodeid, scope):
    assert engine_scope(nodeid) == scope


def test_gpu_lists_are_checked_against_what_is_visible():
    assert parse_gpus(None, 2) == [0, 1] and parse_gpus("1", 2) == [1]
    for bad in ("2", "0,0", "a", ","):
        with pytest.raises(ValueError, match="--gpus"):
            parse_gpus(bad, 2)


def test_gpus_without_cuda_is_a_usage_error():
    with pytest.raises(OptionError, match="--gpus 0 needs --device cuda"):
        EngineSelection.from_values({"models": "tiny-bert", "device": "cpu", "gpus": "0"})


def rows(report: Path) -> dict[tuple, dict]:
    data = json.loads(report.read_text())
    return {(r["model"], r["backend"], r["precision"], r["input_source"]): r for r in data["rows"]}


def test_two_workers_give_a_serial_runs_rows_build_each_engine_once_and_rebuild_each_entry_once(tmp_path):
    cache, serial_report, report = tmp_path / "cache", tmp_path / "serial.json", tmp_path / "xdist.json"
    select = ["-m", "fidelity", "fidelity", "--models=tiny-bert", "--backends=onnxrt", "--precisions=fp32,hybrid,fp16",
              "--input-profile=ci", f"--engine-cache={cache}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *select,
                            f"--fidelity-report={serial_report}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-v", *select,
                           "--rebuild-engines", f"--fidelity-report={report}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # One report and one summary, with every row of the serial run and the same numbers.
    assert "fidelity summary" in proc.stdout and "2 workers" in proc.stdout
    one, two = rows(serial_report), rows(report)
    assert len(one) == 3 * 3 and set(one) == set(two)  # precisions x input sources
    for key, row in one.items():
        for field in ("samples", "batches", "min_cosine", "mean_cosine", "max_abs_err", "nan_count", "verdict"):
            assert two[key][field] == row[field], (key, field)
    merged = json.loads(report.read_text())
    assert len(merged["engines"]) == len(json.loads(serial_report.read_text())["engines"])
    assert sorted(merged["engine_cache"]["workers"]) == ["xdist.json.gw0.part", "xdist.json.gw1.part"]
    # One engine cache line for the workers together, in the report and printed (it said "unused" on the controller).
    summary = merged["engine_cache"]["summary"]
    assert "over 2 workers" in summary and "unused" not in summary and summary in proc.stdout
    assert not list(tmp_path.glob("*.part"))  # the shards are merged and gone
    # Engines on the CPU: each worker keeps the machine's CPU threads (they are part of its numerics: see above).
    threads = json.loads(serial_report.read_text())["environment"]["cpu_threads"]
    assert merged["environment"]["workers"] == {f"gw{i}": {"device": "cpu", "cpu_threads": threads} for i in range(2)}
    # Each engine on one worker.
    workers = collections.defaultdict(set)
    for worker, engine in re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED \S+\[(tiny-bert/onnxrt/\w+)\]", proc.stdout):
        workers[engine].add(worker)
    assert set(workers) == {"tiny-bert/onnxrt/fp32", "tiny-bert/onnxrt/hybrid", "tiny-bert/onnxrt/fp16"}, proc.stdout[-3000:]
    assert all(len(w) == 1 for w in workers.values()), workers
    # --rebuild-engines: every entry once in the session, the shared FP32 export too, not once per worker.
    events = merged["engine_cache"]["events"]
    forced = collections.Counter(e["key"] for e in events if e["outcome"] == "rebuilt-forced")
    assert forced and set(forced.values()) == {1}, forced
    assert {e["key"] for e in events} == set(forced)


def test_engines_are_handed_out_slow_builds_first_in_turn_by_model_and_other_tests_after_them():
    from engines.workers import work_order

    scopes = ["bert-base/torch/fp32", "bert-base/torch-cudagraph/fp16", "bert-base/onnx-torch/fp32",
              "bert-base/onnx-torch/fp16", "gpt2/torch/fp32", "gpt2/onnx-torch/fp32", "gpt2/torch-compile/hybrid",
              "minilm/torch/fp32", "tests/engines/test_x.py::test_y"]
    assert work_order(scopes) == [
        "bert-base/onnx-torch/fp32", "gpt2/onnx-torch/fp32", "bert-base/onnx-torch/fp16", "gpt2/torch-compile/hybrid",
        "bert-base/torch/fp32", "gpt2/torch/fp32", "minilm/torch/fp32", "bert-base/torch-cudagraph/fp16",
        "tests/engines/test_x.py::test_y"]
    assert sorted(work_order(scopes)) == sorted(scopes)


def test_a_worker_keeps_to_its_models_while_it_has_work_of_the_kind_at_hand():
    from engines.workers import next_unit

    queue = ["bert-base/onnx-torch/hybrid", "gpt2/onnx-torch/hybrid", "minilm/onnx-torch/fp32", "bert-base/torch/fp32"]
    assert next_unit(queue, set(), set()) == "bert-base/onnx-torch/hybrid"  # the first, to whoever asks
    assert next_unit(queue, {"gpt2"}, {"bert-base"}) == "gpt2/onnx-torch/hybrid"  # its own, not the other's model
    assert next_unit(queue, {"bert-base"}, {"gpt2"}) == "bert-base/onnx-torch/hybrid"
    assert next_unit(queue[2:], {"gpt2"}, {"bert-base"}) == "minilm/onnx-torch/fp32"  # held by no one: taken as is
    # Nothing of its own of that kind: the other's model rather than a quick engine out of order.
    assert next_unit(["bert-base/onnx-torch/fp16", "gpt2/torch/fp32"], {"gpt2"}, {"bert-base"}) == "bert-base/onnx-torch/fp16"
    assert next_unit(["tests/x.py::test_y", "gpt2/torch/fp32"], {"gpt2"}, set()) == "tests/x.py::test_y"


def test_the_committed_two_gpu_nightly_run_has_one_processs_rows_and_the_times_the_readme_gives():
    folder = ROOT / "docs" / "results" / "xdist-h100x2"
    serial = rows(folder / "nightly" / "serial.json")
    assert len(serial) == 315
    same_host = folder / "nightly" / "same-host"
    for xdist in (rows(folder / "nightly" / "xdist.json"), rows(folder / "nightly" / "work-order" / "xdist.json"),
                  rows(same_host / "serial.json"), rows(same_host / "xdist.json")):
        assert set(serial) == set(xdist)
        for key, row in serial.items():
            for field in ("samples", "min_cosine", "mean_cosine", "max_abs_err", "nan_count", "inf_count", "verdict"):
                assert xdist[key][field] == row[field], (key, field)
    devices = collections.Counter(row["device"] for row in json.loads((folder / "nightly" / "xdist.json").read_text())["rows"])
    assert set(devices) == {"cuda:0", "cuda:1"}
    times = dict(re.findall(r"^(\w+) rc=0 wall ([\d.]+) s", (folder / "nightly" / "times.txt").read_text(), re.M))
    readme = (folder / "README.md").read_text()
    assert f"| {times['serial']} s |" in readme and f"| {times['xdist']} s |" in readme
    assert f"Speedup {float(times['serial']) / float(times['xdist']):.2f}x" in readme
    # The committed analyses are what analyse.py makes of the committed runs.
    for run, serial_folder in ((folder / "nightly", None), (folder / "nightly" / "work-order", folder / "nightly"),
                               (same_host, None)):
        args = [sys.executable, *(str(path.relative_to(ROOT)) for path in (folder / "analyse.py", run))]
        args += [] if serial_folder is None else ["--serial", str(serial_folder.relative_to(ROOT))]
        made = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert made == (run / "analysis.txt").read_text(), f"{run}/analysis.txt is stale: rerun {' '.join(args[1:])}"
    # The like-for-like run (one host): its times, speedup and rows per device as the README gives them.
    one_host = dict(re.findall(r"^(\w+) rc=0 wall ([\d.]+) s", (same_host / "times.txt").read_text(), re.M))
    speedup = float(one_host["serial"]) / float(one_host["xdist"])
    assert f"| {one_host['serial']} s |" in readme and f"| {one_host['xdist']} s |" in readme
    assert f"**Speedup {speedup:.2f}x on one host" in readme and speedup >= 1.8
    devices = collections.Counter(row["device"] for row in json.loads((same_host / "xdist.json").read_text())["rows"])
    assert f"`cuda:0`: {devices['cuda:0']}, `cuda:1`: {devices['cuda:1']} |" in readme
    main = " ".join((ROOT / "README.md").read_text().split())
    assert f"took {one_host['xdist']} s with `-n 2` against {one_host['serial']} s in one process: **{speedup:.2f}x**" in main
    alone = re.search(r"^xdist rc=0 wall ([\d.]+) s", (folder / "nightly" / "work-order" / "times.txt").read_text(), re.M)
    assert f"**{alone.group(1)} s**" in readme and f"{float(times['serial']) / float(alone.group(1)):.2f}x" in readme


def test_a_worker_on_a_gpu_takes_its_share_of_the_cpu_threads_and_cpu_engines_the_machines(monkeypatch):
    import onnxruntime as ort
    import torch

    from engines import workers

    assert [workers.thread_share(16, 2), workers.thread_share(2, 2), workers.thread_share(1, 4)] == [8, 1, 1]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(workers, "_threads_before_share", None)  # this process took no share (also under -n)
    worker = types.SimpleNamespace(workerinput={"workerid": "gw1", "workercount": 2})  # what xdist gives a worker
    assert workers.share_cpu_threads(worker, "cpu") is None  # CPU engines: the threads are part of their numerics
    assert workers.share_cpu_threads(types.SimpleNamespace(), "cuda") is None  # one process, or the controller
    assert workers.onnxruntime_session_options(ort).intra_op_num_threads == 0  # onnxruntime's default
    before = torch.get_num_threads()
    try:
        assert workers.share_cpu_threads(worker, "cuda:1") == workers.thread_share(before, 2) == torch.get_num_threads()
        torch.set_num_threads(before)
        monkeypatch.setattr(workers, "_threads_before_share", before + 1)  # as on a worker whose machine has one more
        assert workers.onnxruntime_session_options(ort).intra_op_num_threads == before
        assert workers.onnxruntime_session_options(ort, cpu_engine=True).intra_op_num_threads == 0
        with workers.all_cpu_threads():
            assert torch.get_num_threads() == before + 1
        assert torch.get_num_threads() == before
        # OMP_NUM_THREADS set: that is the share, torch's count untouched, and onnxruntime's sessions follow it.
        monkeypatch.setattr(workers, "_threads_before_share", None)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
        torch.set_num_threads(before)
        assert workers.share_cpu_threads(worker, "cuda") == before == torch.get_num_threads()
        assert workers.onnxruntime_session_options(ort).intra_op_num_threads == before
    finally:
        torch.set_num_threads(before)
