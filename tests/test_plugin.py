"""The pytest plugin end to end: option errors, and a small real fidelity session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # A compile engine of this test process wrote its cache dir into the environment;
    # the child is a fresh session and must not take it for the user's setting.
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "tiny-bert,llama"], "unknown model 'llama'; known models:"),
        (["--precisions", "fp8"], "unknown precision 'fp8'; known precisions:"),
        (["--backends", "tvm"], "unknown backend 'tvm'; known backends:"),
        (["--model-path", "minilm"], "--model-path expects NAME=DIR"),
        (["--cosine-min", "1.5"], "--cosine-min must be in (0, 1]"),
    ],
)
def test_bad_options_are_usage_errors(args, message):
    proc = run_pytest("--collect-only", "-q", "fidelity", *args, timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def _damaged_model_dir(tmp_path: Path) -> Path:
    from engines.models import ModelLoader

    folder = tmp_path / "tiny"
    ModelLoader(weights_mode="random", hub_probe=lambda: False).load("tiny-bert").module.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return folder


def _bad_input(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """The command-line arguments of one bad input, and the message its usage error must carry."""
    if case == "truncated-weights":
        return [f"--model-path=tiny-bert={_damaged_model_dir(tmp_path)}"], "model.safetensors is truncated"
    if case == "wikitext-missing":
        return [f"--wikitext-path={tmp_path / 'nope.parquet'}"], "does not exist"
    if case == "wikitext-empty":
        (tmp_path / "empty.txt").write_text("")
        return [f"--wikitext-path={tmp_path / 'empty.txt'}"], "the files hold no text"
    if case == "wikitext-garbage-parquet":
        (tmp_path / "test-0.parquet").write_bytes(b"PAR1 this is not parquet at all " * 10)
        return [f"--wikitext-path={tmp_path / 'test-0.parquet'}"], "cannot be read as parquet"
    if case == "engine-cache-is-a-file":
        (tmp_path / "cache").write_text("not a folder")
        return [f"--engine-cache={tmp_path / 'cache'}"], "is a file, not a folder"
    if case == "report-is-a-folder":
        (tmp_path / "reports").mkdir()
        return [f"--fidelity-report={tmp_path / 'reports'}"], "is a folder; give a file path such as"
    if case == "empty-models":
        return ["--models="], "--models is empty"
    if case == "missing-policy-file":
        return [f"--precisions=hybrid,file:{tmp_path / 'p.json'}"], "does not exist (or is not a file)"
    if case == "gate-unselected":
        return ["--precisions=fp32", "--gate-precisions=hybrid"], "which --precisions does not select"
    if case == "perturb-unknown-parameter":
        return ["--perturb-weight=tiny-bert/*=encoder.layer.0.output.dense.weigth:1.1"], \
            "did you mean encoder.layer.0.output.dense.weight"
    if case == "perturb-matches-nothing":
        return ["--perturb-weight=minilm/*=encoder.layer.0.output.dense.weight:1.1"], "matches none of the selected engines"
    raise AssertionError(case)


BAD_INPUTS = [
    "truncated-weights", "wikitext-missing", "wikitext-empty", "wikitext-garbage-parquet", "engine-cache-is-a-file",
    "report-is-a-folder", "empty-models", "missing-policy-file", "gate-unselected", "perturb-unknown-parameter",
    "perturb-matches-nothing",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_usage_error_at_start_up(tmp_path, case):
    args, message = _bad_input(tmp_path, case)
    proc = run_pytest("-m", "fidelity", "fidelity", "--models=tiny-bert", "--precisions=hybrid",
                      "--input-profile=ci", *args, timeout=180)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "PASSED" not in proc.stdout and "passed" not in proc.stdout  # nothing ran, nothing was built


def test_help_states_the_defaults_that_run():
    """--help is generated from the same option tables the defaults come from."""
    from engines.options import ENGINE_OPTIONS, EngineSelection
    from perf.options import PERF_OPTIONS, PerfOptions

    proc = run_pytest("--help", timeout=120)
    flat = " ".join(proc.stdout.split())
    for option in [*ENGINE_OPTIONS, *PERF_OPTIONS]:
        if option.default_text:
            assert " ".join(option.default_text.split()) in flat, option.flag
    selection = EngineSelection.from_values({"device": "cpu"})
    assert selection.backends == ["torch"]  # "those of torch,torch-cudagraph that run on --device (on a CPU machine: torch)"
    assert PerfOptions.from_values({}, device="cpu").grid == "cpu"  # "'cpu' on CPU"
    assert "(default: those of torch,torch-cudagraph that run on --device (on a CPU machine: torch))" in flat


@pytest.mark.slow
def test_an_interrupted_fidelity_run_keeps_its_rows_and_says_it_was_interrupted(tmp_path, interrupted_run):
    report = tmp_path / "r.json"
    code, output = interrupted_run(
        ["-m", "fidelity", "fidelity", "--models=tiny-bert,tiny-gpt2", "--precisions=fp32,hybrid,fp16,bf16",
         "--input-profile=ci", f"--fidelity-report={report}"],
        ROOT,
    )
    assert code == 2, output[-3000:]  # pytest's "interrupted"
    data = json.loads(report.read_text())
    assert data["interrupted"] is True
    assert data["rows"], "what was measured before Ctrl-C is kept"
    finished = [r for r in data["rows"] if not r["partial"]]
    assert finished and all(r["verdict"] in ("PASS", "measured") for r in finished)
    assert all(r["verdict"] == "PARTIAL (interrupted)" for r in data["rows"] if r["partial"])
    assert "INTERRUPTED" in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_cpu_machine_is_a_usage_error():
    proc = run_pytest("--collect-only", "-q", "fidelity", "--device", "cuda", timeout=120)
    assert proc.returncode == 4 and "sees no CUDA GPU" in proc.stderr and "Use --device cpu" in proc.stderr


@pytest.mark.slow
def test_fidelity_session_writes_a_report_covering_every_combination(tmp_path):
    report = tmp_path / "r.json"
    proc = run_pytest(
        "-m", "fidelity", "fidelity",
        "--models", "tiny-bert,tiny-gpt2",
        "--precisions", "fp32,hybrid,fp16-strict",
        "--backends", "torch,torch-cudagraph",
        "--input-profile", "ci",
        "--fidelity-report", str(report),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "fidelity summary" in proc.stdout
    data = json.loads(report.read_text())
    assert data["schema_version"] == 4 and data["environment"]["machine_id"].startswith("cpu-") and data["options"]["profile"] == "ci" and data["interrupted"] is False
    assert data["environment"]["numerics"]["name"] == "production" and data["options"]["numerics"] == "production"
    combos = {(r["model"], r["backend"], r["precision"], r["input_kind"]) for r in data["rows"]}
    for model in ("tiny-bert", "tiny-gpt2"):
        for precision in ("fp32", "hybrid", "fp16-strict"):
            for kind in ("hypothesis", "natural-text"):
                assert (model, "torch", precision, kind) in combos
    gated = {r["precision"]: r["gated"] for r in data["rows"]}
    assert gated == {"fp32": True, "hybrid": True, "fp16-strict": False}
    if not torch.cuda.is_available():
        assert all("CUDA GPU" in reason for reason in data["skipped"].values()) or not data["skipped"]
        assert "SKIPPED" in proc.stdout or "skipped" in proc.stdout
    assert data["engines"]["tiny-gpt2/torch/hybrid"]["audit"]["problems"] == []
    assert data["engines"]["tiny-gpt2/torch-reference/fp32"]["mode"].endswith("deterministic kernels")


@pytest.mark.slow
def test_onnx_backends_in_the_fidelity_run_and_a_warm_cache_rebuilds_nothing(tmp_path):
    cache = tmp_path / "engine-cache"
    args = [
        "-m", "fidelity", "fidelity",
        "--models", "tiny-bert,tiny-gpt2,minilm",
        "--precisions", "fp32,fp16,bf16,hybrid",
        "--backends", "torch,onnxrt",
        "--input-profile", "ci",
        f"--engine-cache={cache}",
    ]
    cold = run_pytest(*args, f"--fidelity-report={tmp_path / 'cold.json'}")
    assert cold.returncode == 0, cold.stdout[-4000:] + cold.stderr[-2000:]
    data = json.loads((tmp_path / "cold.json").read_text())
    backends = {(r["model"], r["backend"], r["precision"]) for r in data["rows"]}
    for model in ("tiny-bert", "tiny-gpt2", "minilm"):
        for precision in ("fp32", "fp16", "hybrid"):
            assert {(model, "torch", precision), (model, "onnxrt", precision)} <= backends
        assert f"{model}/onnxrt/bf16" in data["skipped"]  # no BF16 kernels in ORT's CPU provider
    assert data["engines"]["minilm/onnxrt/hybrid"]["graph_dtypes"]["MatMul"] == {"float16": 6 * 8}  # q k v o fc1 fc2 + QK^T, PV per layer
    assert all(r["runtime"].startswith("onnxruntime") for r in data["rows"] if r["backend"] == "onnxrt")
    built = [e for e in data["engine_cache"]["events"] if e["outcome"] == "built"]
    assert {e["kind"] for e in built} == {"onnx-fp32", "onnx-precision"}

    warm = run_pytest(*args, f"--fidelity-report={tmp_path / 'warm.json'}")
    assert warm.returncode == 0
    events = json.loads((tmp_path / "warm.json").read_text())["engine_cache"]["events"]
    assert events and {e["outcome"] for e in events} == {"hit"}  # no export, no conversion
    assert "hit" in warm.stdout and "built" not in warm.stdout.split("engine cache")[-1].splitlines()[0]


@pytest.mark.slow
def test_compiled_engine_runs_through_the_fidelity_gate(tmp_path):
    report = tmp_path / "compile.json"
    proc = run_pytest(
        "-m", "fidelity", "fidelity",
        "--models", "tiny-bert",
        "--precisions", "hybrid",
        "--backends", "torch-compile",
        "--compile-mode", "default",
        "--input-profile", "ci",
        f"--engine-cache={tmp_path / 'cache'}",
        f"--fidelity-report={report}",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = json.loads(report.read_text())
    rows = [r for r in data["rows"] if r["backend"] == "torch-compile"]
    assert {r["input_kind"] for r in rows} == {"hypothesis", "natural-text"}
    assert all(r["nan_count"] == 0 and r["verdict"] == "PASS" for r in rows), rows
    engine = data["engines"]["tiny-bert/torch-compile/hybrid"]
    assert "torch.compile mode=default" in engine["mode"] and engine["inductor_cache"] == str(tmp_path / "cache" / "torchinductor")


def test_compile_debug_records_stay_out_of_failure_reports(tmp_path):
    # Each torch.compile emits hundreds of empty "torch.__trace" DEBUG records;
    # the project's log_level keeps them out of a failed item's report.
    test_file = tmp_path / "test_compiled_failure.py"
    test_file.write_text(
        "import torch\n\n\ndef test_fails_after_compile():\n"
        "    torch.compile(lambda x: x * 2 + 1)(torch.ones(3))\n"
        "    assert False, 'expected failure'\n"
    )
    proc = run_pytest("-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), str(test_file), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "expected failure" in proc.stdout
    assert "torch.__trace" not in proc.stdout


@pytest.fixture(scope="module")
def user_onnx(tmp_path_factory) -> Path:
    """A BERT-style graph as a user would bring it: exported elsewhere (no module names), weights beside it."""
    import onnx

    from engines.graphs.export import export_fp32
    from engines.models import ModelLoader

    folder = tmp_path_factory.mktemp("byo")
    export_fp32(ModelLoader(weights_mode="random", hub_probe=lambda: False).load("tiny-bert"), folder / "src")
    model = onnx.load(str(folder / "src" / "model.onnx"), load_external_data=True)
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save_model(model, str(folder / "mybert.onnx"), save_as_external_data=True, location="mybert.onnx.data")
    return folder / "mybert.onnx"


@pytest.mark.slow
def test_a_users_onnx_graph_runs_through_every_onnx_backend(tmp_path, user_onnx):
    report = tmp_path / "byo.json"
    proc = run_pytest(
        "-m", "fidelity", "fidelity", f"--onnx=mybert={user_onnx}", "--backends=onnxrt,onnx-torch,trt-rtx,torch",
        "--precisions=fp32,hybrid", "--input-profile=ci", f"--engine-cache={tmp_path / 'cache'}",
        f"--fidelity-report={report}", "-rs",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = json.loads(report.read_text())
    rows = {(r["backend"], r["precision"], r["input_kind"]): r for r in data["rows"]}
    for backend in ("onnxrt", "onnx-torch"):
        for precision in ("fp32", "hybrid"):
            assert rows[(backend, precision, "hypothesis")]["verdict"] == "PASS"
    assert data["engines"]["mybert/onnx-reference/fp32"]["mode"].startswith("the user's FP32 ONNX graph")
    assert "torch cannot run it; the ONNX backends can" in data["skipped"]["mybert/torch/fp32"]
    import importlib.util

    if importlib.util.find_spec("tensorrt_rtx") is not None:  # the CI installs it (".[trt-rtx]")
        assert data["engines"]["mybert/trt-rtx/hybrid"]["runnable"] is False  # built for SM80, checked, cached
    assert data["options"]["onnx_graphs"]["mybert"]["sha256"]

    perf = run_pytest("-m", "perf", "perf", f"--onnx=mybert={user_onnx}", "--backends=onnxrt", "--precisions=fp32",
                      "--perf-rounds=5", "--perf-warmup=1", f"--engine-cache={tmp_path / 'cache'}")
    assert perf.returncode == 0, perf.stdout[-3000:]
    assert "mybert/onnxrt/fp32" in perf.stdout.split("latency gate", 1)[1]


def test_a_bad_onnx_graph_is_a_usage_error_at_start_up(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    proc = run_pytest("--collect-only", "-q", "fidelity", f"--onnx=mine={tmp_path / 'broken.onnx'}", timeout=120)
    assert proc.returncode == 4 and "is not a readable ONNX model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_trt_rtx_builds_one_plan_per_precision_and_skips_each_run_with_the_reason(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason='TensorRT for RTX is not installed: pip install -e ".[trt-rtx]"')
    cache = tmp_path / "cache"
    proc = run_pytest("-m", "fidelity", "fidelity", "--backends=trt-rtx", "--models=tiny-gpt2",
                      "--precisions=fp32,fp16,hybrid", f"--engine-cache={cache}", "--input-profile=ci", "-rs")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert len(list(cache.rglob("engine.plan"))) == 3
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("built for SM80 and cached" in s and "not runnable here" in s for s in skips)
    assert "6 skipped" in proc.stdout and "failed" not in proc.stdout
