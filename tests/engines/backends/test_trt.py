"""TensorRT: real TensorRT for RTX builds on this CPU machine (ahead of time, for SM80); full TensorRT where it imports.

Every TensorRT output these tests read (parsed networks, builder logs, kernel reports) comes from a real build in
the same test session; nothing is written by hand.
"""

import json
from pathlib import Path

import onnx
import pytest
import torch

from engines.backends.base import BackendUnavailableError, BuildOptions
from engines.batch import InvalidInputError
from engines.cache import EngineCache, ForeignEntryError
from engines.graphs.export import GRAPH_FILE
from engines.graphs.precision_graph import fp32_graph, precision_graph
from engines.precision.onnx_convert import expected_node_dtypes
from engines.precision.policy import get_policy

trt_rtx = pytest.importorskip("tensorrt_rtx", reason='TensorRT for RTX is not installed: pip install -e ".[trt-rtx]"')

from engines.backends.trt import (  # noqa: E402 - after the import check
    ENGINE_FILE,
    KERNELS_FILE,
    RUNTIMES,
    BuiltNotRunnableError,
    ShapeProfile,
    TensorRTRTXRunner,
    _LogCollector,
    check_built_kernels,
    check_network_types,
    import_runtime,
    offered_targets,
    read_kernel_report,
    resolve_target,
)

PRECISIONS = ("fp32", "fp16", "hybrid", "bf16", "fp16-strict")
CPU = torch.device("cpu")


def build(model, precision, cache) -> BuiltNotRunnableError:
    """Build the engine on this CPU machine; it is built, checked and cached, then refuses to run here."""
    runner = TensorRTRTXRunner(model, get_policy(precision), "cpu", BuildOptions(cache=cache))
    with pytest.raises(BuiltNotRunnableError) as info:
        runner.build()
    return info.value


@pytest.fixture(scope="module")
def rtx_cache(tmp_path_factory):
    return EngineCache(tmp_path_factory.mktemp("rtx-cache"))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-gpt2", "minilm"])
def test_every_precision_parses_checks_and_builds_ahead_of_time(request, rtx_cache, model_name, precision):
    if model_name == "minilm" and precision == "fp16-strict":
        pytest.skip("minilm's strict graph: covered by the tiny models; kept out to bound CI time")
    model = request.getfixturevalue(model_name.replace("-", "_"))
    error = build(model, precision, rtx_cache)
    assert "built for SM80 and cached" in str(error) and "not runnable here: there is no CUDA GPU here" in str(error)
    assert "SM80" in str(error).split("it runs on", 1)[1]  # the runtime's own list of targets
    plan = error.info.details["plan"]
    assert plan.endswith(ENGINE_FILE) and len(open(plan, "rb").read(16)) == 16
    audit = error.audit
    assert not audit.problems and "builder's layer report" in audit.method
    network = audit.details["network"]  # the parsed network's compute layers, by class and dtype
    policy = get_policy(precision)
    assert network["matmul"] == {policy.classes["matmul"]: sum(network["matmul"].values())}
    if not policy.strict_reductions:  # strict graphs decompose softmax and LayerNorm into elementwise layers
        assert set(network["softmax"]) == {policy.classes["softmax"]}
        assert set(network["layernorm"]) == {policy.classes["layernorm"]}
    assert audit.details["kernels"].get("gemm", 0) > 0


def test_hybrid_softmax_inside_fused_attention_is_reported_as_unseen(tiny_bert, rtx_cache):
    """What the post-build check cannot see, it says: TensorRT fuses QK^T, the FP32 softmax and PV into one kernel."""
    audit = build(tiny_bert, "hybrid", rtx_cache).audit
    unseen = [b for b in audit.blind_spots if "(softmax, policy float32) runs inside" in b]
    assert len(unseen) == 2 and all("together with GEMMs" in b for b in unseen), audit.blind_spots


