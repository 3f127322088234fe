"""FP32 ONNX graph -> precision graph with explicit Casts, driven by a PrecisionPolicy.

TensorRT 11 builds only strongly typed networks: every tensor's dtype comes from
the graph, so mixed precision has to be written into it.  This converter does
that from the same op-class table as the PyTorch engine
(:data:`engines.precision.policy.OP_CLASSES`), node by node: a node's dtype is the
policy's for its op class in the module the node came from (the export's
``pkg.torch.onnx.name_scopes`` metadata, see :func:`module_path_of`) or, for a
policy file's ``node`` override, for the node by name:

* compute nodes (``MatMul``/``Gemm``, ``Softmax``, ``LayerNormalization`` and the
  reductions of their decompositions, elementwise math) run in their class's dtype:
  a float input in another dtype gets a ``Cast`` in front (one per tensor and
  dtype), a float initializer or constant is converted in place of a Cast, with
  values clamped to the target's finite range (``-3.4e38`` mask fills would
  otherwise become ``-inf`` in FP16);
* layout ops (``Reshape``, ``Transpose``, ``Gather``, ``Concat``, ...) follow the
  dtype of their data input;
* graph inputs and outputs stay as they were (int64 in, FP32 out), so every
  engine is compared on equal terms;
* with ``strict_reductions`` (``fp16-strict``), ``LayerNormalization`` and
  ``Softmax`` are first decomposed into primitive ops, so their intermediates
  (``(x - mean)^2``, ``exp``) are FP16 tensors, as in a TensorRT FP16 network
  built from a decomposed LayerNorm.

Ops this module does not know are an error naming them, never silently kept in
FP32.  :func:`graph_precision` and :func:`check_graph_policy` read the result
back and prove that each op computes in the dtype the policy asks for.
"""

from __future__ import annotations

import ast
import collections
import dataclasses

import numpy as np
from onnx import TensorProto

from engines.models import OutputForward
from engines.precision.audit import PrecisionAudit, tally
from engines.precision.policy import (
    DTYPES,
    PolicyError,
    PrecisionPolicy,
    checked_classes,
    dtype_of_onnx_type,
    onnx_type,
    op_class_of_onnx_op,
)

# Bumped whenever converted graphs change, so cached ones are rebuilt.
#   2: BF16 constants clamped to BF16's finite range (v1 turned the mask fill into -inf).
#   3: per-node dtypes from the module a node came from (policy-file overrides); the
#      decomposed ops of strict policies keep their source node's metadata.
CONVERTER_VERSION = 3
TAG_PREFIX = "fidelity."  # node-name prefix naming the op class of decomposed ops
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # torch.onnx (dynamo) metadata: the module stack of a node
SOURCE_NODE_KEY = "fidelity.source_node"  # on decomposed ops: the node they replaced

FLOAT_TYPES = frozenset(onnx_type(d) for d in DTYPES)

# Non-compute op types by behaviour; compute ops take their class from the op-class table.
LAYOUT_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "GatherElements",
     "GatherND", "Expand", "Identity", "Flatten", "Tile"}
)
# Ops whose float outputs do not depend on float inputs' values
# (they produce floats from ints/bools, or floats from shapes).
SOURCE_OPS = frozenset({"Cast", "ConstantOfShape", "Constant", "Range"})
# Ops that never carry float data in these graphs.
NON_FLOAT_OPS = frozenset(
    {"Shape", "Size", "And", "Or", "Not", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "NonZero",
     "ArgMax"}
)


class UnsupportedOpError(ValueError):
    """The converter met an op type it cannot place."""


class GraphPolicyError(AssertionError):
    """A converted graph does not compute in the dtypes its policy asks for."""


def op_class_of(node) -> str | None:
    """The policy op class a node computes in, or None for layout/non-float ops."""
    if node.name.startswith(TAG_PREFIX):
        tagged = node.name[len(TAG_PREFIX) :].split("/", 1)[0]
        return None if tagged == "cast" else tagged
    return op_class_of_onnx_op(node.op_type)


def module_path_of(node) -> str | None:
    """The path, inside the transformers model, of the module a node was exported from; None if unknown.

    torch.onnx's dynamo exporter stores the module stack of every node as metadata
    (``['', 'model', 'model.encoder', ..., 'model.encoder.layer.0.output.dense', 'linear_5']``):
    the deepest module is the one before the op's own name, and the exported wrapper's
    attribute (:attr:`engines.models.OutputForward.MODEL_ATTRIBUTE`) is its prefix.
    Graphs from elsewhere (a user's ONNX file) have none: only node overrides apply there.
    """
    for prop in node.metadata_props:
        if prop.key != NAME_SCOPES_KEY:
            continue
        try:
            scopes = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError):
            return None
        modules = [s for s in scopes[:-1] if s]
        if not modules:
            return None
        prefix = OutputForward.MODEL_ATTRIBUTE
        deepest = modules[-1]
        if deepest == prefix:
            return None
        return deepest.removeprefix(f"{prefix}.")
    return None


