import json
import re

import pytest
import torch

from engines.batch import TokenBatch
from fidelity.metrics import CompareContext, compare_outputs, tolerance_for
from fidelity.report import REPORT_SCHEMA_VERSION, FidelityReport, render_markdown


def result(precision="hybrid", nan=False):
    ref = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    out = ref.clone()
    if nan:
        out[1, 1, 1] = float("nan")
    ids = torch.zeros(2, 3, dtype=torch.int64)
    ctx = CompareContext("tiny-bert", "torch", precision, "cpu", "hypothesis", "wordpiece", "random-init(seed=0)")
    return compare_outputs(out, ref, TokenBatch(ids, torch.ones_like(ids)), ctx, tolerance_for(precision))


def test_report_rows_aggregate_and_json_round_trips(tmp_path):
    path = tmp_path / "out" / "report.json"
    report = FidelityReport(command="pytest -m fidelity", environment={"torch": "x", "transformers": "y", "python": "3", "device": "cpu"}, options={"profile": "ci", "gate_precisions": ["hybrid"]}, path=path)
    report.record(result(), input_kind="hypothesis", gated=True)
    report.record(result(), input_kind="hypothesis", gated=True)
    report.record(result("fp16", nan=True), input_kind="hypothesis", gated=False)
    report.add_note("WikiText-2 not available")
    report.write()
    data = json.loads(path.read_text())
    assert data["schema_version"] == REPORT_SCHEMA_VERSION
    rows = {r["precision"]: r for r in data["rows"]}
    assert rows["hybrid"]["batches"] == 2 and rows["hybrid"]["samples"] == 4 and rows["hybrid"]["verdict"] == "PASS"
    assert rows["fp16"]["nan_count"] == 1 and rows["fp16"]["nonfinite_rate"] == 0.5
    assert rows["fp16"]["verdict"] == "measured (below bar)"
    table = report.table()
    assert "tiny-bert" in table and "PASS" in table and "note: WikiText-2 not available" in table
    markdown = render_markdown(data)
    assert "| tiny-bert | torch | | hybrid | random-init | 4/0 |" in re.sub(" +", " ", markdown)
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind
    assert data["interrupted"] is False


def test_an_interrupted_run_says_so_and_its_unfinished_rows_are_partial(tmp_path):
    path = tmp_path / "report.json"
    report = FidelityReport(command="pytest", environment={}, options={"profile": "ci", "gate_precisions": ["hybrid"]}, path=path)
    report.begin_item()
    report.record(result(), input_kind="hypothesis", gated=True)
    report.end_item()  # this test finished
    report.begin_item()
    report.record(result("fp16"), input_kind="natural-text", gated=False)
    report.mark_interrupted()  # Ctrl-C while the second test ran
    data = json.loads(path.read_text())
    verdicts = {r["precision"]: (r["verdict"], r["partial"]) for r in data["rows"]}
    assert data["interrupted"] is True
    assert verdicts == {"hybrid": ("PASS", False), "fp16": ("PARTIAL (interrupted)", True)}
    assert "INTERRUPTED" in report.table()


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is not a JSON fidelity report"),
        (b'{"schema_version": 99}', "schema_version 99 is not one of"),
    ],
)
def test_rendering_a_bad_report_file_is_a_usage_error_without_a_traceback(tmp_path, content, message):
    import subprocess
    import sys

    path = tmp_path / "report.json"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "fidelity.report", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr
