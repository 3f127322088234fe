import random

import pytest

from perf.stats import compare_memory, compare_samples, mann_whitney_u, median, percentile, relative_spread


def test_percentiles():
    data = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert median(data) == 3.0 and percentile(data, 0) == 1.0 and percentile(data, 100) == 5.0
    assert percentile(data, 90) == pytest.approx(4.6)
    assert relative_spread([1.0, 1.0, 1.0, 1.0]) == 0.0


def test_mann_whitney_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    a = [rng.gauss(1.0, 0.1) for _ in range(30)]
    b = [rng.gauss(1.08, 0.1) for _ in range(25)] + [1.0, 1.0]
    u, p = mann_whitney_u(a, b)
    reference = scipy_stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert u == pytest.approx(reference.statistic)
    assert p == pytest.approx(reference.pvalue, rel=1e-6)


def test_identical_distributions_are_not_significant():
    _, p = mann_whitney_u([1.0] * 10, [1.0] * 10)
    assert p == 1.0


def samples(center, spread=0.01, n=30, seed=0):
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-spread, spread)) for _ in range(n)]


def test_regression_needs_effect_and_significance():
    slow = compare_samples("t", samples(1.25e-3), samples(1.0e-3, seed=1))
    assert slow.verdict == "regression" and not slow
    assert slow.message().startswith("t: 1.25x slower (median 1.25 ms vs 0.999 ms, p=3.02e-11")
    small = compare_samples("t", samples(1.05e-3), samples(1.0e-3, seed=1))
    assert small.verdict == "pass" and small  # significant but under the 10% threshold
    faster = compare_samples("t", samples(0.7e-3), samples(1.0e-3, seed=1))
    assert faster.verdict == "faster" and "refresh the baseline" in faster.message()


def test_noisy_machine_is_inconclusive_not_a_regression():
    noisy = compare_samples("t", samples(1.3e-3, spread=0.6), samples(1.0e-3, spread=0.6, seed=1))
    assert noisy.verdict == "inconclusive" and noisy
    assert "noisy" in noisy.message()


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least 5 samples"):
        compare_samples("t", [1.0, 1.0], [1.0] * 10)


def test_memory_gate():
    grown = compare_memory("t", 1200 * 2**20, 1000 * 2**20, threshold=0.1)
    assert grown.verdict == "regression"
    assert grown.message() == "t: peak device memory 1.20x the baseline (1200.0 MiB vs 1000.0 MiB, threshold 10%)"
    assert compare_memory("t", 1050, 1000, threshold=0.1).verdict == "pass"
    shrunk = compare_memory("t", 500, 1000, threshold=0.1)
    assert shrunk.verdict == "smaller" and shrunk.message().endswith("refresh the baseline")
