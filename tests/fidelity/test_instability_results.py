"""The committed H100 instability results: the summary is what the generator makes of the committed JSON, and the
stress weights they were measured on are the recipes in the code now."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engines.stress import RECIPES
from fidelity.instability_report import summarize

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "instability-h100"


def test_the_committed_summary_is_generated_from_the_committed_json():
    assert (RESULTS / "summary.md").read_text() == summarize(RESULTS)


def test_the_stress_runs_carry_the_labels_of_the_recipes_in_the_code():
    for model, recipe in RECIPES.items():
        rates = json.loads((RESULTS / f"{model}-stress" / "nan_rates.json").read_text())
        assert {r["weights"] for r in rates if "weights" in r} == {recipe.label(0)}, (
            f"{model}: the committed results were measured on other stress weights; rerun run.sh or bump STRESS_VERSION")


def test_each_found_stress_policy_passed_the_fidelity_tests_on_torch_and_onnx_torch():
    for model in RECIPES:
        report = json.loads((RESULTS / f"{model}-stress" / "fidelity-found-policy.json").read_text())
        found = [r for r in report["rows"] if r["precision"].endswith("-minimal-fp32")]
        assert {r["backend"] for r in found} == {"torch", "onnx-torch"}
        assert found and all(r["verdict"] == "PASS" and r["device"].startswith("cuda") for r in found)
        policy = RESULTS / f"{model}-stress" / "search" / "policy.json"
        ran = report["options"]["policies"][json.loads(policy.read_text())["name"]]
        assert ran["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()  # the file that ran is the one committed
