import pytest

from engines.precision.policy import POLICIES, REFERENCE_POLICY, PrecisionPolicy, UnknownPrecisionError, get_policy, parse_policies


def test_every_policy_names_a_dtype_for_every_op_class():
    for policy in POLICIES.values():
        assert policy.summary().count("=") >= 4


def test_hybrid_is_fp16_gemms_and_fp32_everything_else():
    hybrid = get_policy("hybrid")
    assert hybrid.matmul == "float16"
    assert (hybrid.softmax, hybrid.layernorm, hybrid.elementwise) == ("float32",) * 3
    table = hybrid.onnx_op_dtypes()
    assert table["MatMul"] == table["Gemm"] == "float16"
    for op in ("Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Add"):
        assert table[op] == "float32", op


def test_reference_and_gating_defaults():
    assert REFERENCE_POLICY.is_reference
    assert {p.name for p in POLICIES.values() if p.gated_by_default} == {"fp32", "hybrid"}
    assert get_policy("fp16-strict").strict_reductions and not get_policy("fp16").strict_reductions


def test_unknown_precision_names_the_known_ones():
    with pytest.raises(UnknownPrecisionError, match="known precisions: fp32, hybrid, fp16"):
        get_policy("fp8")
    with pytest.raises(UnknownPrecisionError):
        parse_policies(["fp32", "int4"])


def test_policy_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="softmax dtype 'float8'"):
        PrecisionPolicy("x", "", "float16", "float8", "float32", "float32")
