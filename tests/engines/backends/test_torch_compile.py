"""The torch.compile engine on the CPU: buckets, graph rewrites, and outputs against the eager engine."""

import pytest
import torch

from engines.backends.base import BuildOptions
from engines.backends.torch_compile import (
    TorchCompileRunner,
    bucket,
    bucket_shape,
    fuse_qkv_projections,
    fused_attention_allowed,
    pad_unaligned_projections,
)
from engines.backends.torch_eager import TorchRunner
from engines.batch import TokenBatch
from engines.models import OutputForward
from engines.precision.audit import FUSED_ATTENTION, NATIVE, OpRecord, check_policy
from engines.precision.policy import POLICIES, get_policy
from engines.precision.torch_apply import apply_policy


@pytest.mark.parametrize("value,expected", [(1, 1), (3, 4), (32, 32), (33, 64), (70, 96)])
def test_batch_buckets_then_multiples_of_the_largest(value, expected):
    assert bucket(value, (1, 2, 4, 8, 16, 32)) == expected


@pytest.mark.parametrize("value,expected", [(1, 32), (33, 64), (129, 256), (512, 512), (513, 1024)])
def test_sequence_buckets(value, expected):
    assert bucket(value, (32, 64, 128, 256, 512)) == expected


def test_bucket_shape_never_exceeds_the_model_positions():
    assert bucket_shape((3, 20), 512) == (4, 32)
    assert bucket_shape((1, 300), 512) == (1, 512)
    assert bucket_shape((1, 100), 100) == (1, 100)  # a model with 100 positions: no padding past them
    assert bucket_shape((40, 600), 1024) == (64, 1024)


def test_fused_attention_only_for_half_gemms_with_fp32_softmax():
    allowed = {name for name, policy in POLICIES.items() if fused_attention_allowed(policy)}
    assert allowed == {"hybrid"}


def _eager_forward(model, module):
    return OutputForward(module, model.spec.output_name, model.spec.causal).eval()


def _padded_batch(model, *, left: bool) -> TokenBatch:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, model.vocab_size, (3, 20), generator=generator)
    mask = torch.ones_like(ids)
    if left:
        mask[1, :6] = 0
    else:
        mask[1, 14:] = 0
    ids[mask == 0] = model.pad_token_id
    return TokenBatch(ids, mask, source="test")


def test_qkv_fusion_computes_the_same_projections(tiny_bert):
    policy = get_policy("hybrid")
    plain = apply_policy(tiny_bert.module, policy)
    fused = apply_policy(tiny_bert.module, policy)
    assert fuse_qkv_projections(fused) == 2  # both layers of tiny-bert
    batch = _padded_batch(tiny_bert, left=False)
    with torch.inference_mode():
        expected = _eager_forward(tiny_bert, plain)(batch.input_ids, batch.attention_mask)
        actual = _eager_forward(tiny_bert, fused)(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_padded_lm_head_gives_the_same_logits(tiny_gpt2):
    policy = get_policy("hybrid")
    plain = apply_policy(tiny_gpt2.module, policy)
    padded = apply_policy(tiny_gpt2.module, policy)
    assert pad_unaligned_projections(padded) == 1  # the 50257-wide LM head
    assert padded.lm_head.weight.shape[0] == 50304
    batch = _padded_batch(tiny_gpt2, left=True)
    with torch.inference_mode():
        expected = _eager_forward(tiny_gpt2, plain)(batch.input_ids, batch.attention_mask)
        actual = _eager_forward(tiny_gpt2, padded)(batch.input_ids, batch.attention_mask)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model_name,left", [("tiny-bert", False), ("tiny-gpt2", True)])
def test_compiled_engine_matches_eager_on_padded_odd_shapes(request, engine_cache, model_name, left):
    model = request.getfixturevalue(model_name.replace("-", "_"))
    policy = get_policy("hybrid")
    batch = _padded_batch(model, left=left)
    with TorchRunner(model, policy, "cpu") as eager, TorchCompileRunner(model, policy, "cpu", BuildOptions(cache=engine_cache)) as compiled:
        assert compiled.padded(batch).shape == (4, 32)
        expected = eager.infer(batch)
        actual = compiled.infer(batch)
        # A second shape of the same bucket reuses the compiled graph and still cuts its own output.
        smaller = TokenBatch(batch.input_ids[:2, :17], batch.attention_mask[:2, :17], "test")
        assert compiled.infer(smaller).shape[:2] == (2, 17)
        info = compiled.info()
    assert actual.shape == expected.shape
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=2e-3, atol=2e-3)
    assert "torch.compile mode=default" in info.mode
    assert info.details["inductor_cache"]