def node_dtype(policy: PrecisionPolicy, op_class: str, node) -> str:
    """The dtype ``node`` (of ``op_class``) must compute in under ``policy``."""
    return policy.dtype_of(op_class, module=module_path_of(node), node=_source_name(node))


def _source_name(node) -> str:
    """A decomposed op answers to the node it replaced."""
    for prop in node.metadata_props:
        if prop.key == SOURCE_NODE_KEY:
            return prop.value
    return node.name


def _tagged(new_nodes, source) -> list:
    """``new_nodes`` carrying ``source``'s metadata (module scope) and name, for overrides."""
    for new in new_nodes:
        for prop in source.metadata_props:
            new.metadata_props.add(key=prop.key, value=prop.value)
        new.metadata_props.add(key=SOURCE_NODE_KEY, value=source.name)
    return new_nodes


def check_graph_overrides(model, policy: PrecisionPolicy) -> None:
    """Refuse overrides this graph cannot honour: node names it lacks, or module paths without module metadata."""
    if not policy.overrides:
        return
    nodes = [n.name for n in model.graph.node]
    modules = {m for m in (module_path_of(n) for n in model.graph.node) if m}
    problems = [o.describe() for o in policy.unmatched_overrides(nodes=nodes) if o.node is not None]
    if not modules:
        problems += [
            f"{o.describe()} (this graph carries no module names: it was not exported by this suite)"
            for o in policy.overrides
            if o.module is not None
        ]
    if problems:
        raise PolicyError(
            f"policy {policy.name!r} ({policy.source}): override(s) {'; '.join(problems)} match nothing in this "
            f"ONNX graph; node names look like {nodes[min(3, len(nodes) - 1)]!r}"
        )


# --- decomposition for strict reductions --------------------------------------------------


