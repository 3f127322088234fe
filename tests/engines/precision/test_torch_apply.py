import numpy as np
import pytest
import torch
from torch.nn import functional as F

from engines.precision.policy import get_policy
from engines.precision.torch_apply import (
    PolicyLinear,
    apply_policy,
    low_precision_sum,
    strict_layer_norm,
    strict_softmax,
)


def test_low_precision_sum_rounds_every_partial_sum():
    x = torch.full((1024,), 100.0, dtype=torch.float16)
    assert torch.isinf(low_precision_sum(x))  # 102400 > 65504
    # torch's own half mean accumulates in FP32 and never sees the overflow
    assert float(x.mean()) == 100.0
    assert float(low_precision_sum(torch.arange(10, dtype=torch.float32))) == 45.0


def _pairwise_fp16_sum(values: np.ndarray) -> np.float16:
    """An independent FP16 pairwise sum: every partial sum rounded to FP16."""
    v = np.asarray(values, dtype=np.float16)
    width = 1 << max(len(v) - 1, 0).bit_length()
    v = np.concatenate([v, np.zeros(width - len(v), dtype=np.float16)])
    while len(v) > 1:
        half = len(v) // 2
        v = (v[:half] + v[half:]).astype(np.float16)
    return v[0]


def test_strict_softmax_divides_by_a_sum_rounded_in_fp16_at_every_step():
    x = (torch.randn(3000, generator=torch.Generator().manual_seed(3)) * 2).half()
    exps = torch.exp(x - x.max())
    expected = exps / torch.tensor(_pairwise_fp16_sum(exps.numpy()))
    got = strict_softmax(x)
    assert torch.equal(got, expected)
    # The test can tell: a sum accumulated in FP32 (what torch's half kernels do) differs.
    accumulated_in_fp32 = exps / exps.float().sum().half()
    assert not torch.equal(got, accumulated_in_fp32)


def test_strict_layer_norm_overflows_where_the_native_kernel_does_not():
    torch.manual_seed(0)
    x = (torch.randn(4, 384) * 300).half()  # (x - mean)^2 exceeds FP16's 65504
    weight, bias = torch.ones(384, dtype=torch.float16), torch.zeros(384, dtype=torch.float16)
    native = F.layer_norm(x, (384,), weight, bias, 1e-12)
    strict = strict_layer_norm(x, weight, bias, 1e-12)
    assert torch.isfinite(native).all() and float(native.float().std()) > 0.9
    # The sum of squares overflows to inf, so every normalized value collapses
    # to 0: silent, no NaN, exactly what a decomposed FP16 LayerNorm does.
    assert float(strict.abs().max()) == 0.0


def test_strict_ops_match_fp32_on_benign_input():
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    weight, bias = torch.rand(64) + 0.5, torch.randn(64)
    expected = F.layer_norm(x, (64,), weight, bias, 1e-5)
    got = strict_layer_norm(x.half(), weight.half(), bias.half(), 1e-5).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(strict_softmax(x.half()).float(), torch.softmax(x, -1), atol=2e-3, rtol=2e-2)


def test_policy_linear_reproduces_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 16)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(3, 5, 16)
    linear = PolicyLinear.from_conv1d(conv, torch.float32, torch.float32)
    torch.testing.assert_close(linear(x), conv(x))


@pytest.mark.parametrize("precision", ["hybrid", "fp16", "bf16", "fp16-strict"])
def test_apply_policy_leaves_the_source_model_untouched(tiny_gpt2, precision):
    before = {k: v.clone() for k, v in tiny_gpt2.module.state_dict().items()}
    converted = apply_policy(tiny_gpt2.module, get_policy(precision))
    assert all(p.dtype == torch.float32 for p in tiny_gpt2.module.parameters())
    for key, value in tiny_gpt2.module.state_dict().items():
        assert torch.equal(value, before[key]), key
    linears = [m for m in converted.modules() if isinstance(m, PolicyLinear)]
    assert len(linears) == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per layer + lm_head
    expected = {"hybrid": torch.float16, "fp16": torch.float16, "fp16-strict": torch.float16, "bf16": torch.bfloat16}
    assert {m.weight.dtype for m in linears} == {expected[precision]}


def test_module_overrides_reach_the_modules_they_name(tiny_bert, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        '{"schema": 1, "name": "fp16-keep-ln1", "base": "fp16", "overrides": '
        '[{"module": "encoder.layer.1", "op_class": "layernorm", "dtype": "float32"}]}'
    )
    converted = apply_policy(tiny_bert.module, get_policy(f"file:{path}"))
    dtypes = {name: m.compute_dtype for name, m in converted.named_modules() if hasattr(m, "compute_dtype")}
    assert dtypes["encoder.layer.1.output.LayerNorm"] == torch.float32
    assert dtypes["encoder.layer.1.attention.output.LayerNorm"] == torch.float32
    assert dtypes["encoder.layer.0.output.LayerNorm"] == torch.float16
    assert dtypes["encoder.layer.1.output.dense"] == torch.float16


def test_an_fp32_override_keeps_the_exact_fp32_weights(tiny_bert, tmp_path):
    """Not FP16-rounded and cast back: the ONNX converter keeps the FP32 initializers, so must the torch engine."""
    path = tmp_path / "p.json"
    path.write_text('{"schema": 1, "name": "l1-fp32", "base": "fp16", "overrides": [{"module": "encoder.layer.1", "dtype": "float32"}]}')
    converted = dict(apply_policy(tiny_bert.module, get_policy(f"file:{path}")).named_modules())
    original = dict(tiny_bert.module.named_modules())
    for name in ("encoder.layer.1.attention.self.query", "encoder.layer.1.output.LayerNorm"):
        assert converted[name].weight.dtype == torch.float32
        assert torch.equal(converted[name].weight, original[name].weight), name
    half = converted["encoder.layer.0.attention.self.query"].weight
    assert half.dtype == torch.float16 and torch.equal(half, original["encoder.layer.0.attention.self.query"].weight.half())
    assert converted["embeddings.word_embeddings"].weight.dtype == torch.float16  # the residual stream


def test_an_override_matching_no_module_or_naming_onnx_nodes_is_refused(tiny_bert, tmp_path):
    from engines.precision.policy import PolicyError

    typo = tmp_path / "typo.json"
    typo.write_text('{"schema": 1, "name": "t", "base": "fp16", "overrides": [{"module": "encoder.layers.1", "dtype": "float32"}]}')
    with pytest.raises(PolicyError, match="match no module of BertModel"):
        apply_policy(tiny_bert.module, get_policy(f"file:{typo}"))
    nodes = tmp_path / "nodes.json"
    nodes.write_text('{"schema": 1, "name": "n", "base": "fp16", "overrides": [{"node": "node_MatMul_7", "dtype": "float32"}]}')
    with pytest.raises(PolicyError, match="only the ONNX backends"):
        apply_policy(tiny_bert.module, get_policy(f"file:{nodes}"))
