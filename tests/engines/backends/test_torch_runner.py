import pytest
import torch

from engines.backends.base import BackendUnavailableError
from engines.backends.torch_eager import TorchReferenceRunner, TorchRunner, probe_batch
from engines.batch import InvalidInputError, TokenBatch
from engines.precision.audit import PrecisionMismatchError, check_policy
from engines.precision.policy import POLICIES, REFERENCE_POLICY, get_policy
from engines.precision.torch_apply import apply_policy


def batch_of(ids, mask=None):
    ids = torch.tensor(ids, dtype=torch.int64)
    return TokenBatch(ids, torch.ones_like(ids) if mask is None else torch.tensor(mask, dtype=torch.int64))


@pytest.fixture(scope="module")
def hybrid_bert(tiny_bert):
    with TorchRunner(tiny_bert, get_policy("hybrid"), "cpu") as runner:
        yield runner


def test_runner_protocol_and_output_contract(hybrid_bert, tiny_bert):
    out = hybrid_bert.infer(batch_of([[101, 2023, 102]]))
    assert out.shape == (1, 3, 64) and out.dtype == torch.float32
    assert hybrid_bert.name == "tiny-bert/torch/hybrid"
    assert hybrid_bert.info().mode == "eager" and hybrid_bert.info().runtime.startswith("torch ")
    staged = hybrid_bert.prepare(batch_of([[101, 2023, 102]]))
    assert torch.equal(hybrid_bert.run(staged), out)  # the timed path gives what infer() gives


def test_audit_records_the_policy_dtypes(hybrid_bert):
    audit = hybrid_bert.audit
    # q, k, v, o, fc1, fc2 and QK^T, PV per layer, plus the pooler
    assert audit.counts["matmul"] == {"float16": 2 * (6 + 2) + 1}
    assert audit.counts["softmax"] == {"float32": 2}
    assert audit.counts["layernorm"] == {"float32": 5}
    assert audit.details["implementations"]["softmax:native"] == 2
    assert bool(audit) and audit.method.startswith("torch function calls")


@pytest.mark.parametrize(
    "ids,mask,message",
    [
        ([[101] * 513], None, "exceeds the model's maximum of 512 positions"),
        ([[101, 40000]], None, r"token ids must lie in \[0, 30522\)"),
        ([[101, 102]], [[1, 2]], "must hold only 0 and 1"),
        ([[101, 102]], [[0, 0]], "no attended token"),
        ([[101, 102]], [[1, 1, 1]], "differs from input_ids shape"),
    ],
)
def test_bad_input_is_refused_with_the_fix(hybrid_bert, ids, mask, message):
    with pytest.raises(InvalidInputError, match=message):
        hybrid_bert.infer(batch_of(ids, mask))


class MisclaimedRunner(TorchRunner):
    """Claims its policy but converts the model with another: the audit must catch it."""

    actual_precision = "fp32"

    def _make_module(self):
        return apply_policy(self.model.module, POLICIES[self.actual_precision])


@pytest.mark.parametrize("claimed,actual,problem", [
    ("hybrid", "fp32", "matmul: 17 of 17 calls ran in ['float32'] where the policy says float16"),
    ("fp16", "hybrid", "softmax: 2 of 2 calls ran in ['float32'] where the policy says float16"),
    ("fp16-strict", "fp16", "layernorm: policy wants the low-precision-reduction implementation"),
])
def test_an_engine_that_misstates_its_precision_fails_loudly(tiny_bert, claimed, actual, problem):
    runner = MisclaimedRunner(tiny_bert, get_policy(claimed), "cpu")
    runner.actual_precision = actual
    with pytest.raises(PrecisionMismatchError) as info:
        runner.build()
    assert f"tiny-bert/torch/{claimed} claims precision {claimed!r}" in str(info.value)
    assert problem in str(info.value)


def test_tf32_fails_the_fp32_audit(tiny_bert):
    reference = TorchReferenceRunner(tiny_bert, REFERENCE_POLICY, "cpu").build()
    audit = reference.audit
    assert audit
    from engines.precision.audit import DtypeAudit

    records = []
    probe = probe_batch(tiny_bert.vocab_size, tiny_bert.special_token_ids, tiny_bert.pad_token_id)
    with torch.inference_mode(), DtypeAudit().watching(reference.forward.model) as watched:
        reference.forward(probe.input_ids, probe.attention_mask)
        records = watched.records
    verdict = check_policy(records, get_policy("fp32"), engine="x", tf32=True)
    assert not verdict and "TF32 is enabled" in verdict.problems[0]


def test_reference_runs_only_fp32(tiny_bert):
    with pytest.raises(ValueError, match="FP32 only"):
        TorchReferenceRunner(tiny_bert, get_policy("hybrid"), "cpu")


def test_cuda_graph_backend_needs_cuda(tiny_bert):
    from engines.backends.torch_cudagraph import TorchCudaGraphRunner

    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        TorchCudaGraphRunner(tiny_bert, get_policy("hybrid"), "cpu")


def test_closed_runner_cannot_be_rebuilt(tiny_bert):
    runner = TorchRunner(tiny_bert, get_policy("fp32"), "cpu")
    runner.close()
    with pytest.raises(RuntimeError, match="build\\(\\) after close\\(\\)"):
        runner.build()


def test_the_reference_runs_deterministic_kernels_and_restores_the_session_setting(tiny_bert):
    from engines.numerics import NUMERICS, configure_process

    configure_process(NUMERICS["production"])
    reference = TorchReferenceRunner(tiny_bert, REFERENCE_POLICY, "cpu").build()
    seen = []
    original = reference.forward.forward

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(*args, **kwargs)

    reference.forward.forward = spy
    reference.infer(batch_of([[101, 2023, 102]]))
    assert seen == [True]  # the reference's own call: deterministic
    assert not torch.are_deterministic_algorithms_enabled()  # the engines under test: production again
    assert reference.info().mode.endswith("deterministic kernels")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch-cudagraph", "torch-compile"])
def test_released_graphs_are_captured_again_for_the_next_shape(tiny_bert, tmp_path, backend):
    """The sweep drops an engine's captured graphs before each shape; the next capture must work and be right
    (it failed an allocator assert on the H100 when the freed pool's handle was reused)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engines.backends.base import BuildOptions
    from engines.backends.registry import get_backend
    from engines.backends.torch_eager import TorchReferenceRunner
    from engines.cache import EngineCache
    from engines.precision.policy import REFERENCE_POLICY, get_policy

    runner = get_backend(backend).load()(tiny_bert, get_policy("fp32"), "cuda", BuildOptions(cache=EngineCache(tmp_path)))
    reference = TorchReferenceRunner(tiny_bert, REFERENCE_POLICY, "cuda").build()
    try:
        runner.build()
        for shape in ((1, 32), (2, 32), (2, 64)):
            runner.release_shapes()
            ids = torch.randint(5, tiny_bert.vocab_size, shape)
            batch = TokenBatch(ids, torch.ones_like(ids), "random")
            out, ref = runner.infer(batch), reference.infer(batch)
            assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.9999, shape
    finally:
        runner.close()
        reference.close()