def _decompose(model) -> None:
    """Replace LayerNormalization and Softmax by primitive ops, tagged with their class."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = []
    extra_inits = []
    for index, node in enumerate(graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = int(attrs.get("axis", -1))
        if node.op_type == "LayerNormalization" and axis == -1:
            tag = f"{TAG_PREFIX}layernorm/{index}"
            x, scale = node.input[0], node.input[1]
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            axes = f"{tag}/axes"
            eps = f"{tag}/eps"
            extra_inits += [
                numpy_helper.from_array(np.array([-1], dtype=np.int64), axes),
                numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), dtype=np.float32), eps),
                numpy_helper.from_array(np.array(2.0, dtype=np.float32), f"{tag}/two"),
            ]
            names = {k: f"{tag}/{k}" for k in ("mean", "centered", "squared", "variance", "shifted", "std", "normed", "scaled")}
            decomposed = [
                helper.make_node("ReduceMean", [x, axes], [names["mean"]], name=f"{tag}/mean", keepdims=1),
                helper.make_node("Sub", [x, names["mean"]], [names["centered"]], name=f"{tag}/sub"),
                helper.make_node("Pow", [names["centered"], f"{tag}/two"], [names["squared"]], name=f"{tag}/pow"),
                helper.make_node("ReduceMean", [names["squared"], axes], [names["variance"]], name=f"{tag}/var", keepdims=1),
                helper.make_node("Add", [names["variance"], eps], [names["shifted"]], name=f"{tag}/add_eps"),
                helper.make_node("Sqrt", [names["shifted"]], [names["std"]], name=f"{tag}/sqrt"),
                helper.make_node("Div", [names["centered"], names["std"]], [names["normed"]], name=f"{tag}/div"),
            ]
            if bias:
                decomposed += [
                    helper.make_node("Mul", [names["normed"], scale], [names["scaled"]], name=f"{tag}/scale"),
                    helper.make_node("Add", [names["scaled"], bias], [node.output[0]], name=f"{tag}/bias"),
                ]
            else:
                decomposed.append(helper.make_node("Mul", [names["normed"], scale], [node.output[0]], name=f"{tag}/scale"))
            nodes += _tagged(decomposed, node)
        elif node.op_type == "Softmax":
            tag = f"{TAG_PREFIX}softmax/{index}"
            axes = f"{tag}/axes"
            extra_inits.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), axes))
            x = node.input[0]
            nodes += _tagged([
                helper.make_node("ReduceMax", [x, axes], [f"{tag}/max"], name=f"{tag}/max", keepdims=1),
                helper.make_node("Sub", [x, f"{tag}/max"], [f"{tag}/shifted"], name=f"{tag}/sub"),
                helper.make_node("Exp", [f"{tag}/shifted"], [f"{tag}/exp"], name=f"{tag}/exp"),
                helper.make_node("ReduceSum", [f"{tag}/exp", axes], [f"{tag}/sum"], name=f"{tag}/sum", keepdims=1),
                helper.make_node("Div", [f"{tag}/exp", f"{tag}/sum"], [node.output[0]], name=f"{tag}/div"),
            ], node)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra_inits)


# --- conversion -------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionStats:
    casts_inserted: int = 0
    constants_converted: int = 0
    values_clamped: int = 0
    decomposed: bool = False


def _infer_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types: dict[str, int] = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _constant_values(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _to_dtype(array: np.ndarray, dtype: str, stats: ConversionStats) -> np.ndarray:
    if dtype == "float32":
        return array.astype(np.float32)
    if dtype == "float16":
        limit = float(np.finfo(np.float16).max)
        clipped = np.clip(array, -limit, limit)
        stats.values_clamped += int(np.count_nonzero(clipped != array))
        return clipped.astype(np.float16)
    if dtype == "bfloat16":
        import ml_dtypes  # onnx's own dependency; numpy has no bfloat16

        # FP32's extremes (the -3.4e38 mask fill) round *up* to infinity in BF16,
        # whose largest finite value is 3.3895e38: clamp first, as for FP16.
        limit = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
        clipped = np.clip(array, -limit, limit)
        stats.values_clamped += int(np.count_nonzero(clipped != array))
        return clipped.astype(ml_dtypes.bfloat16)
    raise ValueError(dtype)


def convert_graph(fp32_model, policy: PrecisionPolicy):
    """A new ONNX model computing as ``policy`` says; FP32 in/out. Returns ``(model, stats)``."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(fp32_model)
    check_graph_overrides(model, policy)
    stream = onnx_type(policy.dtype_of("elementwise"))
    stats = ConversionStats()
    if policy.strict_reductions:
        _decompose(model)
        stats.decomposed = True
    types = _infer_types(model)
    constants = _constant_values(model)
    graph = model.graph
    dtype_of: dict[str, int] = {name: t for name, t in types.items()}
    cast_cache: dict[tuple[str, int], str] = {}
    new_inits = []
    nodes = []

    def converted_name(name: str, target: int) -> str:
        """``name`` as a tensor of onnx type ``target``: a converted constant or a Cast."""
        if dtype_of.get(name) == target:
            return name
        key = (name, target)
        if key in cast_cache:
            return cast_cache[key]
        suffix = dtype_of_onnx_type(target)
        new = f"{name}__{suffix}"
        if name in constants:
            array = _to_dtype(constants[name], suffix, stats)
            new_inits.append(numpy_helper.from_array(array, new))
            stats.constants_converted += 1
        else:
            nodes.append(helper.make_node("Cast", [name], [new], name=f"{TAG_PREFIX}cast/{new}", to=target))
            stats.casts_inserted += 1
        dtype_of[new] = target
        cast_cache[key] = new
        return new

    for node in graph.node:
        float_inputs = [i for i, name in enumerate(node.input) if name and dtype_of.get(name) in FLOAT_TYPES]
        float_outputs = [name for name in node.output if name and types.get(name) in FLOAT_TYPES]
        if not float_inputs and not float_outputs:
            nodes.append(node)
            continue
        op_class = op_class_of(node)
        if op_class is not None:
            target = onnx_type(node_dtype(policy, op_class, node))
            data_inputs = float_inputs
            if node.op_type == "Where":
                data_inputs = [i for i in float_inputs if i != 0]
            for i in data_inputs:
                node.input[i] = converted_name(node.input[i], target)
        elif node.op_type in LAYOUT_OPS:
            # Follow the data input; weight tables (Gather of an initializer) are
            # stored in the residual-stream dtype rather than cast at run time.
            data = node.input[0]
            if data in constants:
                target = stream
                node.input[0] = converted_name(data, target)
            target = dtype_of.get(node.input[0], TensorProto.FLOAT)
            for i in float_inputs[1:]:
                node.input[i] = converted_name(node.input[i], target)
        elif node.op_type in SOURCE_OPS:
            target = stream
            if node.op_type == "Cast" and float_outputs:
                for attr in node.attribute:
                    if attr.name == "to":
                        attr.i = target
            elif node.op_type == "Constant":
                target = types.get(node.output[0], TensorProto.FLOAT)  # converted where consumed
        elif node.op_type in NON_FLOAT_OPS:
            # Comparisons of floats need one dtype on both sides.
            target = dtype_of.get(node.input[float_inputs[0]]) if float_inputs else TensorProto.BOOL
            for i in float_inputs[1:]:
                node.input[i] = converted_name(node.input[i], target)
        else:
            raise UnsupportedOpError(
                f"the precision converter does not know how to place {node.op_type!r} (node {node.name!r}); "
                "add its op class to OP_CLASSES in engines/precision/policy.py, or its behaviour to "
                "engines/precision/onnx_convert.py"
            )
        for name in float_outputs:
            dtype_of[name] = target
        nodes.append(node)

    # Outputs stay FP32: rename the low-precision tensor and cast it back.
    for output in graph.output:
        if dtype_of.get(output.name) != TensorProto.FLOAT and dtype_of.get(output.name) in FLOAT_TYPES:
            low = f"{output.name}__{dtype_of_onnx_type(dtype_of[output.name])}"
            for node in nodes:
                node.output[:] = [low if o == output.name else o for o in node.output]
                node.input[:] = [low if i == output.name else i for i in node.input]
            nodes.append(helper.make_node("Cast", [low], [output.name], name=f"{TAG_PREFIX}cast/output", to=TensorProto.FLOAT))
            stats.casts_inserted += 1
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    # Constants now used only through converted copies are dropped.
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    model.doc_string = f"precision policy {policy.name}: {policy.summary()} (converter v{CONVERTER_VERSION})"
    onnx.checker.check_model(model, full_check=False)
    return model, stats


