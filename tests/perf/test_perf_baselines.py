"""Which stored run a compare uses: the newest complete one, or the one named."""

import json
from pathlib import Path

import pytest

from perf.baselines import (
    RUN_RECORD_KEY,
    Baseline,
    BaselineMismatchError,
    BaselineSelectionError,
    check_compatible,
    select_baseline,
)

PLATFORM = "Linux-CPython-3.12-64bit"


def store(folder: Path, name: str, record: dict | None, *, facts: dict | None = None, **fields) -> Path:
    """A stored run as pytest-benchmark writes it (no benchmarks needed for choosing one).

    ``facts``: this suite's machine facts; ``fields``: more top-level keys (benchmarks, the suite's options).
    """
    path = folder / PLATFORM / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine_info": {}, "commit_info": {}, "benchmarks": [], "datetime": "2026-11-25T00:00:00", "version": "5.2.3"}
    if record is not None:
        data[RUN_RECORD_KEY] = record
    if facts is not None:
        data["machine_info"]["fidelity_suite"] = facts
    data.update(fields)
    path.write_text(json.dumps(data))
    return path


def record(finished: int, selected: int = 40, *, interrupted: bool = False) -> dict:
    return {"schema": 1, "selected": selected, "finished": finished, "interrupted": interrupted,
            "complete": not interrupted and finished >= selected}


def test_the_newest_complete_run_is_compared_and_newer_partial_ones_are_named(tmp_path):
    old = store(tmp_path, "0001_baseline.json", None)  # saved before run records: complete
    full = store(tmp_path, "0002_baseline.json", record(40))
    store(tmp_path, "0003_nightly.json", record(12, interrupted=True))
    store(tmp_path, "0004_nightly.json", record(30))  # stopped early (-x), not interrupted
    path, notes = select_baseline(tmp_path, True)
    assert path == full and path != old
    assert notes == [
        (
            "passed over 0004_nightly.json: stopped early after 30 of 40 configurations; "
            "to compare with it anyway: --benchmark-compare=0004"
        ),
        (
            "passed over 0003_nightly.json: interrupted after 12 of 40 configurations; "
            "to compare with it anyway: --benchmark-compare=0003"
        ),
    ]


def test_only_partial_runs_means_no_baseline(tmp_path):
    store(tmp_path, "0001_baseline.json", record(3, interrupted=True))
    path, notes = select_baseline(tmp_path, True)
    assert path is None and len(notes) == 1
    assert select_baseline(tmp_path / "absent", True) == (None, [])


def test_a_named_run_is_used_complete_or_not(tmp_path):
    store(tmp_path, "0001_baseline.json", record(40))
    partial = store(tmp_path, "0002_nightly.json", record(12, interrupted=True))
    for spec in ("0002", "0002_nightly", f"{PLATFORM}/0002", "*/0002", str(partial)):
        assert select_baseline(tmp_path, spec) == (partial, []), spec


@pytest.mark.parametrize("spec,problem", [("0009", "matches no stored run"), ("00", "matches 2 stored runs")])
def test_a_name_that_picks_no_single_run_is_an_error_listing_the_runs(tmp_path, spec, problem):
    store(tmp_path, "0001_baseline.json", None)
    store(tmp_path, "0002_baseline.json", None)
    with pytest.raises(BaselineSelectionError) as exc:
        select_baseline(tmp_path, spec)
    message = str(exc.value)
    assert problem in message
    assert f"{PLATFORM}/0001_baseline.json, {PLATFORM}/0002_baseline.json" in message
    assert "--benchmark-compare=0002" in message


FACTS = {"schema": 2, "machine_id": "sm90-NVIDIA_H100_80GB_HBM3", "numerics": "production", "torch": "2.11.0+cu130",
         "tensorrt": None, "onnxruntime": None}


def test_installing_tensorrt_does_not_void_a_baseline_of_torch_engines():
    check_compatible(FACTS, dict(FACTS, tensorrt="10.13.0"), source=Path("b.json"), backends={"torch-compile"})


