"""The characterization sweep on the CPU: real runs of the tiny models over a small grid, resumed, interrupted, reported."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from perf.sweep import RESULTS_FILE, SWEEP_SCHEMA_VERSION, ResultStore
from perf.sweep_report import claims, flatten, read_csv, to_csv

ROOT = Path(__file__).resolve().parents[2]
SELECT = ["--models=tiny-bert", "--precisions=fp32,hybrid", "--sweep-grid=small", "--rounds=5", "--warmup=1",
          "--cpu-rounds=1"]


def sweep(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "perf.sweep", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    cache = tmp_path_factory.mktemp("cache")
    proc = sweep(f"--out={folder}", f"--engine-cache={cache}", *SELECT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    folder.joinpath("stderr.txt").write_text(proc.stderr)
    return folder, cache


def test_every_configuration_is_one_line_with_every_measurement(swept):
    folder, _ = swept
    records = lines(folder)
    assert len(records) == 2 * 4 and len({r["key"] for r in records}) == 8  # 2 precisions x 4 shapes
    for r in records:
        assert r["schema"] == 1 and r["status"] == "measured" and r["numerics"] == "production"
        assert r["rounds"] == 5 and r["p99_ms"] >= r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["cpu_fp32_rounds"] == 1 and r["speedup_over_cpu_fp32"] == pytest.approx(r["cpu_fp32_median_ms"] / r["median_ms"])
        assert r["fidelity"]["source"].startswith("python-docs packed") and r["fidelity"]["nan"] == 0
    run = json.loads((folder / "runs.jsonl").read_text().splitlines()[0])
    assert run["status"] == "complete" and run["measured"] == 8 and run["host"]["cpu_threads"] >= 1
    # The CPU baseline was measured first, once per shape, and the run's record keeps every median.
    assert run["cpu_fp32_median_ms"] == {f"tiny-bert b{r['batch']} s{r['sequence']}": r["cpu_fp32_median_ms"] for r in records}
    assert 0 <= run["cpu_baseline_seconds"] <= run["seconds"]
    progress = (folder / "stderr.txt").read_text()
    assert progress.rindex("CPU FP32 baseline: 100%") < progress.index("tiny-bert/torch/fp32")  # first, then engines


def test_a_rerun_measures_only_what_is_missing(swept):
    folder, cache = swept
    proc = sweep(f"--out={folder}", f"--engine-cache={cache}", *SELECT)
    assert proc.returncode == 0 and "8 already in" in proc.stdout and "measuring 0" in proc.stdout
    more = sweep(f"--out={folder}", f"--engine-cache={cache}", *SELECT, "--precisions=fp32,hybrid,fp16")
    assert more.returncode == 0 and "measuring 4" in more.stdout
    assert len(lines(folder)) == 12


def test_an_interrupted_sweep_keeps_its_lines_and_the_rerun_completes_it(tmp_path, swept):
    _, cache = swept
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    slow = [a for a in SELECT if not a.startswith("--rounds")] + ["--rounds=400"]  # seconds per configuration
    proc = subprocess.Popen([sys.executable, "-m", "perf.sweep", f"--out={tmp_path}", f"--engine-cache={cache}", *slow],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = tmp_path / "results.jsonl"
    import time

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-2000:]
    assert "sweep interrupted" in output and "run the same command again" in output
    kept = lines(tmp_path)
    assert 1 <= len(kept) < 8
    assert json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])["status"] == "interrupted"
    again = sweep(f"--out={tmp_path}", f"--engine-cache={cache}", *SELECT)
    assert again.returncode == 0 and f"{len(kept)} already in" in again.stdout
    final = lines(tmp_path)
    assert len(final) == 8 and len({r["key"] for r in final}) == 8  # nothing measured twice
    assert [r["key"] for r in final[: len(kept)]] == [r["key"] for r in kept]  # what was kept is untouched


def test_the_report_is_made_from_the_data(swept):
    folder, _ = swept
    proc = sweep("report", str(folder))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (folder / "report.md").read_text()
    rows = read_csv(folder / "sweep.csv")
    assert len(rows) == len(lines(folder))
    for claim, published, measured, verdict in claims(rows):  # regenerated from the CSV: the same table
        assert " ".join(f"| {claim} | {published} | {measured} | {verdict} |".split()) in " ".join(report.split())
    for name in ("latency_vs_batch_tiny-bert.png", "speedup_over_cpu.png", "precision_latency_ratios.png",
                 "fidelity_heatmap.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Not like for like" in report


@pytest.mark.parametrize("folder", ["docs/results/sweep-h100/smoke", "docs/results/sweep-h100/full",
                                    "docs/results/sweep-h100/warm"])
def test_a_committed_gpu_report_is_what_its_committed_data_gives(folder):
    folder = ROOT / folder
    assert (folder / "sweep.csv").read_text() == to_csv([flatten(r) for r in ResultStore(folder).records()])
    report = " ".join((folder / "report.md").read_text().split())
    for claim, published, measured, verdict in claims(read_csv(folder / "sweep.csv")):
        assert " ".join(f"| {claim} | {published} | {measured} | {verdict} |".split()) in report


@pytest.mark.parametrize("args,message", [([], "--out DIR is required"), (["--models=llama"], "unknown model 'llama'")])
def test_bad_arguments_are_usage_errors(tmp_path, args, message):
    proc = sweep(*args, *([f"--out={tmp_path}"] if args else []), timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_an_out_folder_that_cannot_be_created_is_refused_before_anything_is_measured(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = sweep(f"--out={blocker / 'sweep'}", "--models=tiny-bert", "--precisions=fp32", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--out {blocker / 'sweep'} cannot be created under {blocker}" in proc.stderr
    assert "sweep:" not in proc.stdout  # nothing started


def test_an_unwritable_device_lock_folder_is_a_usage_error_before_anything_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = dict(os.environ, HF_HUB_OFFLINE="1", FIDELITY_DEVICE_LOCKS=str(blocker / "locks"))
    proc = subprocess.run([sys.executable, "-m", "perf.sweep", f"--out={tmp_path / 'out'}", *SELECT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "FIDELITY_DEVICE_LOCKS" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_results_file_of_another_schema_is_refused_at_start_up(tmp_path):
    (tmp_path / RESULTS_FILE).write_text(json.dumps({"schema": SWEEP_SCHEMA_VERSION + 1, "key": "x"}) + "\n")
    proc = sweep(f"--out={tmp_path}", "--models=tiny-bert", "--precisions=fp32", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"holds schema {SWEEP_SCHEMA_VERSION + 1} lines" in proc.stderr and "use another --out" in proc.stderr
    assert "sweep:" not in proc.stdout


def test_a_crash_is_recorded_as_failed_with_its_error_not_as_complete(tmp_path, monkeypatch):
    from perf.sweep import parse_run

    sweep_run, command = parse_run([f"--out={tmp_path}", f"--engine-cache={tmp_path / 'cache'}", "--models=tiny-bert",
                                    "--precisions=fp32", "--sweep-grid=small", "--no-cpu-baseline", "--no-fidelity"])

    def crash(runner, shape):
        raise RuntimeError("an engine bug\nsecond line")

    monkeypatch.setattr(sweep_run, "measure", crash)
    with pytest.raises(RuntimeError, match="an engine bug"):
        sweep_run.run(command=command)
    run = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])
    assert run["status"] == "failed" and run["error"] == "RuntimeError: an engine bug" and run["measured"] == 0
