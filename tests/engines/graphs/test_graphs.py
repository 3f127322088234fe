"""ONNX export, precision graphs and the torch ONNX interpreter, on the tiny models."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines.backends.base import BuildOptions
from engines.backends.onnx_torch import OnnxTorchProgram, OnnxTorchRunner, UnsupportedGraphError
from engines.backends.torch_eager import TorchReferenceRunner
from engines.batch import TokenBatch
from engines.graphs.export import ExportError, check_batch, load_graph, verify_export
from engines.graphs.precision_graph import fp32_graph, precision_graph, verified_audit
from engines.precision.onnx_convert import GraphPolicyError, UnsupportedOpError, check_graph_policy, convert_graph
from engines.precision.policy import POLICIES, REFERENCE_POLICY, get_policy


@pytest.fixture(scope="module", params=["tiny-bert", "tiny-gpt2"])
def model(request, offline_loader):
    return offline_loader.load(request.param)


def test_export_has_dynamic_axes_and_matches_pytorch(model, engine_cache):
    entry = fp32_graph(model, engine_cache)
    graph = onnx.load(str(entry.file("model.onnx")), load_external_data=False)
    ids = graph.graph.input[0]
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    assert ids.type.tensor_type.elem_type == TensorProto.INT64
    dims = ids.type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_param  # batch and sequence are symbolic
    assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.opset_import[0].version >= 18
    assert verify_export(model, entry.file("model.onnx")) > 0.999999


def test_an_export_that_does_not_match_is_refused(model, engine_cache, tmp_path):
    source = load_graph(fp32_graph(model, engine_cache).file("model.onnx"))
    weights = max(source.graph.initializer, key=lambda t: np.prod(t.dims))
    tampered = numpy_helper.to_array(weights) * 1.05
    weights.CopyFrom(numpy_helper.from_array(tampered.astype(np.float32), weights.name))
    onnx.save(source, str(tmp_path / "bad.onnx"))
    with pytest.raises(ExportError, match="does not match PyTorch FP32"):
        verify_export(model, tmp_path / "bad.onnx")


def test_a_corrupt_onnx_file_is_a_clear_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07not really protobuf" * 10)
    with pytest.raises(ExportError, match="is not a valid ONNX model.*re-export"):
        load_graph(tmp_path / "model.onnx")


@pytest.mark.parametrize("precision", list(POLICIES))
def test_precision_graphs_compute_as_their_policy_says(model, engine_cache, precision):
    policy = get_policy(precision)
    graph = precision_graph(model, policy, engine_cache)
    structure = onnx.load(str(graph.path), load_external_data=False)
    assert structure.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # IO stays FP32
    dtypes = check_graph_policy(structure, policy)
    matmuls = {k: v for k, v in dtypes.items() if k in ("MatMul", "Gemm")}
    assert matmuls and all(set(v) == {policy.classes["matmul"]} for v in matmuls.values())
    if policy.strict_reductions:
        assert "LayerNormalization" not in dtypes and "Softmax" not in dtypes
        for op in ("ReduceMean(layernorm)", "Pow(layernorm)", "ReduceSum(softmax)", "Exp(softmax)"):
            assert set(dtypes[op]) == {"float16"}, op
    else:
        assert set(dtypes["LayerNormalization"]) == {policy.classes["layernorm"]}
        assert set(dtypes["Softmax"]) == {policy.classes["softmax"]}
    assert verified_audit(graph, policy, engine="x")


def test_the_fp32_graph_fails_the_hybrid_check(model, engine_cache):
    fp32 = onnx.load(str(fp32_graph(model, engine_cache).file("model.onnx")), load_external_data=False)
    with pytest.raises(GraphPolicyError, match=r"MatMul .* computes in \['float32'\], policy says float16"):
        check_graph_policy(fp32, get_policy("hybrid"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_constants_are_clamped_not_infinite(model, engine_cache, precision):
    # Found on the H100: v1 of the converter turned GPT-2's -3.4e38 mask fill into
    # -inf in BF16, and left-padded batches came out NaN.
    fp32 = load_graph(fp32_graph(model, engine_cache).file("model.onnx"))
    converted, stats = convert_graph(fp32, get_policy(precision))
    assert stats.values_clamped > 0  # the -3.4e38 attention-mask fill
    for init in converted.graph.initializer:
        if init.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            assert np.isfinite(numpy_helper.to_array(init).astype(np.float32)).all(), init.name


def _single_op_model(op_type: str, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 8])
    inputs = ["x"]
    inits = []
    if op_type == "LayerNormalization":
        inits = [numpy_helper.from_array(np.ones(8, np.float32), "scale"), numpy_helper.from_array(np.zeros(8, np.float32), "bias")]
        inputs += ["scale", "bias"]
    node = helper.make_node(op_type, inputs, ["output"], name="op", **attrs)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])


def test_unknown_op_is_an_error_naming_it():
    with pytest.raises(UnsupportedOpError, match="does not know how to place 'Sin'"):
        convert_graph(_single_op_model("Sin"), get_policy("hybrid"))


def test_decomposed_fp16_layernorm_overflows_where_hybrid_does_not():
    """(x - mean)^2 beyond 65504 overflows as an FP16 tensor; hybrid keeps LayerNorm in FP32."""
    model = _single_op_model("LayerNormalization", axis=-1, epsilon=1e-5)
    x = torch.tensor([[300.0, -300.0] * 4, [1.0, 2.0] * 4])
    expected = torch.nn.functional.layer_norm(x, (8,))
    outputs = {}
    for precision in ("hybrid", "fp16", "fp16-strict"):
        converted, _ = convert_graph(model, get_policy(precision))
        outputs[precision] = OnnxTorchProgram(converted, torch.device("cpu")).run({"x": x})["output"]
    torch.testing.assert_close(outputs["hybrid"], expected)
    # LayerNormalization's own FP16 kernel accumulates in FP32 (stash_type): still right.
    torch.testing.assert_close(outputs["fp16"], expected, atol=2e-3, rtol=2e-3)
    # The decomposed FP16 LayerNorm: the variance overflows and the row collapses to 0.
    assert outputs["fp16-strict"][0].abs().max() == 0 and expected[0].abs().max() > 0.9
    torch.testing.assert_close(outputs["fp16-strict"][1], expected[1], atol=2e-3, rtol=2e-3)


def test_the_interpreter_matches_the_reference_and_refuses_unknown_ops(model, engine_cache):
    reference = TorchReferenceRunner(model, REFERENCE_POLICY, "cpu").build()
    runner = OnnxTorchRunner(model, get_policy("fp32"), "cpu", BuildOptions(cache=engine_cache)).build()
    batch = check_batch(model)
    torch.testing.assert_close(runner.infer(batch), reference.infer(batch), atol=1e-4, rtol=1e-4)
    with pytest.raises(UnsupportedGraphError, match="no kernel for Sin"):
        OnnxTorchProgram(_single_op_model("Sin"), torch.device("cpu"))


def test_interpreter_rejects_graphs_that_mix_dtypes():
    model = _single_op_model("Add")
    model.graph.node[0].input.append("x16")
    model.graph.node[0].input[:] = ["x", "x16"]
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 8), np.float16), "x16"))
    with pytest.raises(UnsupportedGraphError, match="not strongly typed"):
        OnnxTorchProgram(model, torch.device("cpu")).run({"x": torch.ones(2, 8)})


def test_onnx_engines_report_a_graph_audit(tiny_bert, engine_cache):
    runner = OnnxTorchRunner(tiny_bert, get_policy("hybrid"), "cpu", BuildOptions(cache=engine_cache)).build()
    assert runner.audit and runner.audit.counts["matmul"] == {"float16": 16}
    assert runner.info().details["graph_dtypes"]["LayerNormalization"] == {"float32": 5}
    ids = torch.tensor([[101, 2023, 102]])
    assert runner.infer(TokenBatch(ids, torch.ones_like(ids))).shape == (1, 3, 64)


def test_left_padded_gpt2_stays_finite_in_the_bf16_graph(tiny_gpt2, engine_cache):
    runner = OnnxTorchRunner(tiny_gpt2, get_policy("bf16"), "cpu", BuildOptions(cache=engine_cache)).build()
    ids = torch.tensor([[50256, 50256, 464, 3290, 318], [464, 3290, 318, 257, 1332]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = runner.infer(TokenBatch(ids, mask))
    assert torch.isfinite(out[mask.bool()]).all()


def test_policy_file_overrides_reach_the_nodes_of_their_module(tiny_bert, engine_cache, tmp_path):
    """A module override converts exactly the nodes exported from that module (their name scopes)."""
    from engines.precision.onnx_convert import module_path_of

    path = tmp_path / "keep.json"
    path.write_text(
        '{"schema": 1, "name": "fp16-keep-l1-ln", "base": "fp16-strict", "overrides": '
        '[{"module": "encoder.layer.1", "op_class": "layernorm", "dtype": "float32"}]}'
    )
    policy = get_policy(f"file:{path}")
    graph = precision_graph(tiny_bert, policy, engine_cache)
    structure = onnx.load(str(graph.path), load_external_data=False)
    assert verified_audit(graph, policy, engine="x").problems == []
    # strict: LayerNorms are decomposed; the pieces keep their source's module scope
    pieces = [n for n in structure.graph.node if n.name.startswith("fidelity.layernorm/")]
    inferred = onnx.shape_inference.infer_shapes(structure).graph
    dtype_of = {v.name: v.type.tensor_type.elem_type for v in list(inferred.value_info) + list(inferred.input)}
    dtype_of.update({i.name: i.data_type for i in structure.graph.initializer})
    for node in pieces:
        module = module_path_of(node)
        want = TensorProto.FLOAT if module.startswith("encoder.layer.1.") else TensorProto.FLOAT16
        assert dtype_of[node.input[0]] == want, (node.name, module)
    assert {module_path_of(n).startswith("encoder.layer.1.") for n in pieces} == {True, False}


def test_a_node_override_matching_no_node_is_refused(tiny_bert, engine_cache, tmp_path):
    from engines.precision.policy import PolicyError

    path = tmp_path / "typo.json"
    path.write_text('{"schema": 1, "name": "n", "base": "fp16", "overrides": [{"node": "no_such_node", "dtype": "float32"}]}')
    fp32 = load_graph(fp32_graph(tiny_bert, engine_cache).file("model.onnx"))
    with pytest.raises(PolicyError, match="no_such_node.*match nothing in this ONNX graph"):
        convert_graph(fp32, get_policy(f"file:{path}"))