def test_a_graph_that_breaks_the_policy_is_caught_before_the_build(tiny_gpt2, rtx_cache):
    """The FP32 graph parsed by the real parser, held to hybrid's dtypes: every GEMM layer is wrong."""
    graph = fp32_graph(tiny_gpt2, rtx_cache).file(GRAPH_FILE)
    expected = expected_node_dtypes(onnx.load(str(graph), load_external_data=False), get_policy("hybrid"))
    runner = TensorRTRTXRunner(tiny_gpt2, get_policy("hybrid"), "cpu", BuildOptions(cache=rtx_cache))
    _builder, network, _parser = runner.parse(graph, _LogCollector(trt_rtx))
    problems, seen = check_network_types(network, expected, get_policy("hybrid"), trt_rtx)
    matmuls = sum(1 for op_class, _ in seen if op_class == "matmul")
    assert matmuls == 13 and sum("(matmul) takes float32, policy says float16" in p for p in problems) == matmuls
    assert not [p for p in problems if "softmax" in p or "layernorm" in p]  # those are FP32 in both


def test_the_kernel_check_fails_an_engine_built_in_other_dtypes(tiny_bert, rtx_cache):
    """The real kernel report of the hybrid engine, held to the FP32 policy: its half GEMMs are caught."""
    policy = get_policy("hybrid")
    entry = build(tiny_bert, "hybrid", rtx_cache).info.details["plan"]
    _network, kernels = read_kernel_report(Path(entry).parent / KERNELS_FILE)
    graph = precision_graph(tiny_bert, policy, rtx_cache)
    as_fp32 = expected_node_dtypes(onnx.load(str(graph.path), load_external_data=False), get_policy("fp32"))
    problems, _ = check_built_kernels(kernels, as_fp32, get_policy("fp32"))
    assert any("runs in GEMM kernel" in p and "taking ['Half'], policy says float32" in p for p in problems), problems
    assert any("the FP32 engine has reduced-precision tensors ['Half']" in p for p in problems)
    # ... and against its own policy, the same report passes.
    assert check_built_kernels(kernels, expected_node_dtypes(onnx.load(str(graph.path), load_external_data=False), policy), policy)[0] == []
    assert check_built_kernels([], {}, policy)[0][0].startswith("the builder printed no layer report")


def test_a_second_session_loads_the_plan_without_building(tiny_gpt2, tmp_path):
    first = EngineCache(tmp_path)
    build(tiny_gpt2, "fp16", first)
    second = EngineCache(tmp_path)  # a new process would make a new cache object on the same folder
    build(tiny_gpt2, "fp16", second)
    outcomes = {e.kind: e.outcome for e in second.events}
    assert outcomes == {"onnx-fp32": "hit", "onnx-precision": "hit", "trt-engine": "hit"}


def test_a_corrupt_cached_plan_is_rebuilt(tiny_gpt2, tmp_path):
    cache = EngineCache(tmp_path)
    plan = build(tiny_gpt2, "fp16", cache).info.details["plan"]
    with open(plan, "r+b") as handle:
        handle.truncate(1000)
    again = EngineCache(tmp_path)
    with pytest.warns(UserWarning, match="is corrupt"):
        build(tiny_gpt2, "fp16", again)
    assert [e.outcome for e in again.events if e.kind == "trt-engine"] == ["rebuilt-corrupt"]


def test_a_plan_recorded_for_another_runtime_version_is_refused(tiny_gpt2, tmp_path):
    cache = EngineCache(tmp_path)
    plan = build(tiny_gpt2, "fp16", cache).info.details["plan"]
    manifest_path = Path(plan).parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fields"]["runtime_version"] = "0.9.0"  # as if another TensorRT for RTX had written this entry
    manifest_path.write_text(json.dumps(manifest))
    runner = TensorRTRTXRunner(tiny_gpt2, get_policy("fp16"), "cpu", BuildOptions(cache=EngineCache(tmp_path)))
    with pytest.raises(ForeignEntryError, match="runtime_version='0.9.0'.*It is not loaded"):
        runner.build()


