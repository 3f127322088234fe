"""Statistics for the latency gate: percentiles, Mann-Whitney U, and the verdict.

The gate follows asv and pyperf: a regression needs both an effect larger than
the threshold (median ratio) *and* significance on the recorded samples
(two-sided Mann-Whitney U, normal approximation with tie correction), and an
effect no larger than the runs' own spread (IQR/median) is inconclusive rather
than a regression.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

DEFAULT_THRESHOLD = 0.10  # TensorRT-LLM gates at 5-10% per GPU; asv's default factor is 1.1
DEFAULT_ALPHA = 0.01
MIN_SAMPLES = 5


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50.0)


def relative_spread(samples: Sequence[float]) -> float:
    """Interquartile range over the median: how noisy a sample set is."""
    return (percentile(samples, 75) - percentile(samples, 25)) / median(samples)


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(U_a, two-sided p)`` for H0: a and b come from one distribution."""
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need values")
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(pooled)
    tie_term = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        rank = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            ranks[k] = rank
        ties = j - i + 1
        tie_term += ties**3 - ties
        i = j + 1
    rank_sum_a = sum(r for r, (_, group) in zip(ranks, pooled) if group == 0)
    u_a = rank_sum_a - n1 * (n1 + 1) / 2.0
    mean_u = n1 * n2 / 2.0
    n = n1 + n2
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:
        return u_a, 1.0
    z = (abs(u_a - mean_u) - 0.5) / math.sqrt(variance)  # continuity correction
    p = math.erfc(max(z, 0.0) / math.sqrt(2.0))
    return u_a, min(1.0, p)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Candidate vs baseline for one benchmark."""

    name: str
    verdict: str  # "pass", "regression", "faster" (latency) / "smaller" (memory), "inconclusive"
    ratio: float  # candidate median / baseline median
    candidate_median: float
    baseline_median: float
    p_value: float
    threshold: float
    note: str = ""
    metric: str = "latency"  # or "memory": medians are then peak bytes

    def __bool__(self) -> bool:
        return self.verdict != "regression"

    def message(self, unit: float = 1e3, unit_name: str = "ms") -> str:
        if self.metric == "memory":
            return (
                f"{self.name}: peak device memory {self.ratio:.2f}x the baseline "
                f"({self.candidate_median / 2**20:.1f} MiB vs {self.baseline_median / 2**20:.1f} MiB, "
                f"threshold {self.threshold:.0%})" + (f": {self.note}" if self.note else "")
            )
        speed = f"{self.ratio:.2f}x slower" if self.ratio >= 1 else f"{1 / self.ratio:.2f}x faster"
        text = (
            f"{self.name}: {speed} (median {self.candidate_median * unit:.3g} {unit_name} vs "
            f"{self.baseline_median * unit:.3g} {unit_name}, p={self.p_value:.3g}, threshold {self.threshold:.0%})"
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
    _, p = mann_whitney_u(candidate, baseline)
    spread = max(relative_spread(candidate), relative_spread(baseline))

    def result(verdict: str, note: str = "") -> Comparison:
        return Comparison(name, verdict, ratio, cand_median, base_median, p, threshold, note)

    effect = abs(ratio - 1.0)
    # An effect beyond the threshold but within the run's own spread is noise:
    # inconclusive, not a verdict either way.
    if effect > threshold and effect <= spread:
        return result(
            "inconclusive",
            f"spread {spread:.0%} (IQR/median) is as large as the difference: the machine is noisy",
        )
    if ratio > 1.0 + threshold and p < alpha:
        return result("regression")
    if ratio < 1.0 / (1.0 + threshold) and p < alpha:
        return result("faster", "refresh the baseline")
    return result("pass")


def compare_memory(name: str, candidate_bytes: int, baseline_bytes: int, *, threshold: float) -> Comparison:
    ratio = candidate_bytes / baseline_bytes if baseline_bytes else 1.0
    verdict = "regression" if ratio > 1.0 + threshold else ("smaller" if ratio < 1.0 / (1.0 + threshold) else "pass")
    note = "refresh the baseline" if verdict == "smaller" else ""
    return Comparison(name, verdict, ratio, candidate_bytes, baseline_bytes, 0.0, threshold, note, metric="memory")
