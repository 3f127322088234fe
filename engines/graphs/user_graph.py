"""A user's own ONNX graph as a model (``--onnx NAME=PATH``): checked at start-up, its FP32 graph the reference.

ML-infra users hold exported graphs, not only Hugging Face models.  A BERT- or GPT-2-style graph with int64
``input_ids`` and ``attention_mask`` inputs ([batch, sequence]) and one float output ([batch, sequence,
features]) is taken as it is: its FP32 graph is the reference, the precision policies convert it (node
overrides of policy files apply; module overrides need the module names only this suite's own exports carry),
and every ONNX backend (onnxrt, onnx-torch, trt, trt-rtx) runs it.  The PyTorch backends cannot.

:func:`inspect_graph` refuses, with the reason, a graph whose file or external data is missing, whose
inputs or output are not of that shape, that holds ops the precision converter cannot place, or that does
not run on the CPU (one tiny batch through ONNX Runtime, which also gives the output width).  The vocabulary
size is the row count of the embedding table that ``input_ids`` index; the position limit, that of the
largest other embedding table (else 512, and the model's notes say so).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from engines.workers import onnxruntime_session_options

INPUTS = ("input_ids", "attention_mask")
DEFAULT_MAX_POSITIONS = 512


class UserGraphError(ValueError):
    """A user's ONNX graph that this suite cannot take; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class UserGraph:
    name: str
    path: Path
    sha256: str  # of the graph file and its external data files, in order
    vocab_size: int
    max_positions: int
    output_width: int
    notes: tuple[str, ...] = ()


def _external_data_files(model) -> list[str]:
    """The files, beside the graph, that hold its external data (sorted)."""
    return sorted({
        entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"
    })


def _digest(path: Path, model) -> str:
    digest = hashlib.sha256(path.read_bytes())
    for location in _external_data_files(model):
        digest.update((path.parent / location).read_bytes())
    return digest.hexdigest()


def _producers(model) -> dict[str, object]:
    return {out: node for node in model.graph.node for out in node.output}


def _derives_from(name: str, source: str, producers: dict, depth: int = 6) -> bool:
    """Whether tensor ``name`` is ``source`` or comes from it through a few single-input ops (Cast, Reshape, ...)."""
    while depth > 0:
        if name == source:
            return True
        node = producers.get(name)
        if node is None or not node.input:
            return False
        name, depth = node.input[0], depth - 1
    return False


def _embedding_tables(model) -> list[tuple[str, list[int], str]]:
    """``(table, dims, indices)`` of every Gather whose data is a 2-D initializer."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    return [
        (node.input[0], shapes[node.input[0]], node.input[1])
        for node in model.graph.node
        if node.op_type == "Gather" and node.input[0] in shapes and len(shapes[node.input[0]]) == 2
    ]


def inspect_graph(name: str, path: Path) -> UserGraph:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from engines.precision.onnx_convert import LAYOUT_OPS, NON_FLOAT_OPS, SOURCE_OPS, op_class_of_onnx_op

    fix = f"--onnx {name}=PATH takes a BERT- or GPT-2-style FP32 graph with int64 inputs {INPUTS}"
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserGraphError(f"--onnx {name}={path}: no such file; give the path of a .onnx file")
    try:
        structure = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx errors alike mean "not an ONNX model"
        raise UserGraphError(f"--onnx {name}={path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    missing = [loc for loc in _external_data_files(structure) if not (path.parent / loc).is_file()]
    if missing:
        raise UserGraphError(
            f"--onnx {name}={path}: its external data is missing ({', '.join(missing)} next to the graph); keep the "
            "weights file(s) beside the .onnx file, under the name(s) it was saved with"
        )
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # noqa: BLE001
        raise UserGraphError(f"--onnx {name}={path}: its external data does not load ({type(exc).__name__}: {exc})") from None
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:  # noqa: BLE001
        raise UserGraphError(f"--onnx {name}={path} fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    if set(inputs) != set(INPUTS):
        raise UserGraphError(f"--onnx {name}={path}: its inputs are {sorted(inputs)}; {fix}")
    for input_name, value in inputs.items():
        tensor = value.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.INT64 or len(tensor.shape.dim) != 2:
            raise UserGraphError(f"--onnx {name}={path}: input {input_name} is not int64 [batch, sequence]; {fix}")
    if len(model.graph.output) != 1:
        raise UserGraphError(f"--onnx {name}={path}: {len(model.graph.output)} outputs; {fix} and one output")
    known = LAYOUT_OPS | SOURCE_OPS | NON_FLOAT_OPS
    unknown = sorted({n.op_type for n in model.graph.node if op_class_of_onnx_op(n.op_type) is None and n.op_type not in known})
    if unknown:
        raise UserGraphError(
            f"--onnx {name}={path}: ops the precision converter cannot place: {', '.join(unknown)}; export the graph "
            "with these decomposed into standard ops (opset 17+: LayerNormalization, Softmax, MatMul, Gemm, ...)"
        )
    producers = _producers(model)
    tables = [(dims, _derives_from(indices, "input_ids", producers)) for _, dims, indices in _embedding_tables(model)]
    token_tables = [dims for dims, by_tokens in tables if by_tokens]
    if not token_tables:
        raise UserGraphError(
            f"--onnx {name}={path}: no embedding table is indexed by input_ids (a Gather of a 2-D initializer), so the "
            "vocabulary size cannot be told; export the graph with its embeddings"
        )
    vocab_size = token_tables[0][0]
    others = [dims[0] for dims, by_tokens in tables if not by_tokens and dims[0] >= 64]
    notes = []
    max_positions = max(others) if others else DEFAULT_MAX_POSITIONS
    if not others:
        notes.append(f"{name}: no position-embedding table found in {path.name}; sequences are capped at {DEFAULT_MAX_POSITIONS}")
    try:
        options = onnxruntime_session_options(ort)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ids = np.array([[1, 2]], dtype=np.int64) % vocab_size
        (output,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types
        raise UserGraphError(
            f"--onnx {name}={path} does not run in ONNX Runtime on the CPU ({str(exc).splitlines()[0]}); {fix}"
        ) from None
    if output.ndim != 3 or output.shape[:2] != ids.shape or not np.issubdtype(output.dtype, np.floating):
        raise UserGraphError(
            f"--onnx {name}={path}: its output for a [1, 2] batch has shape {list(output.shape)} and dtype "
            f"{output.dtype}; {fix} and a float output [batch, sequence, features]"
        )
    return UserGraph(name, path.resolve(), _digest(path, model), int(vocab_size), int(max_positions),
                     int(output.shape[2]), tuple(notes))


def copy_graph(source: Path, folder: Path) -> Path:
    """The graph at ``source`` (with its external data) saved into ``folder`` in this suite's layout."""
    import onnx

    from engines.graphs.export import save_graph

    return save_graph(onnx.load(str(source), load_external_data=True), folder)