@pytest.mark.parametrize("model_name,blocks,block_graphs", [("tiny-bert", 3, 2), ("tiny-gpt2", 2, 1)])
def test_regional_mode_compiles_one_graph_per_block_class_and_matches_eager(
    request, engine_cache, model_name, blocks, block_graphs
):
    """--compile-mode regional: every repeated block compiled in place, blocks of one class sharing one graph per
    bucket (tiny-bert: its embeddings and two BertLayers = 2 graphs; tiny-gpt2: two GPT2Blocks = 1 graph); closed,
    it leaves no block to the garbage collector."""
    import gc
    import weakref

    from torch._dynamo.utils import counters

    from engines.backends.torch_compile import repeated_blocks

    model = request.getfixturevalue(model_name.replace("-", "_"))
    policy = get_policy("hybrid")
    batch = _padded_batch(model, left=model_name == "tiny-gpt2")
    torch.compiler.reset()
    counters.clear()
    options = BuildOptions(cache=engine_cache, compile_mode="regional")
    regional = TorchCompileRunner(model, policy, "cpu", options).build()
    with TorchRunner(model, policy, "cpu") as eager:
        expected = eager.infer(batch)
    actual = regional.infer(batch)
    first_bucket = counters["stats"]["unique_graphs"]
    regional.infer(TokenBatch(batch.input_ids[:1, :40], batch.attention_mask[:1, :40], "test"))  # bucket (1, 64)
    info, compiled_blocks, fused = regional.info(), regional.compiled_blocks, regional.fused_qkv_layers
    # nn.Module.compile keeps the compiled call on the block, and the call holds the block: a cycle that kept a closed
    # engine's blocks (its weights) alive until a collection ran, on the H100 in the middle of later measurements.
    alive = [weakref.ref(block) for block in repeated_blocks(regional.forward.model)]
    gc.collect()
    gc.disable()
    try:
        regional.close()
        del regional
        assert [ref() is None for ref in alive] == [True] * blocks
    finally:
        gc.enable()
    assert compiled_blocks == blocks
    # Q|K|V as slices of one GEMM relies on freezing's constant weights: in regional graphs the three slices' GEMMs
    # stayed three [hidden, 3 x hidden] products, so regional engines keep BERT's three projections.
    assert fused == 0
    assert (first_bucket, counters["stats"]["unique_graphs"]) == (block_graphs, 2 * block_graphs)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=2e-3, atol=2e-3)
    assert "mode=regional" in info.mode and f"{blocks} repeated blocks compiled in place" in info.mode


def test_regional_mode_needs_named_repeated_blocks(tiny_bert):
    from engines.backends.torch_compile import repeated_blocks

    assert len(repeated_blocks(tiny_bert.module)) == 3
    with pytest.raises(ValueError, match="--compile-mode default"):
        repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_each_engine_cache_gets_its_own_inductor_dir_unless_the_user_set_one(tiny_bert, tmp_path, monkeypatch):
    import os

    from engines.cache import EngineCache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    first = TorchCompileRunner(tiny_bert, get_policy("hybrid"), "cpu", BuildOptions(cache=EngineCache(tmp_path / "a")))
    second = TorchCompileRunner(tiny_bert, get_policy("hybrid"), "cpu", BuildOptions(cache=EngineCache(tmp_path / "b")))
    assert (first.cache_dir, second.cache_dir) == (str(tmp_path / "a" / "torchinductor"), str(tmp_path / "b" / "torchinductor"))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # constructors leave the process's environment alone
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    third = TorchCompileRunner(tiny_bert, get_policy("hybrid"), "cpu", BuildOptions(cache=EngineCache(tmp_path / "c")))
    assert third.cache_dir == str(tmp_path / "mine")