@pytest.mark.parametrize(
    "backends,change,refused",
    [
        ({"trt", "torch-cudagraph"}, {"tensorrt": "11.0.1"}, "tensorrt major version '10.13.0' (here '11.0.1')"),
        ({"torch-compile"}, {"torch": "3.0.0"}, "torch major version '2.11.0+cu130' (here '3.0.0')"),
        ({"onnxrt"}, {"onnxruntime": None}, "onnxruntime major version '1.23.0' (here None)"),
        ({"torch"}, {"machine_id": "sm80-NVIDIA_A100_SXM4_80GB"}, "machine_id 'sm90-NVIDIA_H100_80GB_HBM3'"),
        ({"torch"}, {"numerics": "deterministic"}, "numerics 'production' (here 'deterministic')"),
    ],
)
def test_another_major_version_of_a_runtime_the_baseline_ran_on_is_refused(backends, change, refused):
    baseline = dict(FACTS, tensorrt="10.13.0", onnxruntime="1.23.0")
    check_compatible(baseline, dict(baseline, tensorrt="10.14.1", torch="2.13.0"), source=Path("b.json"), backends=backends)
    with pytest.raises(BaselineMismatchError) as exc:
        check_compatible(baseline, dict(baseline, **change), source=Path("b.json"), backends=backends)
    assert refused in str(exc.value) and "it is not compared" in str(exc.value)


def test_a_stored_run_knows_its_backends(tmp_path):
    benchmarks = [
        {"fullname": f"perf/test_latency.py::test_latency[b1s128-{engine}]", "extra_info": {"engine": engine}, "stats": {}}
        for engine in ("bert-base/trt/hybrid", "gpt2/torch-compile/fp16")
    ]
    path = store(tmp_path, "0001_baseline.json", None, facts=FACTS, benchmarks=benchmarks)
    assert Baseline(path).backends == {"trt", "torch-compile"}


def test_a_baseline_saved_before_numerics_were_recorded_counts_as_deterministic():
    old = {k: v for k, v in FACTS.items() if k not in ("schema", "numerics")}  # schema 1: the H100's 0001-0004
    check_compatible(old, dict(FACTS, numerics="deterministic"), source=Path("b.json"), backends={"torch"})
    with pytest.raises(BaselineMismatchError, match="numerics 'deterministic' \\(here 'production'\\)"):
        check_compatible(old, FACTS, source=Path("b.json"), backends={"torch"})


def test_a_damaged_run_is_passed_over_and_refused_when_named(tmp_path):
    good = store(tmp_path, "0001_baseline.json", record(40))
    damaged = tmp_path / PLATFORM / "0002_baseline.json"
    damaged.write_text('{"machine_info": {"fidelity_suite"')  # truncated mid-write
    path, notes = select_baseline(tmp_path, True)
    assert path == good and "passed over 0002_baseline.json: its JSON does not read" in notes[0]
    with pytest.raises(BaselineMismatchError, match="is not a readable saved run"):
        Baseline(damaged)


def test_a_run_saved_with_an_injected_slowdown_is_not_a_baseline(tmp_path):
    options = {"slowdowns": [{"pattern": "*", "delay_s": 0.0, "factor": 1.08}]}
    path = store(tmp_path, "0001_gate_test.json", record(40), facts=FACTS, fidelity_suite_options=options)
    with pytest.raises(BaselineMismatchError, match="saved with an injected slowdown"):
        Baseline(path)


def test_a_policy_file_that_changed_under_its_name_voids_the_baseline(tmp_path):
    options = {"engines": {"policies": {"keep": {"sha256": "a" * 64}}}}
    path = store(tmp_path, "0001_baseline.json", record(40), facts=FACTS, fidelity_suite_options=options)
    baseline = Baseline(path)
    baseline.check_policies({"keep": {"sha256": "a" * 64}, "other": {"sha256": "c" * 64}})
    with pytest.raises(BaselineMismatchError, match="policy file\\(s\\) keep .* changed since it was saved"):
        baseline.check_policies({"keep": {"sha256": "b" * 64}})
