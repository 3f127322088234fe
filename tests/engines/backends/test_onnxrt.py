import pytest
import torch

from engines.backends.base import BackendUnavailableError, BuildOptions
from engines.backends.onnxrt import CPU_NOTE, OnnxRuntimeRunner, providers_for
from engines.backends.torch_eager import TorchReferenceRunner
from engines.graphs.export import check_batch
from engines.precision.policy import REFERENCE_POLICY, get_policy


def test_hybrid_graph_runs_in_onnxruntime_and_matches(tiny_gpt2, engine_cache):
    reference = TorchReferenceRunner(tiny_gpt2, REFERENCE_POLICY, "cpu").build()
    runner = OnnxRuntimeRunner(tiny_gpt2, get_policy("hybrid"), "cpu", BuildOptions(cache=engine_cache)).build()
    batch = check_batch(tiny_gpt2)
    valid = batch.attention_mask.bool()
    got, want = runner.infer(batch)[valid].double(), reference.infer(batch)[valid].double()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9998
    info = runner.info()
    assert info.details["provider"] == "CPUExecutionProvider" and info.details["note"] == CPU_NOTE
    assert info.runtime.startswith("onnxruntime ")


def test_prepare_and_run_bind_in_place_and_repeat(tiny_bert, engine_cache):
    """The timed path (what perf/ calls): staged once, run many times, the same answer as infer()."""
    runner = OnnxRuntimeRunner(tiny_bert, get_policy("fp32"), "cpu", BuildOptions(cache=engine_cache)).build()
    batch = check_batch(tiny_bert)
    staged = runner.prepare(batch)
    first = runner.run(staged).clone()
    second = runner.run(staged)
    assert first.shape == (*batch.shape, 64) and first.dtype == torch.float32
    assert torch.equal(first, second) and torch.equal(first, runner.infer(batch))


def test_bf16_on_the_cpu_provider_is_a_skip_with_the_reason(tiny_bert, engine_cache):
    with pytest.raises(BackendUnavailableError, match="cannot run the bf16 graph"):
        OnnxRuntimeRunner(tiny_bert, get_policy("bf16"), "cpu", BuildOptions(cache=engine_cache)).build()


def test_gpu_without_a_gpu_provider_names_the_package():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(BackendUnavailableError, match="pip install onnxruntime-gpu"):
        providers_for("cuda")