def test_a_read_only_engine_cache_does_not_hold_the_inductor_cache(tiny_bert, tmp_path, monkeypatch):
    """Inductor writes lock files even to read its cache: with a read-only engine cache it uses its own default."""
    from engines.backends import torch_compile
    from engines.cache import EngineCache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = EngineCache(tmp_path / "shared")
    monkeypatch.setattr(EngineCache, "writable", lambda self: False)
    runner = TorchCompileRunner(tiny_bert, get_policy("hybrid"), "cpu", BuildOptions(cache=cache))
    assert runner.cache_dir == torch_compile._torch_default_inductor_dir()
    assert not runner.cache_dir.startswith(str(tmp_path))


def test_unknown_compile_mode_is_refused(tiny_bert):
    with pytest.raises(ValueError, match="max-autotune"):
        TorchCompileRunner(tiny_bert, get_policy("hybrid"), "cpu", BuildOptions(compile_mode="fastest"))


def _records(*items):
    return [OpRecord(op_class, dtype, impl, "encoder.layer.0") for op_class, dtype, impl in items]


def test_audit_accepts_declared_fused_attention_for_hybrid():
    records = _records(
        ("matmul", "float16", NATIVE),
        ("layernorm", "float32", NATIVE),
        ("fused_attention", "float16", NATIVE),
        ("matmul", "float16", FUSED_ATTENTION),
        ("softmax", "float32", FUSED_ATTENTION),
    )
    assert check_policy(records, get_policy("hybrid"), engine="e")


def test_audit_refuses_undeclared_fused_attention():
    records = _records(
        ("matmul", "float16", NATIVE),
        ("layernorm", "float32", NATIVE),
        ("softmax", "float32", NATIVE),
        ("fused_attention", "float16", NATIVE),
    )
    audit = check_policy(records, get_policy("hybrid"), engine="e")
    assert not audit
    assert "fused attention call(s)" in audit.problems[0]


def test_audit_refuses_fused_softmax_where_the_policy_wants_strict_fp16_reductions():
    records = _records(
        ("matmul", "float16", NATIVE),
        ("layernorm", "float16", "low-precision-reduction"),
        ("fused_attention", "float16", NATIVE),
        ("softmax", "float16", FUSED_ATTENTION),
    )
    audit = check_policy(records, get_policy("fp16-strict"), engine="e")
    assert any("low-precision-reduction implementation" in p for p in audit.problems)


_COMPILE_ONCE = """
import json, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from engines.batch import TokenBatch
from engines.cache import EngineCache
from engines.models import ModelLoader
from engines.precision.policy import get_policy
from engines.backends.base import BuildOptions
from engines.backends.torch_compile import TorchCompileRunner
model = ModelLoader(weights_mode="random", hub_probe=lambda: False).load("tiny-bert")
runner = TorchCompileRunner(model, get_policy("hybrid"), "cpu", BuildOptions(cache=EngineCache(Path(sys.argv[1])))).build()
ids = torch.ones(2, 10, dtype=torch.int64)
runner.infer(TokenBatch(ids, torch.ones_like(ids)))
print(json.dumps({"dir": runner.cache_dir, "inductor": dict(counters["inductor"])}))
"""


def test_compiled_graphs_are_cached_under_the_engine_cache(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["HF_HUB_OFFLINE"] = "1"
    runs = []
    for _ in range(2):  # two processes: the second finds the first one's graph on disk
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILE_ONCE, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True,
            timeout=300, check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["dir"] == str(tmp_path / "torchinductor")
    assert runs[0]["inductor"].get("fxgraph_cache_miss") == 1
    assert runs[1]["inductor"].get("fxgraph_cache_hit") == 1 and not runs[1]["inductor"].get("fxgraph_cache_miss")
    assert (tmp_path / "torchinductor" / "fxgraph").is_dir()


def test_the_cudnn_bias_is_read_by_every_head_and_the_efficient_one_has_them_all():
    from engines.backends.torch_compile import _aligned_bias

    mask = torch.ones(2, 1, 4, 300, dtype=torch.bool)
    mask[1, ..., 200:] = False
    shape = (2, 12, 4, 300)
    broadcast = _aligned_bias(mask, torch.float16, shape, broadcast_heads=True)
    expanded = _aligned_bias(mask, torch.float16, shape)
    assert broadcast.shape == (2, 1, 4, 300) and expanded.shape == shape
    assert torch.equal(broadcast.expand(shape), expanded)
    assert broadcast.stride(-2) % 16 == 0  # 300 keys padded to an aligned row, viewed at 300
    assert broadcast[1, 0, 0, 200].item() == torch.finfo(torch.float16).min and broadcast[0].eq(0).all()
