import random

import pytest

from perf.stats import (
    compare_memory,
    compare_samples,
    mann_whitney_p,
    median,
    percentile,
    relative_spread,
    suite_aggregate,
)


def test_percentiles():
    data = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert median(data) == 3.0 and percentile(data, 0) == 1.0 and percentile(data, 100) == 5.0
    assert percentile(data, 90) == pytest.approx(4.6)
    assert relative_spread([1.0, 1.0, 1.0, 1.0]) == 0.0


def test_mann_whitney_is_exact_at_small_samples():
    # Five rounds each, completely separated: the exact two-sided p is 2 / C(10, 5) = 1/126.
    # The normal approximation this replaced gave 0.012 here, above alpha = 0.01.
    p = mann_whitney_p([2.0, 2.1, 2.2, 2.3, 2.4], [1.0, 1.1, 1.2, 1.3, 1.4])
    assert p == pytest.approx(2 / 252)
    assert compare_samples("t", [2.0, 2.1, 2.2, 2.3, 2.4], [1.0, 1.1, 1.2, 1.3, 1.4]).verdict == "regression"


def test_identical_distributions_are_not_significant():
    assert mann_whitney_p([1.0] * 10, [1.0] * 10) == 1.0


def samples(center, spread=0.01, n=30, seed=0):
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-spread, spread)) for _ in range(n)]


def test_regression_needs_effect_and_significance():
    slow = compare_samples("t", samples(1.25e-3), samples(1.0e-3, seed=1))
    assert slow.verdict == "regression" and not slow
    assert slow.message().startswith("t: 1.25x slower (median 1.25 ms vs 0.999 ms, p=")
    small = compare_samples("t", samples(1.05e-3), samples(1.0e-3, seed=1))
    assert small.verdict == "pass" and small  # significant but under the 10% threshold
    faster = compare_samples("t", samples(0.7e-3), samples(1.0e-3, seed=1))
    assert faster.verdict == "faster" and faster and "refresh the baseline" in faster.message()


def test_a_speedup_is_measured_like_a_slowdown_against_the_spread():
    # A loaded machine: IQR/median 1.5. 1000x faster is still far beyond that spread (the effect of
    # a speedup is 1/ratio - 1, not 1 - ratio, which could never exceed 100%).
    noisy = [1.0, 1.0, 1.0, 2.5, 2.5, 2.5, 2.5, 1.0, 1.0, 2.5]
    faster = compare_samples("t", [v * 1e-3 for v in noisy], noisy)
    assert faster.verdict == "faster" and "refresh the baseline" in faster.message()


def test_noisy_machine_is_inconclusive_not_a_regression():
    noisy = compare_samples("t", samples(1.3e-3, spread=0.6), samples(1.0e-3, spread=0.6, seed=1))
    assert noisy.verdict == "inconclusive" and noisy
    assert "noisy" in noisy.message() and "spread" in noisy.message()
    # Listed by default; a failure when the user asks for it.
    assert not noisy.fails(inconclusive="report") and noisy.fails(inconclusive="fail")


def test_a_large_slowdown_that_is_not_significant_is_inconclusive_not_a_pass():
    # 25% slower by the medians, spread 12.5%, but p = 0.14: the samples cannot tell.
    candidate = [1.0, 1.25, 1.25, 1.25, 1.25, 1.25, 1.0]
    baseline = [1.0] * 5 + [1.25, 1.25]
    result = compare_samples("t", candidate, baseline)
    assert result.ratio == pytest.approx(1.25) and result.p_value > 0.01
    assert result.verdict == "inconclusive" and "not significant" in result.message()
    assert result.fails(inconclusive="fail")


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least 5 samples"):
        compare_samples("t", [1.0, 1.0], [1.0] * 10)


def test_memory_gate():
    grown = compare_memory("t", 1200 * 2**20, 1000 * 2**20, threshold=0.1)
    assert grown.verdict == "regression"
    assert grown.message() == "t: peak device memory 1.20x the baseline (1200.0 MiB vs 1000.0 MiB, threshold 10%)"
    assert grown.fails()
    assert compare_memory("t", 1050, 1000, threshold=0.1).verdict == "pass"
    shrunk = compare_memory("t", 500, 1000, threshold=0.1)
    assert shrunk.verdict == "smaller" and shrunk.message().endswith("refresh the baseline")


def test_a_uniform_slowdown_below_the_item_threshold_fails_the_suite_aggregate():
    """8% slower everywhere: no item fails at 10%, the suite's geometric mean fails at 5%."""
    items = [
        compare_samples(f"item{i}", samples(1.08e-3 * (1 + i / 10), seed=i), samples(1.0e-3 * (1 + i / 10), seed=100 + i))
        for i in range(12)
    ]
    assert all(c.verdict == "pass" for c in items)
    aggregate = suite_aggregate(items, threshold=0.05)
    assert aggregate.failed and aggregate.geomean_ratio == pytest.approx(1.08, abs=0.01)
    assert "12 compared items: geometric mean 1.08" in aggregate.message() and "--perf-suite-threshold" in aggregate.message()
    # The same run is within a 10% suite threshold, and the same stack is within 5%.
    assert not suite_aggregate(items, threshold=0.10).failed
    same = [compare_samples(f"i{i}", samples(1e-3, seed=i), samples(1e-3, seed=50 + i)) for i in range(12)]
    assert not suite_aggregate(same, threshold=0.05).failed


def test_memory_comparisons_do_not_enter_the_latency_aggregate():
    memory = [compare_memory("m", 2000, 1000, threshold=0.1)]
    assert suite_aggregate(memory).items == 0 and not suite_aggregate(memory).failed
