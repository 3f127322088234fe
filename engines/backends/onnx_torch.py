"""Run an ONNX precision graph with torch ops, on CPU or CUDA: backend ``onnx-torch``.

Neither onnxruntime-gpu nor TensorRT is on the lent GPU, yet the graphs TensorRT
would build must be checked with real FP16/BF16 arithmetic on a GPU.  This is a
small interpreter for the op set that exported BERT and GPT-2 graphs use: each
node runs as the matching torch op on tensors of the dtypes the graph declares,
so every intermediate is stored in its graph dtype (an FP16 ``Pow`` output
overflows at 65504 as it would in an FP16 TensorRT layer).  Like TensorRT's
kernels, torch's half GEMMs, ``softmax`` and ``layer_norm`` accumulate in FP32;
the strict graphs decompose the latter two into primitive ops.

It is a checker, not a fast engine: shapes are read back to the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from onnx import TensorProto
from torch.nn import functional as F

from engines.backends.base import EngineInfo, Runner
from engines.batch import TokenBatch
from engines.precision.policy import DTYPES, onnx_type, torch_dtype

# ONNX element type -> torch dtype: the policy's float dtypes from the one dtype
# table, plus the integer, boolean and FP64 types these graphs also carry.
_ONNX_DTYPES = {
    **{onnx_type(name): torch_dtype(name) for name in DTYPES},
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT8: torch.int8,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
    TensorProto.DOUBLE: torch.float64,
}


class UnsupportedGraphError(NotImplementedError):
    pass


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _same_float_dtype(op: str, *tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if len(dtypes) > 1:
        raise UnsupportedGraphError(f"{op} mixes {sorted(map(str, dtypes))}: the graph is not strongly typed")


def _binary(fn: Callable) -> Callable:
    def run(node, inputs, attrs):
        a, b = inputs
        _same_float_dtype(node.op_type, a, b)
        return [fn(a, b)]

    return run


def _div(node, inputs, attrs):
    a, b = inputs
    _same_float_dtype("Div", a, b)
    if a.is_floating_point():
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]


def _reshape(node, inputs, attrs):
    data, shape = inputs
    target = _ints(shape)
    if not attrs.get("allowzero", 0):
        target = [data.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return [data.reshape(target)]


def _slice(node, inputs, attrs):
    data, starts, ends = inputs[:3]
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(_ints(starts))))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(axes)
    index = [slice(None)] * data.dim()
    for start, end, axis, step in zip(_ints(starts), _ints(ends), axes, steps):
        if step < 0:
            raise UnsupportedGraphError("Slice with negative steps")
        size = data.shape[axis]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        index[axis % data.dim()] = slice(start, end, step)
    return [data[tuple(index)]]


def _gather(node, inputs, attrs):
    data, indices = inputs
    axis = attrs.get("axis", 0) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return [torch.index_select(data, axis, indices.reshape(-1)).reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])]


def _gather_nd(node, inputs, attrs):
    data, indices = inputs
    batch_dims = attrs.get("batch_dims", 0)
    if batch_dims != 0:
        raise UnsupportedGraphError("GatherND with batch_dims != 0")
    depth = indices.shape[-1]
    flat = indices.reshape(-1, depth)
    gathered = data[tuple(flat[:, i] for i in range(depth))]
    return [gathered.reshape(*indices.shape[:-1], *data.shape[depth:])]


def _expand(node, inputs, attrs):
    data, shape = inputs
    target = torch.broadcast_shapes(tuple(data.shape), tuple(_ints(shape)))
    return [data.expand(target)]


def _split(node, inputs, attrs):
    data = inputs[0]
    axis = attrs.get("axis", 0)
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = _ints(inputs[1])
    else:
        parts = attrs.get("num_outputs", len(node.output))
        size = -(-data.shape[axis] // parts)
        sizes = [min(size, data.shape[axis] - i * size) for i in range(parts)]
    return list(torch.split(data, sizes, dim=axis))


def _reduce(fn: Callable) -> Callable:
    def run(node, inputs, attrs):
        data = inputs[0]
        keep = bool(attrs.get("keepdims", 1))
        axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
        if axes is None:
            axes = list(range(data.dim()))
        return [fn(data, tuple(axes), keep)]

    return run


def _layer_norm(node, inputs, attrs):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    shape = x.shape[axis:]
    _same_float_dtype("LayerNormalization", *(t for t in (x, scale, bias) if t is not None))
    return [F.layer_norm(x, shape, scale, bias, attrs.get("epsilon", 1e-5))]


def _gemm(node, inputs, attrs):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    _same_float_dtype("Gemm", *(t for t in (a, b, c) if t is not None))
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    out = (a @ b) * attrs.get("alpha", 1.0) if attrs.get("alpha", 1.0) != 1.0 else a @ b
    if c is not None:
        out = out + c * attrs.get("beta", 1.0) if attrs.get("beta", 1.0) != 1.0 else out + c
    return [out]


def _matmul(node, inputs, attrs):
    _same_float_dtype("MatMul", *inputs)
    return [torch.matmul(inputs[0], inputs[1])]


def _cast(node, inputs, attrs):
    return [inputs[0].to(_ONNX_DTYPES[attrs["to"]])]


def _constant_of_shape(node, inputs, attrs):
    from onnx import numpy_helper

    value = attrs.get("value")
    fill = torch.from_numpy(np.array(numpy_helper.to_array(value))).reshape(-1) if value is not None else torch.zeros(1)
    return [torch.full(_ints(inputs[0]), fill[0].item(), dtype=fill.dtype, device=inputs[0].device)]


def _where(node, inputs, attrs):
    cond, a, b = inputs
    _same_float_dtype("Where", a, b)
    return [torch.where(cond, a, b)]


def _variadic(fn: Callable) -> Callable:
    def run(node, inputs, attrs):
        _same_float_dtype(node.op_type, *inputs)
        out = inputs[0]
        for other in inputs[1:]:
            out = fn(out, other)
        return [out]

    return run


OPS: dict[str, Callable] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Sqrt": lambda n, i, a: [torch.sqrt(i[0])],
    "Exp": lambda n, i, a: [torch.exp(i[0])],
    "Erf": lambda n, i, a: [torch.erf(i[0])],
    "Tanh": lambda n, i, a: [torch.tanh(i[0])],
    "Neg": lambda n, i, a: [torch.neg(i[0])],
    "Reciprocal": lambda n, i, a: [torch.reciprocal(i[0])],
    "Relu": lambda n, i, a: [torch.relu(i[0])],
    "Not": lambda n, i, a: [torch.logical_not(i[0])],
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Where": _where,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Softmax": lambda n, i, a: [torch.softmax(i[0], dim=a.get("axis", -1))],
    "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce(lambda x, axes, keep: x.mean(dim=axes, keepdim=keep)),
    "ReduceSum": _reduce(lambda x, axes, keep: x.sum(dim=axes, keepdim=keep)),
    "ReduceMax": _reduce(lambda x, axes, keep: x.amax(dim=axes, keepdim=keep)),
    "Cast": _cast,
    "Shape": lambda n, i, a: [
        torch.tensor(list(i[0].shape)[a.get("start", 0) : a.get("end", None)], dtype=torch.int64, device=i[0].device)
    ],
    "Reshape": _reshape,
    "Transpose": lambda n, i, a: [i[0].permute(*a.get("perm", list(range(i[0].dim() - 1, -1, -1))))],
    "Squeeze": lambda n, i, a: [i[0].squeeze(tuple(_ints(i[1]))) if len(i) > 1 and i[1] is not None else i[0].squeeze()],
    "Unsqueeze": lambda n, i, a: [_unsqueeze(i[0], _ints(i[1]))],
    "Concat": lambda n, i, a: [torch.cat([t for t in i if t is not None], dim=a["axis"])],
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": lambda n, i, a: [torch.gather(i[0], a.get("axis", 0), i[1])],
    "GatherND": _gather_nd,
    "Expand": _expand,
    "Split": _split,
    "Range": lambda n, i, a: [torch.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype, device=i[0].device)],
    "ConstantOfShape": _constant_of_shape,
    "Identity": lambda n, i, a: [i[0]],
}


def _unsqueeze(data: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = data.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        data = data.unsqueeze(axis)
    return data


class OnnxTorchProgram:
    """An ONNX graph ready to run with torch on one device."""

    def __init__(self, model, device: torch.device) -> None:
        from onnx import numpy_helper

        graph = model.graph
        unknown = sorted({n.op_type for n in graph.node} - set(OPS) - {"Constant"})
        if unknown:
            raise UnsupportedGraphError(f"the onnx-torch executor has no kernel for {', '.join(unknown)}")
        self.device = device
        self.constants: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            self.constants[init.name] = self._tensor(numpy_helper.to_array(init), init.data_type)
        self.nodes = []
        for node in graph.node:
            if node.op_type == "Constant":
                value = _attrs(node)["value"]
                self.constants[node.output[0]] = self._tensor(numpy_helper.to_array(value), value.data_type)
            else:
                self.nodes.append((node, _attrs(node), OPS[node.op_type]))
        self.input_names = [i.name for i in graph.input if i.name not in self.constants]
        self.output_names = [o.name for o in graph.output]
        # Free each intermediate after its last use: GPT-2 logits graphs are large.
        last_use: dict[str, int] = {}
        for index, (node, _, _) in enumerate(self.nodes):
            for name in node.input:
                last_use[name] = index
        self._release = {i: [n for n, last in last_use.items() if last == i and n not in self.constants] for i in range(len(self.nodes))}

    def _tensor(self, array: np.ndarray, elem_type: int) -> torch.Tensor:
        if elem_type == TensorProto.BFLOAT16:  # numpy holds the raw bits
            bits = np.ascontiguousarray(array).view(np.uint16).astype(np.int16)
            return torch.from_numpy(bits).view(torch.bfloat16).to(self.device)
        return torch.from_numpy(np.array(array, copy=True)).to(self.device)

    @torch.inference_mode()
    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = dict(self.constants)
        values.update(feeds)
        for index, (node, attrs, kernel) in enumerate(self.nodes):
            inputs = [values[name] if name else None for name in node.input]
            try:
                outputs = kernel(node, inputs, attrs)
            except UnsupportedGraphError:
                raise
            except Exception as exc:  # noqa: BLE001 - name the node, keep the cause
                raise RuntimeError(f"onnx-torch: node {node.name!r} ({node.op_type}) failed: {exc}") from exc
            for name, value in zip(node.output, outputs):
                if name:
                    values[name] = value
            for name in self._release[index]:
                if name not in self.output_names:
                    values.pop(name, None)
        return {name: values[name] for name in self.output_names}


class OnnxTorchRunner(Runner):
    """The policy's ONNX precision graph, executed node by node with torch."""

    backend: ClassVar[str] = "onnx-torch"

    def __init__(self, model, policy, device: str, options=None) -> None:
        super().__init__(model, policy, device, options)
        self.graph = None
        self.program = None

    def _build(self) -> None:
        from engines.cache import EngineCache
        from engines.graphs.export import load_graph
        from engines.graphs.precision_graph import precision_graph, verified_audit

        self.graph = precision_graph(self.model, self.policy, self.options.cache or EngineCache())
        self.audit = verified_audit(self.graph, self.policy, engine=self.name)
        self.program = OnnxTorchProgram(load_graph(self.graph.path), self.device)

    def _run(self, staged: TokenBatch) -> torch.Tensor:
        return self.program.run({"input_ids": staged.input_ids, "attention_mask": staged.attention_mask})["output"]

    def _close(self) -> None:
        self.program = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _info(self) -> EngineInfo:
        details = {
            "graph": str(self.graph.path) if self.graph else None,
            "graph_dtypes": self.graph.dtypes if self.graph else None,
        }
        return EngineInfo(self.backend, f"torch {torch.__version__} ONNX interpreter", str(self.device), "node by node", details)


