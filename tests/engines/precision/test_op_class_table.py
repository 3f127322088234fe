"""One op-class table: editing it changes the PyTorch engine, its audit and the ONNX graph alike."""

import dataclasses

import onnx
import torch

from engines.backends.torch_eager import TorchRunner
from engines.graphs.export import GRAPH_FILE
from engines.graphs.precision_graph import fp32_graph
from engines.precision import policy as policy_module
from engines.precision.onnx_convert import audit_graph, convert_graph, graph_precision
from engines.precision.policy import get_policy


def _move_layernorm_into_matmul(monkeypatch) -> None:
    """Edit the table: everything LayerNorm now belongs to the matmul class."""
    table = policy_module.OP_CLASSES
    layernorm, matmul = table["layernorm"], table["matmul"]
    monkeypatch.setitem(table, "matmul", dataclasses.replace(
        matmul,
        torch_modules=matmul.torch_modules + layernorm.torch_modules,
        torch_functions=matmul.torch_functions + layernorm.torch_functions,
        onnx_ops=matmul.onnx_ops | layernorm.onnx_ops,
        trt_layers=matmul.trt_layers + layernorm.trt_layers,
    ))
    monkeypatch.setitem(table, "layernorm", dataclasses.replace(
        layernorm, torch_modules=(), torch_functions=(), onnx_ops=frozenset(), trt_layers=()
    ))


def test_changing_the_table_changes_the_torch_engine_and_the_onnx_graph(tiny_bert, engine_cache, monkeypatch):
    hybrid = get_policy("hybrid")  # FP16 matmuls, FP32 LayerNorm
    fp32_model = onnx.load(str(fp32_graph(tiny_bert, engine_cache).file(GRAPH_FILE)))

    before_torch = TorchRunner(tiny_bert, hybrid, "cpu").build()
    before_graph, _ = convert_graph(fp32_model, hybrid)
    assert before_torch.audit.counts["layernorm"] == {"float32": 5}
    assert graph_precision(before_graph)["LayerNormalization"] == {"float32": 5}

    _move_layernorm_into_matmul(monkeypatch)
    after_torch = TorchRunner(tiny_bert, hybrid, "cpu").build()
    after_graph, _ = convert_graph(fp32_model, hybrid)
    # The torch rewrite and its audit: LayerNorms now compute in the matmul dtype, FP16.
    layer_norms = [m for m in after_torch.forward.modules() if type(m).__name__ == "PolicyLayerNorm"]
    assert layer_norms and {m.compute_dtype for m in layer_norms} == {torch.float16}
    assert "layernorm" not in after_torch.audit.counts and after_torch.audit.counts["matmul"]["float16"] > 0
    # The ONNX converter and its audit read the same table.
    assert graph_precision(after_graph)["LayerNormalization"] == {"float16": 5}
    assert not audit_graph(after_graph, hybrid, engine="edited table").problems
