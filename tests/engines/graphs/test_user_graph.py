"""A user's own ONNX graph (--onnx NAME=PATH): taken as it is, or refused at start-up with the reason."""

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from engines.graphs.export import GRAPH_FILE, load_graph
from engines.graphs.precision_graph import fp32_graph
from engines.graphs.user_graph import UserGraphError, inspect_graph


def _save(model, folder: Path, name: str = "user.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{name}.data")
    return path


@pytest.fixture(scope="module")
def user_graph(tiny_bert, engine_cache, tmp_path_factory) -> Path:
    """tiny-bert's export with the module metadata stripped: a graph as another exporter would write it."""
    model = load_graph(fp32_graph(tiny_bert, engine_cache).file(GRAPH_FILE))
    for node in model.graph.node:
        del node.metadata_props[:]
    return _save(model, tmp_path_factory.mktemp("user"))


def test_a_bert_style_graph_is_read_for_its_sizes(user_graph):
    graph = inspect_graph("mybert", user_graph)
    assert (graph.vocab_size, graph.max_positions, graph.output_width) == (30522, 512, 64)
    assert len(graph.sha256) == 64 and graph.path == user_graph.resolve()


def _edited(user_graph: Path, tmp_path: Path, edit) -> Path:
    model = onnx.load(str(user_graph), load_external_data=True)
    edit(model)
    return _save(model, tmp_path)


def _rename_input(model):
    old = model.graph.input[1].name
    model.graph.input[1].name = "mask"
    for node in model.graph.node:
        node.input[:] = ["mask" if i == old else i for i in node.input]


def _add_sin(model):
    out = model.graph.output[0].name
    last = next(n for n in model.graph.node if out in n.output)
    last.output[:] = [f"{out}__pre" if o == out else o for o in last.output]
    model.graph.node.append(helper.make_node("Sin", [f"{out}__pre"], [out], name="planted_sin"))


@pytest.mark.parametrize(
    "edit,message",
    [
        (_rename_input, "its inputs are \\['input_ids', 'mask'\\]"),
        (_add_sin, "ops the precision converter cannot place: Sin"),
    ],
)
def test_graphs_this_suite_cannot_take_are_refused_with_the_reason(user_graph, tmp_path, edit, message):
    with pytest.raises(UserGraphError, match=message):
        inspect_graph("mybert", _edited(user_graph, tmp_path, edit))


def test_missing_external_data_or_file_is_refused(user_graph, tmp_path):
    import shutil

    copy = tmp_path / "copy.onnx"
    shutil.copy(user_graph, copy)  # the graph without its .data file
    with pytest.raises(UserGraphError, match="external data is missing"):
        inspect_graph("mybert", copy)
    with pytest.raises(UserGraphError, match="no such file"):
        inspect_graph("mybert", tmp_path / "absent.onnx")


def test_a_graph_of_another_shape_is_refused(tmp_path):
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    m = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Add", ["input_ids", "attention_mask"], ["y"])], "g", [x, m], [y])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path)
    with pytest.raises(UserGraphError, match="no embedding table is indexed by input_ids"):
        inspect_graph("odd", path)
