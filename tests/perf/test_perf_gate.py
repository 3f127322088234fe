"""The latency gate end to end on the CPU: save a baseline, compare, and catch a slowed engine."""

import json
import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SELECT = ["-m", "perf", "perf", "--models", "tiny-bert", "--precisions", "fp32,hybrid", "--backends", "torch",
          "--perf-rounds", "12", "--perf-warmup", "3", "--no-cpu-baseline", "-p", "no:cacheprovider"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pytest", *SELECT, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    storage = tmp_path_factory.mktemp("baselines") / "cpu-machine"
    proc = run(f"--benchmark-storage=file://{storage}", "--benchmark-save=baseline")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    files = list(storage.rglob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["machine_info"]["fidelity_suite"]["machine_id"].startswith("cpu-")
    assert all(len(b["stats"]["data"]) == 12 for b in data["benchmarks"])  # every round kept for the gate
    assert {b["extra_info"]["engine"] for b in data["benchmarks"]} == {"tiny-bert/torch/fp32", "tiny-bert/torch/hybrid"}
    # the untimed first call (compilation, capture) is kept apart from the rounds
    assert all(b["extra_info"]["first_call_s"] > 0 for b in data["benchmarks"])
    assert all(b["extra_info"]["device_used_bytes_nvml"] is None for b in data["benchmarks"])  # CPU: no NVML
    return storage


@pytest.mark.slow
def test_same_stack_passes_and_a_slowed_engine_fails_its_own_items(saved, tmp_path):
    same = run(f"--benchmark-storage=file://{saved}", "--benchmark-compare", "--perf-threshold=2")
    assert same.returncode == 0, same.stdout[-3000:]
    assert "baseline:" in same.stdout

    junit = tmp_path / "junit.xml"
    # A 200% threshold: on a 2-core CI machine the untouched eager engines moved
    # by more than 50% between two processes (FP16 matmuls on the CPU are slow and
    # contended), which is noise here, not a regression.  The 60 ms added to a
    # 2-11 ms call is a >6x slowdown either way.  The default 10% is exercised on
    # the H100 (docs/results/perf-h100-compile) and in test_perf_stats.py.
    slowed = run(
        f"--benchmark-storage=file://{saved}", "--benchmark-compare", "--perf-threshold=2",
        "--perf-slow-engine", "tiny-bert/torch/hybrid=60", f"--junitxml={junit}",
    )
    assert slowed.returncode == 1, slowed.stdout[-3000:]
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    failed = {name for name, case in cases.items() if case.find("failure") is not None}
    assert failed and all("tiny-bert/torch/hybrid" in name for name in failed), slowed.stdout[-3000:]
    assert len(failed) == 2  # both shapes of the slowed engine, nothing else
    message = next(iter(failed_case.find("failure").get("message") for n, failed_case in cases.items() if n in failed))
    assert "x slower (median" in message and "p=" in message


@pytest.mark.slow
def test_no_baseline_runs_and_says_how_to_save_one(tmp_path):
    empty = tmp_path / "none"
    proc = run(f"--benchmark-storage=file://{empty}", "--benchmark-compare")
    assert proc.returncode == 0
    assert "no baseline for machine" in proc.stdout and "--benchmark-save=baseline" in proc.stdout
    strict = run(f"--benchmark-storage=file://{empty}", "--benchmark-compare", "--require-baseline")
    assert strict.returncode == 4 and "no baseline for machine" in strict.stderr


@pytest.mark.slow
def test_baseline_from_another_architecture_is_refused(saved, tmp_path):
    foreign = tmp_path / "foreign"
    for file in saved.rglob("*.json"):
        data = json.loads(file.read_text())
        data["machine_info"]["fidelity_suite"]["machine_id"] = "sm80-NVIDIA_A100_SXM4_80GB"
        target = foreign / file.relative_to(saved)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data))
    proc = run(f"--benchmark-storage=file://{foreign}", "--benchmark-compare")
    assert proc.returncode == 4
    assert "recorded for machine_id 'sm80-NVIDIA_A100_SXM4_80GB'" in proc.stderr and "it is not compared" in proc.stderr


@pytest.mark.slow
def test_an_interrupted_save_keeps_what_it_measured_and_is_not_the_default_baseline(saved, tmp_path):
    storage = tmp_path / "storage"
    shutil.copytree(saved, storage)
    (earlier,) = storage.rglob("0001_*.json")
    earlier_bytes = earlier.read_bytes()
    # 300 ms per call makes each item last seconds: Ctrl-C lands in the second one.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *SELECT, "-v", f"--benchmark-storage=file://{storage}",
         "--benchmark-save=nightly", "--perf-slow-engine", "*=300"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if "PASSED" in line:
            proc.send_signal(signal.SIGINT)
            break
    output.extend(proc.stdout)
    assert proc.wait(timeout=300) == 2, "".join(output)[-3000:]  # pytest's "interrupted"

    assert earlier.read_bytes() == earlier_bytes
    (partial,) = storage.rglob("0002_nightly.json")
    data = json.loads(partial.read_text())
    run_record = data["fidelity_suite_run"]
    assert run_record["interrupted"] and not run_record["complete"]
    assert run_record["selected"] == 4 and 1 <= run_record["finished"] < 4
    assert len(data["benchmarks"]) >= 1  # what was measured before Ctrl-C is kept

    default = run(f"--benchmark-storage=file://{storage}", "--benchmark-compare", "--perf-threshold=2")
    assert default.returncode == 0, default.stdout[-3000:]
    assert "passed over 0002_nightly.json: interrupted after" in default.stdout
    assert "0001_baseline.json" in default.stdout.split("latency gate", 1)[1].splitlines()[2]

    named = run(f"--benchmark-storage=file://{storage}", "--benchmark-compare=0002", "--perf-threshold=2")
    assert named.returncode == 0, named.stdout[-3000:]
    summary = named.stdout.split("latency gate", 1)[1]
    assert "0002_nightly.json" in summary.splitlines()[1]
    assert "not in baseline 0002_nightly.json" in summary  # the items it never measured


def test_memory_cap_needs_a_gpu():
    proc = run("--perf-memory-cap-gib", "4", "--device", "cpu")
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]  # a usage error, before any test
    assert "--perf-memory-cap-gib caps GPU memory" in proc.stderr


@pytest.mark.parametrize("flag", ["--benchmark-compare", "--benchmark-save=x", "--benchmark-autosave"])
def test_benchmark_flags_select_the_benchmarks(flag):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    plain = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "perf"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "test_latency[" not in plain.stdout  # a plain `pytest` leaves them out (addopts: -m "not perf")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "perf", flag],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "test_latency[" in proc.stdout
    explicit = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "perf", flag,
                               "-m", "fidelity"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "test_latency[" not in explicit.stdout  # an explicit -m is the user's choice
