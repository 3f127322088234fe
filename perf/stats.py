"""Statistics for the latency gate: percentiles, Mann-Whitney U, the verdicts and the suite aggregate.

The gate follows asv and pyperf: a regression needs both an effect larger than
the threshold (median ratio) *and* significance on the recorded samples
(two-sided Mann-Whitney U, ``scipy.stats.mannwhitneyu``: exact p-values for small
samples without ties, the normal approximation otherwise).  An effect beyond the
threshold but no larger than the runs' own spread (IQR/median) is
``inconclusive``: listed with its spread, and a failure under
``--perf-inconclusive=fail``.  A speedup beyond the threshold passes and says to
refresh the baseline.

Per-item gates miss a uniform slowdown below their threshold, so the suite is
gated as a whole too (:func:`suite_aggregate`): the geometric mean of
candidate/baseline medians over every compared item must stay within
``--perf-suite-threshold``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.10  # TensorRT-LLM gates at 5-10% per GPU; asv's default factor is 1.1
DEFAULT_MEMORY_THRESHOLD = 0.10
DEFAULT_SUITE_THRESHOLD = 0.05
DEFAULT_ALPHA = 0.01
MIN_SAMPLES = 5
INCONCLUSIVE_POLICIES = ("report", "fail")


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    if len(samples) == 0:
        raise ValueError("no samples")
    return float(np.percentile(np.asarray(samples, dtype=float), q))


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50.0)


def relative_spread(samples: Sequence[float]) -> float:
    """Interquartile range over the median: how noisy a sample set is."""
    return (percentile(samples, 75) - percentile(samples, 25)) / median(samples)


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p for H0: ``a`` and ``b`` come from one distribution (scipy picks exact or asymptotic)."""
    from scipy.stats import mannwhitneyu

    if len(a) == 0 or len(b) == 0:
        raise ValueError("both samples need values")
    if len(set(a) | set(b)) == 1:
        return 1.0  # every value equal: no evidence either way (scipy would divide by zero)
    return float(mannwhitneyu(a, b, alternative="two-sided", method="auto").pvalue)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Candidate vs baseline for one benchmark and one metric."""

    name: str
    verdict: str  # "pass", "regression", "faster" (latency) / "smaller" (memory), "inconclusive"
    ratio: float  # candidate median / baseline median
    candidate_median: float
    baseline_median: float
    p_value: float
    threshold: float
    spread: float = 0.0  # the larger IQR/median of the two sample sets (latency)
    note: str = ""
    metric: str = "latency"  # or "memory": medians are then peak bytes

    def fails(self, *, inconclusive: str = "report") -> bool:
        return self.verdict == "regression" or (self.verdict == "inconclusive" and inconclusive == "fail")

    def __bool__(self) -> bool:
        return self.verdict != "regression"

    def message(self) -> str:
        if self.metric == "memory":
            text = (
                f"{self.name}: peak device memory {self.ratio:.2f}x the baseline "
                f"({self.candidate_median / 2**20:.1f} MiB vs {self.baseline_median / 2**20:.1f} MiB, "
                f"threshold {self.threshold:.0%})"
            )
        else:
            speed = f"{self.ratio:.2f}x slower" if self.ratio >= 1 else f"{1 / self.ratio:.2f}x faster"
            text = (
                f"{self.name}: {speed} (median {self.candidate_median * 1e3:.3g} ms vs "
                f"{self.baseline_median * 1e3:.3g} ms, p={self.p_value:.3g}, spread {self.spread:.0%}, "
                f"threshold {self.threshold:.0%})"
            )
        return f"{text}: {self.note}" if self.note else text


def compare_samples(
    name: str,
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
) -> Comparison:
    if len(candidate) < MIN_SAMPLES or len(baseline) < MIN_SAMPLES:
        raise ValueError(f"{name}: need at least {MIN_SAMPLES} samples on each side, got {len(candidate)}/{len(baseline)}")
    cand_median, base_median = median(candidate), median(baseline)
    ratio = cand_median / base_median
    p = mann_whitney_p(candidate, baseline)
    spread = max(relative_spread(candidate), relative_spread(baseline))

    def result(verdict: str, note: str = "") -> Comparison:
        return Comparison(name, verdict, ratio, cand_median, base_median, p, threshold, spread, note)

    # The effect, the same measure both ways: 2x slower and 2x faster are both 100%.
    effect = max(ratio, 1.0 / ratio) - 1.0
    beyond = effect > threshold
    # An effect beyond the threshold that the samples cannot tell from noise (within the
    # runs' own spread, or not significant) is inconclusive, never a silent pass.
    if beyond and effect <= spread:
        return result(
            "inconclusive",
            f"the spread {spread:.0%} (IQR/median) is as large as the difference: the machine is noisy; rerun, "
            "or fail such results with --perf-inconclusive=fail",
        )
    if beyond and p >= alpha:
        return result(
            "inconclusive",
            f"beyond the threshold but not significant (p={p:.2g} >= alpha {alpha}): too few or too scattered "
            "rounds; rerun with more --perf-rounds, or fail such results with --perf-inconclusive=fail",
        )
    if ratio > 1.0 + threshold:
        return result("regression")
    if ratio < 1.0 / (1.0 + threshold):
        return result("faster", "faster than the baseline beyond the threshold: refresh the baseline")
    return result("pass")


def compare_memory(name: str, candidate_bytes: int, baseline_bytes: int, *, threshold: float) -> Comparison:
    ratio = candidate_bytes / baseline_bytes if baseline_bytes else 1.0
    verdict = "regression" if ratio > 1.0 + threshold else ("smaller" if ratio < 1.0 / (1.0 + threshold) else "pass")
    note = "smaller than the baseline beyond the threshold: refresh the baseline" if verdict == "smaller" else ""
    return Comparison(name, verdict, ratio, candidate_bytes, baseline_bytes, 0.0, threshold, note=note, metric="memory")


@dataclasses.dataclass(frozen=True)
class SuiteAggregate:
    """The geometric mean of candidate/baseline median ratios over every compared item."""

    items: int
    geomean_ratio: float
    threshold: float
    worst: tuple[str, float] | None  # the item with the largest ratio

    @property
    def failed(self) -> bool:
        return self.items > 0 and self.geomean_ratio > 1.0 + self.threshold

    def message(self) -> str:
        if not self.items:
            return "suite aggregate: no item was compared with a baseline"
        direction = "slower" if self.geomean_ratio >= 1 else "faster"
        factor = self.geomean_ratio if self.geomean_ratio >= 1 else 1 / self.geomean_ratio
        text = (
            f"suite aggregate over {self.items} compared items: geometric mean {factor:.3f}x {direction} than the "
            f"baseline (threshold {self.threshold:.0%}, --perf-suite-threshold)"
        )
        if self.worst is not None:
            text += f"; largest ratio {self.worst[1]:.3f} ({self.worst[0]})"
        return text


def suite_aggregate(comparisons: Sequence[Comparison], *, threshold: float = DEFAULT_SUITE_THRESHOLD) -> SuiteAggregate:
    latency = [c for c in comparisons if c.metric == "latency"]
    if not latency:
        return SuiteAggregate(0, 1.0, threshold, None)
    geomean = math.exp(sum(math.log(c.ratio) for c in latency) / len(latency))
    worst = max(latency, key=lambda c: c.ratio)
    return SuiteAggregate(len(latency), geomean, threshold, (worst.name, worst.ratio))
