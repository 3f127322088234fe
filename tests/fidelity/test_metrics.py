import math

import pytest
import torch

from engines.batch import TokenBatch
from engines.precision.policy import POLICIES, UnknownPrecisionError
from fidelity.metrics import PUBLISHED_COSINE_MIN, TOLERANCES, CompareContext, compare_outputs, tolerance_for

CTX = CompareContext("tiny-bert", "torch", "hybrid", "cpu", "unit", tokenizer="wordpiece", weights="random-init(seed=0)")


def make(batch=3, seq=5, features=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(batch, seq, features, generator=g)
    ids = torch.zeros(batch, seq, dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    return ref, TokenBatch(ids, mask, source="unit")


def test_every_policy_has_a_tolerance_and_unknown_is_an_error():
    assert set(TOLERANCES) == set(POLICIES)
    assert tolerance_for("hybrid").cosine_min == PUBLISHED_COSINE_MIN == 0.9998
    assert tolerance_for("bf16", 0.5).cosine_min == 0.5
    with pytest.raises(UnknownPrecisionError):
        tolerance_for("fp8")


def test_a_policy_file_is_held_to_the_bar_of_its_lowest_dtype_unless_it_sets_one(tmp_path):
    from engines.precision.policy import get_policy

    (tmp_path / "a.json").write_text('{"schema": 1, "name": "a", "base": "hybrid", "overrides": [{"module": "x", "dtype": "bfloat16"}]}')
    (tmp_path / "b.json").write_text('{"schema": 1, "name": "b", "base": "fp16", "cosine_min": 0.9999}')
    assert tolerance_for(get_policy(f"file:{tmp_path / 'a.json'}")).cosine_min == TOLERANCES["bf16"].cosine_min
    assert tolerance_for(get_policy(f"file:{tmp_path / 'b.json'}")).cosine_min == 0.9999


def test_identical_outputs_pass_with_zero_error():
    ref, batch = make()
    result = compare_outputs(ref.clone(), ref, batch, CTX, tolerance_for("hybrid"))
    assert result and result.passed
    assert result.min_cosine == pytest.approx(1.0) and result.max_abs_err == 0.0


def test_a_perturbed_sample_fails_and_is_located():
    ref, batch = make()
    out = ref.clone()
    out[1, 3, 2] += 5.0
    result = compare_outputs(out, ref, batch, CTX, tolerance_for("hybrid"))
    assert not result
    assert result.failing_samples == [1]
    assert (result.worst_sample, result.worst_position, result.worst_feature) == (1, 3, 2)
    assert result.max_abs_err == pytest.approx(5.0)
    message = result.failure_message()
    assert "tiny-bert/torch/hybrid on cpu, input unit" in message
    assert "below 0.9998 in 1 / 3 samples" in message
    assert "at position 3, feature 2" in message and "Worst sample 1" in message
    assert "Replay: TokenBatch(" in message


def test_nan_and_inf_are_counted_and_fail():
    ref, batch = make()
    out = ref.clone()
    out[0, 0, 0] = float("nan")
    out[2, 4, 1] = float("inf")
    result = compare_outputs(out, ref, batch, CTX, tolerance_for("hybrid"))
    assert not result
    assert (result.nan_count, result.inf_count, result.nonfinite_samples) == (1, 1, 2)
    assert math.isnan(result.cosines[0]) and result.worst_sample == 0
    assert "1 NaN and 1 Inf in 60 valid elements, in 2 / 3 samples" in result.failure_message()


def test_padded_positions_are_ignored_but_counted():
    ref, batch = make()
    mask = batch.attention_mask.clone()
    mask[0, 3:] = 0
    batch = TokenBatch(batch.input_ids, mask, source="unit")
    out = ref.clone()
    out[0, 4] = float("nan")  # garbage at a padded position
    result = compare_outputs(out, ref, batch, CTX, tolerance_for("hybrid"))
    assert result and result.padded_nonfinite == 4 and result.valid_elements == 13 * 4


def test_nan_in_the_reference_is_a_reference_failure():
    ref, batch = make()
    bad_ref = ref.clone()
    bad_ref[0, 0, 0] = float("nan")
    result = compare_outputs(ref, bad_ref, batch, CTX, tolerance_for("hybrid"))
    assert not result and result.reference_failed
    assert "reference failure, not an engine failure" in result.failure_message()


def test_cosine_is_float64_exact_for_tiny_differences():
    ref, batch = make(features=1024)
    out = ref * (1 + 1e-9)  # a pure scale keeps the cosine at exactly 1
    result = compare_outputs(out, ref, batch, CTX, tolerance_for("fp32"))
    assert result.min_cosine == pytest.approx(1.0, abs=1e-12)
    noisy = ref + 3e-3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    result = compare_outputs(noisy, ref, batch, CTX, tolerance_for("fp32"))
    assert 1 - 1e-5 < result.min_cosine < 1 - 1e-8 and not result  # below the FP32 bar of 1 - 1e-6


def test_shape_mismatch_is_an_error():
    ref, batch = make()
    with pytest.raises(ValueError, match="differs from the reference"):
        compare_outputs(ref[:, :, :2], ref, batch, CTX, tolerance_for("hybrid"))
