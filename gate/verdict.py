"""One verdict for a candidate result set against a baseline: fidelity drift, latency, memory, the stack diff.

Measure / store / compare are kept apart: the runs measured, :mod:`gate.store` keeps
baselines, this module only compares two result sets it is given.  Refusals come
first and fail closed (:class:`~gate.results.ResultSetError`): another machine, an
incomplete candidate, a candidate missing configurations the baseline has, inputs or
weights that differ.  Then every configuration is judged: latency with the latency
gate's Mann-Whitney test and threshold (``perf.compare``), peak memory with its
threshold, fidelity with :mod:`gate.drift`; the suite's geometric-mean latency
ratio is an item of its own.  Versions may differ (that is what an upgrade is); they
are shown side by side, not refused.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from engines.tables import render_table
from gate.drift import DRIFT_FACTOR, DRIFT_FLOOR, FidelityDrift, compare_fidelity
from gate.results import STACK_KEYS, ResultSet, ResultSetError
from perf.compare import compare_runs
from perf.stats import (
    DEFAULT_ALPHA,
    DEFAULT_MEMORY_THRESHOLD,
    DEFAULT_SUITE_THRESHOLD,
    DEFAULT_THRESHOLD,
    Comparison,
    SuiteAggregate,
    suite_aggregate,
)

VERDICT_SCHEMA_VERSION = 1
EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Thresholds:
    latency: float = DEFAULT_THRESHOLD
    memory: float = DEFAULT_MEMORY_THRESHOLD
    suite: float = DEFAULT_SUITE_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    drift_factor: float = DRIFT_FACTOR
    drift_floor: float = DRIFT_FLOOR
    inconclusive: str = "report"  # or "fail"


@dataclasses.dataclass
class PerfItem:
    label: str
    latency: Comparison
    memory: Comparison | None


@dataclasses.dataclass
class GateResult:
    baseline: ResultSet
    candidate: ResultSet
    thresholds: Thresholds
    stack: list[tuple[str, Any, Any]]
    perf: list[PerfItem]
    aggregate: SuiteAggregate | None
    fidelity: list[FidelityDrift]
    notes: list[str]

    # -- the verdict ----------------------------------------------------------------------------
    def failures(self) -> list[str]:
        out = [d.message() for d in self.fidelity if d.fails()]
        for item in self.perf:
            if item.latency.fails(inconclusive=self.thresholds.inconclusive):
                out.append(item.latency.message())
            if item.memory is not None and item.memory.fails():
                out.append(item.memory.message())
        if self.aggregate is not None and self.aggregate.failed:
            out.append(self.aggregate.message())
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed else EXIT_REGRESSION

    def headline(self) -> str:
        failures = self.failures()
        counts = (f"{len(self.fidelity)} fidelity rows, {len(self.perf)} latency items"
                  f"{', ' + str(sum(1 for i in self.perf if i.memory)) + ' memory items' if self.perf else ''}")
        if not failures:
            return f"PASS: the candidate may ship on {self.candidate.machine_id} ({counts} compared)"
        return f"REGRESSION: {len(failures)} finding(s) ({counts} compared); the candidate may not ship"

    # -- output ----------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": VERDICT_SCHEMA_VERSION,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "verdict": "pass" if self.passed else "regression",
            "exit_code": self.exit_code,
            "headline": self.headline(),
            "baseline": {"label": self.baseline.label, "files": [str(p) for p in self.baseline.files()]},
            "candidate": {"label": self.candidate.label, "files": [str(p) for p in self.candidate.files()]},
            "machine_id": self.candidate.machine_id,
            "thresholds": dataclasses.asdict(self.thresholds),
            "stack": [{"fact": k, "baseline": b, "candidate": c, "differs": b != c} for k, b, c in self.stack],
            "failures": self.failures(),
            "fidelity": [
                {"engine": d.label, "verdict": d.verdict, "baseline_error": d.baseline.error,
                 "candidate_error": d.candidate.error, "baseline_min_cosine": d.baseline.min_cosine,
                 "candidate_min_cosine": d.candidate.min_cosine, "baseline_nonfinite_samples": d.baseline.nonfinite_samples,
                 "candidate_nonfinite_samples": d.candidate.nonfinite_samples, "samples": d.candidate.samples}
                for d in self.fidelity
            ],
            "perf": [
                {"item": i.label, "latency_verdict": i.latency.verdict, "latency_ratio": i.latency.ratio,
                 "p_value": i.latency.p_value, "baseline_median_s": i.latency.baseline_median,
                 "candidate_median_s": i.latency.candidate_median, "spread": i.latency.spread,
                 "memory_verdict": None if i.memory is None else i.memory.verdict,
                 "memory_ratio": None if i.memory is None else i.memory.ratio,
                 "baseline_peak_bytes": None if i.memory is None else i.memory.baseline_median,
                 "candidate_peak_bytes": None if i.memory is None else i.memory.candidate_median}
                for i in self.perf
            ],
            "suite": None if self.aggregate is None else {
                "items": self.aggregate.items, "geomean_ratio": self.aggregate.geomean_ratio,
                "threshold": self.aggregate.threshold, "failed": self.aggregate.failed},
            "notes": self.notes,
        }

    def markdown(self) -> str:
        t = self.thresholds
        lines = [
            "# Upgrade gate",
            "",
            f"**{self.headline()}**",
            "",
            f"Baseline: `{self.baseline.label}`; candidate: `{self.candidate.label}`.",
            "",
            "## Stack",
            "",
            render_table(("fact", "baseline", "candidate"),
                         [(k, _text(b), _text(c) + (" **(differs)**" if b != c else "")) for k, b, c in self.stack],
                         markdown=True),
        ]
        failures = self.failures()
        if failures:
            lines += ["", "## Findings", ""] + [f"- {f}" for f in failures]
        if self.fidelity:
            lines += [
                "", "## Fidelity drift", "",
                f"Error = 1 - min cosine against FP32. Fails when the candidate's error exceeds {t.drift_factor:g}x "
                f"the baseline's and {t.drift_floor:g}, or non-finite outputs appear in more samples.", "",
                render_table(
                    ("engine [input]", "baseline error", "candidate error", "ratio", "NaN/Inf samples (base/cand)",
                     "verdict"),
                    [(d.label, _sci(d.baseline.error), _sci(d.candidate.error),
                      "-" if d.ratio is None else f"{d.ratio:.2f}",
                      f"{d.baseline.nonfinite_samples}/{d.candidate.nonfinite_samples}", _bold(d.verdict, d.fails()))
                     for d in self.fidelity],
                    markdown=True),
            ]
        if self.perf:
            lines += [
                "", "## Latency and memory", "",
                f"Candidate/baseline medians; latency fails when slower beyond {t.latency:.0%} with a two-sided "
                f"Mann-Whitney p < {t.alpha:g}; memory fails beyond {t.memory:.0%}.", "",
                render_table(
                    ("item", "baseline ms", "candidate ms", "ratio", "p", "latency", "memory ratio", "memory"),
                    [(i.label, f"{i.latency.baseline_median * 1e3:.3f}", f"{i.latency.candidate_median * 1e3:.3f}",
                      f"{i.latency.ratio:.3f}", f"{i.latency.p_value:.2g}",
                      _bold(i.latency.verdict, i.latency.fails(inconclusive=t.inconclusive)),
                      "-" if i.memory is None else f"{i.memory.ratio:.3f}",
                      "-" if i.memory is None else _bold(i.memory.verdict, i.memory.fails()))
                     for i in self.perf],
                    markdown=True),
            ]
            if self.aggregate is not None:
                lines += ["", self.aggregate.message() + "."]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _bold(verdict: str, failed: bool) -> str:
    return f"**{verdict}**" if failed else verdict


def compare(baseline: ResultSet, candidate: ResultSet, thresholds: Thresholds = Thresholds()) -> GateResult:
    """Judge ``candidate`` against ``baseline``; ResultSetError where they cannot be compared."""
    if baseline.machine_id != candidate.machine_id:
        raise ResultSetError(
            f"the candidate ran on {candidate.machine_id}, the baseline on {baseline.machine_id}: another "
            "architecture is not compared; use a baseline of this machine id (fidelity-gate save on it)"
        )
    candidate.require_complete("not compared")
    baseline.require_no_faults("not compared")
    for part in ("fidelity", "perf"):
        if getattr(candidate, part) is not None and getattr(baseline, part) is None:
            raise ResultSetError(f"the candidate has {part} results but the baseline has none: save a baseline "
                                 f"with {part} results, or leave them out of the candidate")
    notes = [f"the candidate was run with injected faults: {', '.join(candidate.injected_faults())}"] \
        if candidate.injected_faults() else []
    if baseline.incomplete():
        notes.append("the baseline is not a complete run (" + "; ".join(baseline.incomplete()) + ")")
    b_stack, c_stack = baseline.stack(), candidate.stack()
    stack = [(k, b_stack.get(k), c_stack.get(k)) for k in STACK_KEYS]

    drifts: list[FidelityDrift] = []
    if candidate.fidelity is not None:
        drifts, missing, extra, mismatched = compare_fidelity(
            baseline.fidelity, candidate.fidelity, factor=thresholds.drift_factor, floor=thresholds.drift_floor)
        if mismatched:
            raise ResultSetError("the fidelity results are not comparable: " + "; ".join(mismatched))
        if missing:
            raise ResultSetError(f"the candidate lacks {len(missing)} fidelity row(s) of the baseline "
                                 f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): an incomplete run")
        if extra:
            notes.append(f"{len(extra)} fidelity row(s) not in the baseline (not judged): {', '.join(extra[:5])}")
    items: list[PerfItem] = []
    aggregate = None
    if candidate.perf is not None:
        compared, only = compare_runs(baseline.perf, candidate.perf, threshold=thresholds.latency,
                                      memory_threshold=thresholds.memory, alpha=thresholds.alpha)
        cand_names = {b["fullname"] for b in candidate.perf["benchmarks"]}
        missing = [n for n in only if n not in cand_names]
        if missing:
            raise ResultSetError(f"the candidate lacks {len(missing)} benchmark(s) of the baseline "
                                 f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): an incomplete run")
        if only:
            notes.append(f"{len(only)} benchmark(s) not in the baseline (not judged)")
        items = [PerfItem(label, latency, memory) for label, latency, memory in compared]
        aggregate = suite_aggregate([i.latency for i in items], threshold=thresholds.suite)
    return GateResult(baseline, candidate, thresholds, stack, items, aggregate, drifts, notes)
