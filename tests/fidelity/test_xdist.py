"""pytest-xdist: the workers' fidelity rows merged into one report and one summary, as a serial run writes them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SELECT = ["-m", "fidelity", "fidelity", "--models=tiny-bert", "--backends=torch,onnxrt",
          "--precisions=fp32,hybrid", "--input-profile=ci"]


def run(report: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *SELECT, f"--engine-cache={cache}",
                           f"--fidelity-report={report}", *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def rows(report: Path) -> dict[tuple, dict]:
    data = json.loads(report.read_text())
    return {(r["model"], r["backend"], r["precision"], r["input_source"]): r for r in data["rows"]}


def test_two_workers_write_every_row_of_a_serial_run_and_print_the_summary(tmp_path):
    cache = tmp_path / "cache"
    serial = run(tmp_path / "serial.json", cache)
    assert serial.returncode == 0, serial.stdout[-3000:]
    parallel = run(tmp_path / "xdist.json", cache, "-n", "2")
    assert parallel.returncode == 0, parallel.stdout[-3000:]
    assert "fidelity summary" in parallel.stdout and "2 workers" in parallel.stdout
    one, two = rows(tmp_path / "serial.json"), rows(tmp_path / "xdist.json")
    assert len(one) == 2 * 2 * 3 and set(one) == set(two)  # backends x precisions x input sources
    for key, row in one.items():
        for field in ("samples", "batches", "min_cosine", "mean_cosine", "max_abs_err", "nan_count", "verdict"):
            assert two[key][field] == row[field], (key, field)
    merged = json.loads((tmp_path / "xdist.json").read_text())
    assert len(merged["engines"]) == len(json.loads((tmp_path / "serial.json").read_text())["engines"])
    assert sorted(merged["engine_cache"]["workers"]) == ["xdist.json.gw0.part", "xdist.json.gw1.part"]
    assert not list(tmp_path.glob("*.part"))  # the shards are merged and gone