def test_targets_come_from_the_runtime(monkeypatch):
    runtime = RUNTIMES["trt-rtx"]
    offered = offered_targets(trt_rtx)
    assert "SM80" in offered and "SM90" not in offered  # Hopper: not a target of TensorRT for RTX
    assert resolve_target(trt_rtx, runtime, "auto", CPU) == "SM80"
    assert resolve_target(trt_rtx, runtime, "SM86", CPU) == "SM86"
    with pytest.raises(BackendUnavailableError, match="--trt-target SM90 is not one TensorRT for RTX"):
        resolve_target(trt_rtx, runtime, "SM90", CPU)


def test_shape_profile_clips_to_the_model_and_checks_inputs():
    profile = ShapeProfile().clipped(max_positions=256)
    assert profile.max == (32, 256) and profile.opt == (8, 128)
    profile.check((32, 256), "e")
    with pytest.raises(InvalidInputError, match="outside the engine's optimization profile"):
        profile.check((33, 8), "e")


def test_one_softmax_planted_in_fp16_is_the_one_problem_before_the_build(tiny_bert, rtx_cache, tmp_path):
    """The hybrid graph with Casts planted around one Softmax so that it computes in FP16, parsed for real."""
    from onnx import TensorProto, helper

    from engines.graphs.export import load_graph

    policy = get_policy("hybrid")
    graph = load_graph(precision_graph(tiny_bert, policy, rtx_cache).path)
    expected = expected_node_dtypes(graph, policy)
    nodes = list(graph.graph.node)
    index, softmax = next((i, n) for i, n in enumerate(nodes) if n.op_type == "Softmax")
    source, result = softmax.input[0], softmax.output[0]
    softmax.input[0], softmax.output[0] = f"{source}__planted16", f"{result}__planted16"
    nodes[index:index + 1] = [
        helper.make_node("Cast", [source], [f"{source}__planted16"], name="planted/to16", to=TensorProto.FLOAT16),
        softmax,
        helper.make_node("Cast", [f"{result}__planted16"], [result], name="planted/to32", to=TensorProto.FLOAT),
    ]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    path = tmp_path / "planted.onnx"
    onnx.save_model(graph, str(path), save_as_external_data=True, location="planted.onnx.data")
    runner = TensorRTRTXRunner(tiny_bert, policy, "cpu", BuildOptions(cache=rtx_cache))
    _builder, network, _parser = runner.parse(path, _LogCollector(trt_rtx))
    problems, _ = check_network_types(network, expected, policy, trt_rtx)
    assert problems == [f"{softmax.name} (softmax) takes float16, policy says float32"]


def test_full_tensorrt_skips_only_for_its_missing_import():
    try:
        import_runtime("trt")
    except BackendUnavailableError as exc:
        assert RUNTIMES["trt"].install_hint in str(exc)
        pytest.skip(str(exc))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "hybrid"])
def test_on_a_gpu_it_runs_where_the_runtime_does_and_says_why_where_it_does_not(tiny_bert, tmp_path, precision):
    """On a GPU TensorRT for RTX runs on (A100, RTX 30/40/50, L40S) the engine matches the FP32 reference;
    on one it refuses (Hopper) the build still completes and the skip carries the runtime's own words."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engines.backends.torch_eager import TorchReferenceRunner
    from engines.graphs.export import check_batch
    from engines.precision.policy import REFERENCE_POLICY

    runner = TensorRTRTXRunner(tiny_bert, get_policy(precision), "cuda", BuildOptions(cache=EngineCache(tmp_path)))
    try:
        runner.build()
    except BuiltNotRunnableError as exc:
        assert "not runnable here" in str(exc) and exc.info.details["plan"]
        pytest.skip(str(exc))
    batch = check_batch(tiny_bert)
    got = runner.infer(batch)
    want = TorchReferenceRunner(tiny_bert, REFERENCE_POLICY, "cuda").build().infer(batch)
    valid = batch.attention_mask.bool().cuda()
    cosine = torch.nn.functional.cosine_similarity(got[valid].double().flatten(), want[valid].double().flatten(), dim=0)
    assert cosine > 0.9998 and torch.isfinite(got[valid]).all()
    assert runner.memory().outside_allocator_bytes > 0
