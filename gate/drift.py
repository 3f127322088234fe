"""The fidelity drift rule: a candidate's error against FP32 may not grow beyond a factor of the baseline's.

Per model x backend x precision x input source, the error is ``1 - min cosine``
(the worst sample against the FP32 reference).  The candidate fails when

* its error exceeds ``factor`` times the baseline's **and** the absolute ``floor``
  (``DRIFT_FACTOR`` = 2, ``DRIFT_FLOOR`` = 1e-5: below the floor, run-to-run
  differences of non-deterministic kernels and summation order are not a finding;
  docs/upgrade-gate.md gives the measurements behind both numbers), or
* it has non-finite outputs in a larger share of samples than the baseline had (a new
  NaN/Inf fails, whatever the cosine).

This catches what the absolute bar cannot: a 5% error in one GEMM of minilm moves
``1 - min cosine`` from ~1e-6 to ~1.6e-4 and still passes 0.9998.  An error that
shrank beyond the factor is reported (``smaller``) so that the baseline gets refreshed
on purpose, never silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engines.perturb import PERTURBED_MARK

DRIFT_FACTOR = 2.0
DRIFT_FLOOR = 1e-5
# What must match between two reports for their rows to be compared: the inputs (profile) and the weights.
CHECKED_OPTIONS = ("profile",)

RowKey = tuple[str, str, str, str, str]  # model, backend, precision, input kind, input source


def row_label(key: RowKey) -> str:
    model, backend, precision, _, source = key
    return f"{model}/{backend}/{precision} [{source}]"


@dataclasses.dataclass
class MergedRow:
    """One engine and input source over every device it ran on (an xdist run has one row per GPU)."""

    min_cosine: float | None
    samples: int
    nonfinite_samples: int
    weights: str
    gated: bool

    @property
    def error(self) -> float | None:
        return None if self.min_cosine is None else max(0.0, 1.0 - self.min_cosine)

    @property
    def nonfinite_rate(self) -> float:
        return self.nonfinite_samples / self.samples if self.samples else 0.0


def row_key(row: dict[str, Any]) -> RowKey:
    """What identifies a fidelity report row across runs (its device aside: the rows of one engine on several GPUs
    are one)."""
    return (row["model"], row["backend"], row["precision"], row["input_kind"], row["input_source"])


def fidelity_rows(report: dict[str, Any]) -> dict[RowKey, MergedRow]:
    rows: dict[RowKey, MergedRow] = {}
    for r in report.get("rows") or []:
        key = row_key(r)
        cos = r.get("min_cosine")
        cos = None if cos is None else float(cos)
        if key not in rows:
            rows[key] = MergedRow(cos, int(r["samples"]), int(r["nonfinite_samples"]), r.get("weights", ""),
                                  bool(r.get("gated")))
            continue
        row = rows[key]
        row.min_cosine = cos if row.min_cosine is None else (row.min_cosine if cos is None else min(row.min_cosine, cos))
        row.samples += int(r["samples"])
        row.nonfinite_samples += int(r["nonfinite_samples"])
    return rows


@dataclasses.dataclass(frozen=True)
class FidelityDrift:
    key: RowKey
    baseline: MergedRow
    candidate: MergedRow
    verdict: str  # "pass", "drift", "new non-finite", "smaller", "no finite samples"
    factor: float
    floor: float

    @property
    def label(self) -> str:
        return row_label(self.key)

    def fails(self) -> bool:
        return self.verdict in ("drift", "new non-finite", "no finite samples")

    def __bool__(self) -> bool:
        return not self.fails()

    @property
    def ratio(self) -> float | None:
        b, c = self.baseline.error, self.candidate.error
        if b is None or c is None:
            return None
        return c / max(b, self.floor * 1e-3) if c else 0.0

    def message(self) -> str:
        b, c = self.baseline, self.candidate
        text = (f"{self.label}: 1 - min cosine {_fmt(c.error)} vs {_fmt(b.error)} in the baseline "
                f"(min cosine {_cos(c.min_cosine)} vs {_cos(b.min_cosine)})")
        if self.verdict == "drift":
            text += f": more than {self.factor:g}x the baseline's error and above the floor {self.floor:g}"
        elif self.verdict == "new non-finite":
            text += (f": non-finite outputs in {c.nonfinite_samples} of {c.samples} samples "
                     f"(baseline {b.nonfinite_samples} of {b.samples})")
        elif self.verdict == "no finite samples":
            text += ": no finite sample to compare"
        elif self.verdict == "smaller":
            text += f": less than 1/{self.factor:g} of the baseline's error: refresh the baseline (fidelity-gate save)"
        return text


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _cos(value: float | None) -> str:
    return "-" if value is None else f"{value:.7f}"


def judge(key: RowKey, baseline: MergedRow, candidate: MergedRow, *, factor: float = DRIFT_FACTOR,
          floor: float = DRIFT_FLOOR) -> FidelityDrift:
    verdict = "pass"
    if candidate.nonfinite_rate > baseline.nonfinite_rate:
        verdict = "new non-finite"
    elif candidate.error is None and baseline.error is not None:
        verdict = "no finite samples"
    elif candidate.error is not None and baseline.error is not None:
        if candidate.error > factor * baseline.error and candidate.error > floor:
            verdict = "drift"
        elif baseline.error > floor and candidate.error * factor < baseline.error:
            verdict = "smaller"
    return FidelityDrift(key, baseline, candidate, verdict, factor, floor)


def compare_fidelity(
    baseline: dict[str, Any], candidate: dict[str, Any], *, factor: float = DRIFT_FACTOR, floor: float = DRIFT_FLOOR
) -> tuple[list[FidelityDrift], list[str], list[str], list[str]]:
    """``(drifts, missing in the candidate, new in the candidate, mismatched facts)`` for two fidelity reports."""
    mismatched = []
    for option in CHECKED_OPTIONS:
        b, c = (baseline.get("options") or {}).get(option), (candidate.get("options") or {}).get(option)
        if b != c:
            mismatched.append(f"input {option} {b!r} in the baseline, {c!r} in the candidate: other inputs")
    base, cand = fidelity_rows(baseline), fidelity_rows(candidate)
    drifts = []
    for key in sorted(set(base) & set(cand)):
        if _real_weights(base[key].weights) != _real_weights(cand[key].weights):
            mismatched.append(f"{row_label(key)}: weights {base[key].weights!r} in the baseline, "
                              f"{cand[key].weights!r} in the candidate")
            continue
        drifts.append(judge(key, base[key], cand[key], factor=factor, floor=floor))
    missing = [row_label(k) for k in sorted(set(base) - set(cand))]
    extra = [row_label(k) for k in sorted(set(cand) - set(base))]
    return drifts, missing, extra, mismatched


def _real_weights(weights: str) -> str:
    """The weights without an injected fault's mark: a perturbed candidate is compared with the real baseline."""
    return weights.partition(PERTURBED_MARK)[0]