# --- verification -------------------------------------------------------------------------


def _compute_nodes(model, types: dict[str, int]):
    """``(node, op_class, [float input dtypes, in input order])`` for every float compute node."""
    for node in model.graph.node:
        op_class = op_class_of(node)
        if op_class is None:
            continue
        data = node.input[1:] if node.op_type == "Where" else node.input  # Where's condition is bool
        dtypes = [types[name] for name in data if name and types.get(name) in FLOAT_TYPES]
        if dtypes:
            yield node, op_class, dtypes


def graph_precision(model, types: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
    """``{op_type: {dtype: node count}}`` over the float compute nodes of ``model``."""
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node, op_class, dtypes in _compute_nodes(model, types or _infer_types(model)):
        key = node.op_type if not node.name.startswith(TAG_PREFIX) else f"{node.op_type}({op_class})"
        table[key][dtype_of_onnx_type(dtypes[0])] += 1
    return {op: dict(counts) for op, counts in sorted(table.items())}


def audit_graph(model, policy: PrecisionPolicy, *, engine: str) -> PrecisionAudit:
    """Every compute node's input dtypes against the policy's dtype for that node: the ONNX engines' audit."""
    types = _infer_types(model)
    problems = []
    seen: list[tuple[str, str]] = []
    for node, op_class, dtypes in _compute_nodes(model, types):
        names = sorted({dtype_of_onnx_type(d) for d in dtypes})
        seen.append((op_class, names[0]))
        want = node_dtype(policy, op_class, node)
        if names != [want]:
            where = module_path_of(node)
            problems.append(
                f"{node.op_type} {node.name!r} ({op_class}{', in ' + where if where else ''}) computes in {names}, "
                f"policy says {want}"
            )
    present = {c for c, _ in seen}
    for op_class in checked_classes():
        if op_class not in present:
            problems.append(f"no {op_class} node found: the graph's precision cannot be verified")
    for output in model.graph.output:
        if output.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"graph output {output.name!r} is not FP32")
    return PrecisionAudit(
        engine=engine,
        policy=policy.name,
        method="the ONNX precision graph's compute nodes, read back from the file",
        counts=tally(seen),
        problems=problems,
        blind_spots=["how the runtime executes each node (its kernels may accumulate in FP32)"],
        details={"graph_dtypes": graph_precision(model, types)},
    )


def expected_node_dtypes(model, policy: PrecisionPolicy) -> dict[str, tuple[str, str]]:
    """``{node name: (op class, dtype)}`` for every compute node of a checked op class (what a TensorRT network
    parsed from ``model`` must keep, layer by layer: the parser names layers after their nodes)."""
    checked = set(checked_classes())
    return {
        node.name: (op_class, node_dtype(policy, op_class, node))
        for node, op_class, _ in _compute_nodes(model, _infer_types(model))
        if op_class in checked
    }


def check_graph_policy(model, policy: PrecisionPolicy) -> dict[str, dict[str, int]]:
    """Raise unless every compute node runs in its dtype under ``policy``; return the dtype table."""
    audit = audit_graph(model, policy, engine="precision graph")
    if audit.problems:
        raise GraphPolicyError(
            f"precision graph for {policy.name!r} does not match its policy:\n  - " + "\n  - ".join(audit.problems[:20])
        )
    return audit.details["graph_dtypes"]
