"""The history: one line per nightly run (and per baseline refresh), per machine id, and its change points.

``baselines/<machine id>/history.jsonl`` is append-only JSON lines (schema
:data:`HISTORY_SCHEMA_VERSION`): each ``run`` line holds the stack's facts, the
gate's verdict, the median latency and peak memory of every benchmark item and
the fidelity error (``1 - min cosine``) and non-finite samples of every fidelity
row; ``baseline`` lines record each explicit ``fidelity-gate save``.  A few KiB per
night: small enough to commit or to upload as an artifact.

Change points: for each series (one benchmark item's latency, one row's fidelity
error) over the ``run`` lines, ``ruptures``' PELT search with an L2 cost on the
log of the values (a step is then a ratio) and a BIC-like penalty,
``PENALTY_SCALE * sigma^2 * ln(n)``, where ``sigma`` is the series' noise estimated
robustly from its successive differences (1.4826 MAD / sqrt 2) and floored
(``NOISE_FLOOR``: a perfectly repeatable series would otherwise call any wiggle a
step).  A detected step is reported only if the medians on its two sides differ by
at least ``min_step`` (latency, default 5%) or the drift factor (fidelity), and
names the stack facts that changed between the two runs around it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import statistics
from pathlib import Path
from typing import Any

from gate.drift import DRIFT_FACTOR, DRIFT_FLOOR
from gate.results import ResultSetError

HISTORY_SCHEMA_VERSION = 1
PENALTY_SCALE = 3.0
NOISE_FLOOR = {"latency": math.log(1.01), "fidelity": math.log(1.25)}  # 1% latency, 25% error
MIN_POINTS = 4
DEFAULT_MIN_STEP = 0.05


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_line(result) -> dict[str, Any]:
    """The history line of one gate result (gate.verdict.GateResult)."""
    cand = result.candidate
    return {
        "schema": HISTORY_SCHEMA_VERSION,
        "event": "run",
        "time": _now(),
        "stack": cand.stack(),
        "verdict": "pass" if result.passed else "regression",
        "baseline": result.baseline.label,
        "latency_s": {i.label: i.latency.candidate_median for i in result.perf},
        "memory_bytes": {i.label: i.memory.candidate_median for i in result.perf if i.memory is not None},
        "fidelity_error": {d.label: d.candidate.error for d in result.fidelity},
        "nonfinite_samples": {d.label: d.candidate.nonfinite_samples for d in result.fidelity},
    }


def baseline_line(results, written: list[Path]) -> dict[str, Any]:
    return {"schema": HISTORY_SCHEMA_VERSION, "event": "baseline", "time": _now(), "stack": results.stack(),
            "files": [str(p) for p in written]}


def append(path: Path, line: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True, default=str) + "\n")


def read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ResultSetError(f"{path} does not exist: a history is written by fidelity-gate compare --history PATH")
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            raise ResultSetError(f"{path}:{number} is not a JSON line (a damaged history)") from None
        if line.get("schema") != HISTORY_SCHEMA_VERSION:
            raise ResultSetError(f"{path}:{number} has schema {line.get('schema')!r}; this version reads "
                                 f"{HISTORY_SCHEMA_VERSION}")
        lines.append(line)
    return lines


@dataclasses.dataclass(frozen=True)
class ChangePoint:
    metric: str  # "latency" or "fidelity"
    series: str
    index: int  # position in the run lines of the first run after the step
    time: str
    before: float  # median of the segment before
    after: float
    stack_change: str

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else math.inf

    def message(self) -> str:
        what = "latency" if self.metric == "latency" else "fidelity error (1 - min cosine)"
        fmt = (lambda v: f"{v * 1e3:.3g} ms") if self.metric == "latency" else (lambda v: f"{v:.2e}")
        return (f"{self.series}: {what} stepped {self.ratio:.2f}x ({fmt(self.before)} -> {fmt(self.after)}) at run "
                f"{self.index} ({self.time}); coinciding stack change: {self.stack_change}")


def _noise(values: list[float]) -> float:
    diffs = [b - a for a, b in zip(values, values[1:])]
    if len(diffs) < 2:
        return 0.0
    center = statistics.median(diffs)
    return 1.4826 * statistics.median(abs(d - center) for d in diffs) / math.sqrt(2)


def detect_steps(values: list[float], *, metric: str) -> list[int]:
    """Indices where a new segment starts (PELT, L2 cost on log values, penalty from the series' own noise)."""
    import numpy as np
    import ruptures

    if len(values) < MIN_POINTS:
        return []
    floor = DRIFT_FLOOR * 1e-3 if metric == "fidelity" else 1e-12
    logs = [math.log(max(v, floor)) for v in values]
    sigma = max(_noise(logs), NOISE_FLOOR[metric])
    penalty = PENALTY_SCALE * sigma**2 * math.log(len(logs))
    signal = np.asarray(logs, dtype=float).reshape(-1, 1)
    breaks = ruptures.Pelt(model="l2", min_size=2, jump=1).fit(signal).predict(pen=penalty)
    return [b for b in breaks if b < len(values)]


def stack_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    changed = [f"{k} {before.get(k)} -> {after.get(k)}" for k in after if before.get(k) != after.get(k)]
    return ", ".join(changed) or "none recorded (same stack: look at the machine or the workload)"


def change_points(lines: list[dict[str, Any]], *, min_step: float = DEFAULT_MIN_STEP) -> list[ChangePoint]:
    runs = [line for line in lines if line.get("event") == "run"]
    found = []
    for metric, field, least in (("latency", "latency_s", 1 + min_step), ("fidelity", "fidelity_error", DRIFT_FACTOR)):
        names = sorted({name for run in runs for name in run.get(field) or {}})
        for name in names:
            points = [(i, run[field][name]) for i, run in enumerate(runs)
                      if run.get(field) and run[field].get(name) is not None]
            values = [v for _, v in points]
            starts = [0] + detect_steps(values, metric=metric) + [len(values)]
            for left, cut, right in zip(starts, starts[1:], starts[2:]):
                before = statistics.median(values[left:cut])
                after = statistics.median(values[cut:right])
                floor = DRIFT_FLOOR if metric == "fidelity" else 0.0
                if max(before, floor) == 0:
                    continue
                ratio = max(after, floor) / max(before, floor)
                if ratio >= least or ratio <= 1 / least:
                    index = points[cut][0]
                    found.append(ChangePoint(metric, name, index, runs[index].get("time", "?"), before, after,
                                             stack_change(runs[index - 1].get("stack") or {},
                                                          runs[index].get("stack") or {})))
    return found
