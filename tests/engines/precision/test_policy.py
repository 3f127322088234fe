"""The policy tables and policy files."""

import json

import pytest

from engines.precision.policy import (
    OP_CLASSES,
    POLICIES,
    REFERENCE_POLICY,
    PolicyError,
    PrecisionPolicy,
    UnknownPrecisionError,
    get_policy,
    load_policy_file,
    op_class_of_onnx_op,
    write_policy_file,
)

# The published policies, written out: a change to any cell must be deliberate.
PUBLISHED = {
    "fp32": ("float32", "float32", "float32", "float32", False),
    "hybrid": ("float16", "float32", "float32", "float32", False),
    "fp16": ("float16", "float16", "float16", "float16", False),
    "fp16-strict": ("float16", "float16", "float16", "float16", True),
    "bf16": ("bfloat16", "bfloat16", "bfloat16", "bfloat16", False),
}


def test_the_built_in_policies_are_the_published_table():
    assert set(POLICIES) == set(PUBLISHED)
    for name, (matmul, softmax, layernorm, elementwise, strict) in PUBLISHED.items():
        policy = POLICIES[name]
        assert dict(policy.classes) == {
            "matmul": matmul, "softmax": softmax, "layernorm": layernorm, "elementwise": elementwise,
        }, name
        assert policy.strict_reductions is strict, name


def test_the_op_class_table_places_each_onnx_op_once():
    seen = {}
    for op_class in OP_CLASSES.values():
        for op in op_class.onnx_ops:
            assert op not in seen, f"{op} in {seen.get(op)} and {op_class.name}"
            seen[op] = op_class.name
    assert op_class_of_onnx_op("MatMul") == op_class_of_onnx_op("Gemm") == "matmul"
    assert op_class_of_onnx_op("Softmax") == "softmax"
    assert op_class_of_onnx_op("LayerNormalization") == "layernorm"
    # A standalone reduction in an exported graph is residual-stream arithmetic; a
    # decomposed LayerNorm's reductions are tagged layernorm by the converter.
    for op in ("ReduceMean", "Pow", "Sqrt", "Add", "Erf"):
        assert op_class_of_onnx_op(op) == "elementwise", op
    assert op_class_of_onnx_op("Reshape") is None


def test_reference_and_gating_defaults():
    assert REFERENCE_POLICY.is_reference
    assert {p.name for p in POLICIES.values() if p.gated_by_default} == {"fp32", "hybrid"}


def test_unknown_precision_names_the_known_ones():
    with pytest.raises(UnknownPrecisionError, match="known precisions: fp32, hybrid, fp16.*file:PATH"):
        get_policy("fp8")


def test_policy_rejects_unknown_dtype_and_missing_classes():
    with pytest.raises(PolicyError, match="softmax dtype 'float8'"):
        PrecisionPolicy("x", "", {"matmul": "float16", "softmax": "float8", "layernorm": "float32", "elementwise": "float32"})
    with pytest.raises(PolicyError, match="missing \\['elementwise'\\]"):
        PrecisionPolicy("x", "", {"matmul": "float16", "softmax": "float32", "layernorm": "float32"})


TOML = """
schema = 1
name = "keep-last-layer"
description = "fp16 with the last layer's LayerNorms in FP32"
base = "fp16"

[classes]
softmax = "fp32"

[[overrides]]
module = "encoder.layer.1"
op_class = "layernorm"
dtype = "float32"

[[overrides]]
node = "node_MatMul_7"
dtype = "fp32"
"""


def test_a_toml_policy_file_with_base_aliases_and_overrides(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(TOML)
    policy = get_policy(f"file:{path}")
    assert policy.name == "keep-last-layer" and policy.source == str(path.resolve())
    assert len(policy.source_sha256) == 64 and policy.gated_by_default  # files are gated unless they say not
    assert dict(policy.classes) == {"matmul": "float16", "softmax": "float32", "layernorm": "float16", "elementwise": "float16"}
    # A module override covers the module and what is inside it, by whole path components.
    assert policy.dtype_of("layernorm", module="encoder.layer.1.output.LayerNorm") == "float32"
    assert policy.dtype_of("layernorm", module="encoder.layer.10.output.LayerNorm") == "float16"
    assert policy.dtype_of("matmul", module="encoder.layer.1.output.dense") == "float16"  # op_class limits it
    assert policy.dtype_of("matmul", node="node_MatMul_7") == "float32"
    assert policy.has_node_overrides
    assert policy.fingerprint != get_policy("fp16").fingerprint


def test_written_policy_files_read_back_the_same(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(TOML)
    policy = load_policy_file(path)
    again = load_policy_file(write_policy_file(policy, tmp_path / "copy.json"))
    assert again.fingerprint == policy.fingerprint and again.name == policy.name
    assert json.loads((tmp_path / "copy.json").read_text())["schema"] == 1


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"name": "x", "base": "fp16"}', "schema None is not supported"),
        ('{"schema": 1, "name": "hybrid", "base": "fp16"}', "is a built-in policy's"),
        ('{"schema": 1, "name": "x", "classes": {"matmul": "float16"}}', "no dtype for softmax, layernorm, elementwise"),
        ('{"schema": 1, "name": "x", "base": "fp16", "colour": 1}', "unknown keys \\['colour'\\]"),
        ('{"schema": 1, "name": "x", "base": "fp8"}', "base 'fp8' is not a built-in policy"),
        ('{"schema": 1, "name": "x", "base": "fp16", "classes": {"matmul": "int8"}}', "unknown dtype 'int8'"),
        ('{"schema": 1, "name": "x", "base": "fp16", "overrides": [{"module": "a", "dtype": "float32", "op_class": "elementwise"}]}',
         "elementwise cannot be overridden per module"),
        ('{"schema": 1, "name": "x", "base": "fp16", "overrides": [{"module": "a", "node": "b", "dtype": "float32"}]}',
         "exactly one of module"),
        ("{not json", "does not parse as JSON"),
    ],
)
def test_bad_policy_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PolicyError, match=message):
        get_policy(f"file:{path}")


def test_a_missing_policy_file_or_suffix_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        get_policy(f"file:{tmp_path / 'nope.json'}")
    (tmp_path / "p.yaml").write_text("schema: 1")
    with pytest.raises(PolicyError, match="use a .json or .toml file"):
        get_policy(f"file:{tmp_path / 'p.yaml'}")