class OnnxReferenceRunner(OnnxTorchRunner):
    """The FP32 reference of a user's ONNX graph (``--onnx``): the graph itself, FP32, interpreted node by node.

    Like the PyTorch reference, every call runs under deterministic kernels with TF32 off.
    """

    backend: ClassVar[str] = "onnx-reference"

    def _build(self) -> None:
        from engines.cache import EngineCache
        from engines.graphs.export import GRAPH_FILE, load_graph
        from engines.graphs.precision_graph import fp32_graph
        from engines.precision.onnx_convert import audit_graph

        if not self.policy.is_reference:
            raise ValueError("the reference engine runs FP32 only")
        entry = fp32_graph(self.model, self.options.cache or EngineCache())
        graph = load_graph(entry.file(GRAPH_FILE))
        self.audit = audit_graph(graph, self.policy, engine=self.name)
        self.program = OnnxTorchProgram(graph, self.device)

    def _run(self, staged: TokenBatch) -> torch.Tensor:
        from engines.numerics import REFERENCE_NUMERICS, applied

        with applied(REFERENCE_NUMERICS):
            return super()._run(staged).float()

    def _info(self) -> EngineInfo:
        return dataclasses.replace(super()._info(), mode="the user's FP32 ONNX graph, node by node, deterministic kernels")
