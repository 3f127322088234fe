"""``torch.compile`` (Inductor) engine: fused kernels, one CUDA graph per shape bucket.

The policy engine of :mod:`engines.backends.torch_eager`, compiled by Inductor so that the
casts a policy puts around every GEMM, the bias/GELU/residual/LayerNorm chains
and the masked softmax become a few fused kernels, then captured as a CUDA graph
per input shape (as :mod:`engines.backends.torch_cudagraph` does for the eager code).

Shapes are static: an input is padded up to the next (batch, sequence) bucket
(the sweep's batch {1,2,4,8,16,32} and sequence {32,...,512} values), so a
Hypothesis run over arbitrary shapes compiles a bounded number of graphs.
Padded key positions are masked and padded rows are cut off before the output
is returned; the valid tokens see exactly the computation they would unpadded.

Before compiling, two module swaps that keep every product the same: BERT's
query/key/value projections become slices of one concatenated GEMM, and an
output width that is not a multiple of 8 (GPT-2's 50257-wide LM head) is padded
with zero rows for the GEMM and cut back.

Attention.  Where a policy's matmuls are FP16/BF16 and its softmax FP32 (``hybrid``),
the CUDA engine calls a fused attention kernel directly (PyTorch's memory-efficient
kernel, cuDNN's from CUDNN_MIN_KEY_LENGTH keys): ``Q K^T`` and ``P V`` from half
inputs with FP32 accumulation, the scale, mask and softmax in FP32, so the policy
holds inside the kernel and the ``[batch, heads, seq, seq]`` scores never reach
memory.  The kernels are named explicitly (not ``scaled_dot_product_attention``,
whose dispatcher may fall back to the math path and run softmax in FP16).  Every
other policy, and the CPU, keeps the explicit
:func:`engines.precision.torch_apply.policy_attention`, which Inductor fuses but which
materializes the scores.

Compilation is cached on disk by Inductor itself (FX graph and autotuning
caches) under ``<engine cache>/torchinductor`` unless the user set
``TORCHINDUCTOR_CACHE_DIR``; another process finds its graphs there.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from engines.backends.base import EngineInfo
from engines.backends.torch_cudagraph import CapturedGraphs, KeepsCapturedGraphs
from engines.backends.torch_eager import TorchRunner
from engines.batch import TokenBatch
from engines.precision.audit import FUSED_ATTENTION, note_reduction
from engines.precision.policy import FLOAT32, PrecisionPolicy
from engines.precision.torch_apply import (
    DTYPES_ATTRIBUTE,
    PolicyLinear,
    _additive_mask,
    _policy_mask,
    apply_policy,
    policy_attention,
)

FUSED_ATTENTION_NAME = "fidelity_policy_fused"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
SEQUENCE_BUCKETS = (32, 64, 128, 256, 512)
# Inductor options per mode this engine offers.  Freezing folds the weights into
# the graph as constants, which lets Inductor concatenate the Q, K and V GEMMs
# that share an input into one.  Inductor's own CUDA graphs ("reduce-overhead",
# "max-autotune") are replaced by this engine's capture, which shares one memory
# pool and one LRU bound with torch-cudagraph.
#
# "regional" is PyTorch's regional compilation: each repeated transformer block (the model's
# ``_no_split_modules`` classes: BertLayer, GPT2Block, ...) is compiled in place and, the blocks
# sharing one class and their weights being graph inputs (no freezing), one compiled graph per
# bucket serves all of them; the rest runs eager inside the same CUDA graph.  A first call per
# bucket then traces one block instead of the whole model.
COMPILE_MODES: dict[str, dict[str, Any]] = {
    "default": {"freezing": True},
    "max-autotune": {"freezing": True, "max_autotune": True, "coordinate_descent_tuning": True},
    "regional": {},
}
REGIONAL_MODES = frozenset({"regional"})
# Regional graphs are cache entries of the blocks' shared code (nn.Module._call_impl): every live
# regional engine's buckets count against one Dynamo limit, so it covers this many engines alive at once.
_REGIONAL_ENGINES_ALIVE = 16
# Alignment the memory-efficient kernel wants for the bias's last stride.
_BIAS_ALIGNMENT = 16


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= value; beyond the last, the next multiple of it."""
    index = bisect.bisect_left(buckets, value)
    if index < len(buckets):
        return buckets[index]
    top = buckets[-1]
    return -(-value // top) * top


def bucket_shape(shape: tuple[int, int], max_positions: int) -> tuple[int, int]:
    batch, seq = shape
    return bucket(batch, BATCH_BUCKETS), min(bucket(seq, SEQUENCE_BUCKETS), max(seq, max_positions))


def fused_attention_allowed(policy: PrecisionPolicy) -> bool:
    """Whether any module may use the fused kernel, which computes softmax in FP32 from half GEMM inputs.

    Decided per attention module at call time (:func:`fused_policy_attention`); a
    policy file may give some layers another softmax or GEMM dtype.
    """
    if policy.strict_reductions:
        return False
    modules = [None] + [o.module for o in policy.overrides if o.module is not None]
    return any(
        policy.dtype_of("softmax", module=m) == FLOAT32 and policy.dtype_of("matmul", module=m) != FLOAT32
        for m in modules
    )


# From this key length up, cuDNN's attention (with the mask as a bias) beat the
# memory-efficient kernel on the H100 (b32 s512, one layer: 0.16 vs 0.33 ms;
# at s128 the efficient kernel was as fast or faster); scratch measurements, 2026-11-25.
CUDNN_MIN_KEY_LENGTH = 256


def _aligned_bias(
    mask: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int, int, int], *, broadcast_heads: bool = False
) -> torch.Tensor:
    """The additive mask as the kernel's bias: ``shape``, or ``[batch, 1, q, k]`` read by every head."""
    bias = _additive_mask(mask, dtype)
    kv_len = bias.shape[-1]
    pad = -kv_len % _BIAS_ALIGNMENT
    if pad:  # an aligned allocation viewed at the true length, as SDPA itself does
        bias = F.pad(bias, (0, pad))[..., :kv_len]
    if broadcast_heads:
        # Expanded over heads, the bias was written out once per head by Inductor
        # (at b32 s512: 0.74 ms of a 2.8 ms attention stack; cuDNN reading one
        # [batch, 1, q, k] bias: 1.9 ms, same output; probes/bias-probe.log).
        return bias.expand(shape[0], 1, shape[2], shape[3])
    return bias.expand(shape)  # the memory-efficient kernel wants the head dimension


def fused_policy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A fused attention kernel on the policy's matmul dtype; softmax in FP32 inside it.

    Both kernels used (memory-efficient, cuDNN) take half Q/K/V, accumulate the
    products in FP32 and keep the softmax statistics and the scaled, masked scores
    in FP32; P is rounded to the half type for ``P @ V``, as the explicit policy
    attention rounds it.  (cuDNN's SDPA documents its compute type as FLOAT unless
    asked otherwise, whatever the Q/K/V storage type: docs.nvidia.com/cudnn,
    operations/Attention; PyTorch's memory-efficient kernel, from xFormers'
    CUTLASS code, accumulates in float.)
    """
    dtypes = getattr(module, DTYPES_ATTRIBUTE)
    matmul_dtype, stream_dtype = dtypes["matmul"], dtypes["elementwise"]
    if dtypes["softmax"] != torch.float32 or matmul_dtype == torch.float32:
        # This module's policy is not the kernel's arithmetic: the explicit attention.
        return policy_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    note_reduction("matmul", matmul_dtype, FUSED_ATTENTION)
    note_reduction("softmax", torch.float32, FUSED_ATTENTION)
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[-2]
    q, k, v = (t.to(matmul_dtype) for t in (query, key, value))
    cudnn = getattr(module, "_fidelity_cudnn_attention", False) and kv_len >= CUDNN_MIN_KEY_LENGTH
    bias = None
    if attention_mask is not None:
        bias = _aligned_bias(attention_mask, matmul_dtype, (batch, heads, q_len, kv_len), broadcast_heads=cudnn)
    if cudnn:
        output = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, False, 0.0, False, False, scale=scaling)[0]
    else:
        output = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False, scale=scaling)[0]
    return output.transpose(1, 2).contiguous().to(stream_dtype), None


def cudnn_attention_works(device: torch.device) -> bool:
    """Whether cuDNN's attention runs here with a bias broadcast over heads, and gives what the expanded bias gives.

    Tried, not assumed: a PyTorch or cuDNN without it (or without the kernel at
    all) leaves the engine on the memory-efficient kernel.
    """
    length = CUDNN_MIN_KEY_LENGTH
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, 2, length, 64, generator=generator, device=device).to(torch.float16)
        bias = torch.zeros(1, 1, length, length, dtype=torch.float16, device=device)
        bias[..., length // 2 :] = torch.finfo(torch.float16).min  # the second half of the keys masked
        attend = torch.ops.aten._scaled_dot_product_cudnn_attention
        broadcast = attend(q, q, q, bias, False, 0.0, False, False)[0]
        expanded = attend(q, q, q, bias.expand(1, 2, length, length).contiguous(), False, 0.0, False, False)[0]
        return bool(torch.allclose(broadcast.float(), expanded.float(), atol=1e-3, rtol=0))
    except (RuntimeError, NotImplementedError):
        return False


@functools.cache
def register_fused_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(FUSED_ATTENTION_NAME, fused_policy_attention)
    AttentionMaskInterface.register(FUSED_ATTENTION_NAME, _policy_mask)


class ProjectionSlice(nn.Module):
    """A GEMM whose output is a column slice of a wider weight's product; PolicyLinear's arithmetic.

    Two uses, each keeping every product the same:

    * Q, K and V as slices of the concatenated Q|K|V GEMM.  The three slices of a
      layer share one weight and run the same GEMM on the same input; Inductor's
      common-subexpression elimination keeps one, so the compiled graph does one
      [hidden, 3 x hidden] GEMM where BERT's code asks for three.  (Eager, each
      slice would repeat the whole GEMM: only the compiled engine uses this, and only
      where freezing makes the weight a constant: not in regional mode.)
    * An unaligned width padded with zero rows and cut back: GPT-2's 50257-wide LM
      head sent cuBLAS to a slow kernel (an sm75 CUTLASS kernel on the H100, 127 us
      at b1 s128).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, start: int, stop: int, compute_dtype, output_dtype) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.start, self.stop = start, stop
        self.compute_dtype = compute_dtype
        self.output_dtype = output_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = F.linear(x.to(self.compute_dtype), self.weight, self.bias)
        return product[..., self.start : self.stop].to(self.output_dtype)


def _zero_padded(tensor: torch.Tensor, rows: int) -> nn.Parameter:
    padded = tensor.new_zeros(rows, *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    return nn.Parameter(padded, requires_grad=False)


def pad_unaligned_projections(module: nn.Module, multiple: int = 64) -> int:
    """Swap every PolicyLinear whose width is not a multiple of 8 for a slice of one padded to ``multiple``."""
    swaps = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, PolicyLinear) and child.weight.shape[0] % 8
    ]
    for parent, name, child in swaps:
        width = child.weight.shape[0]
        rows = -(-width // multiple) * multiple
        bias = None if child.bias is None else _zero_padded(child.bias, rows)
        padded = ProjectionSlice(_zero_padded(child.weight, rows), bias, 0, width, child.compute_dtype, child.output_dtype)
        setattr(parent, name, padded)
    return len(swaps)


def fuse_qkv_projections(module: nn.Module) -> int:
    """Replace separate query/key/value PolicyLinears by slices of one GEMM; returns how many layers."""
    fused = 0
    for parent in module.modules():
        parts = [getattr(parent, name, None) for name in ("query", "key", "value")]
        if not all(isinstance(p, PolicyLinear) for p in parts):
            continue
        if len({(p.compute_dtype, p.output_dtype, p.weight.shape[1], p.bias is None) for p in parts}) != 1:
            continue
        weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        bias = None if parts[0].bias is None else nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        start = 0
        for name, part in zip(("query", "key", "value"), parts):
            stop = start + part.weight.shape[0]
            setattr(parent, name, ProjectionSlice(weight, bias, start, stop, part.compute_dtype, part.output_dtype))
            start = stop
        fused += 1
    return fused


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: instances of its ``_no_split_modules`` classes (transformers' own list)."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    blocks = [sub for sub in module.modules() if type(sub).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(module).__name__} names no repeated blocks (_no_split_modules): regional compilation needs "
            "them; use --compile-mode default"
        )
    return blocks


def _allow_recompiles(count: int) -> None:
    # One static graph per bucket: Dynamo's default of 8 per function would send
    # the ninth shape to eager (silently slow), so the limit covers the buckets.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < count:
            setattr(dynamo_config, name, count)


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _torch_default_inductor_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a PyTorch that moved it: only an explicit setting is recognised
        return None
    return default_cache_dir()


def inductor_cache_dir(cache) -> str:
    """Where Inductor keeps compiled graphs: $TORCHINDUCTOR_CACHE_DIR if the user set it, else under the engine cache.

    Inductor writes its own default (``/tmp/torchinductor_<user>``) into the
    environment the first time it looks, so a value equal to that default is taken
    as unset.  Nothing is written here: :func:`inductor_cache` sets the variable
    only while this engine compiles.
    """
    configured = os.environ.get(INDUCTOR_CACHE_ENV)
    if configured and configured != _torch_default_inductor_dir():
        return configured
    if cache is None:
        from engines.cache import EngineCache

        cache = EngineCache()
    if not cache.writable():
        # Inductor writes lock files even when it only reads: a read-only engine cache cannot hold its
        # cache, which then goes where Inductor puts it by default (compiled again in a new process).
        return _torch_default_inductor_dir() or str(Path(tempfile.gettempdir()) / "torchinductor")
    return str(cache.root / "torchinductor")


@contextlib.contextmanager
def inductor_cache(path: str):
    """Inductor reads its cache folder from the environment when it compiles: set it for the block, then restore."""
    previous = os.environ.get(INDUCTOR_CACHE_ENV)
    os.environ[INDUCTOR_CACHE_ENV] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(INDUCTOR_CACHE_ENV, None)
        else:
            os.environ[INDUCTOR_CACHE_ENV] = previous


class TorchCompileRunner(KeepsCapturedGraphs, TorchRunner):
    backend: ClassVar[str] = "torch-compile"

    def __init__(self, model, policy, device: str, options=None, *, max_graphs: int = 16) -> None:
        super().__init__(model, policy, device, options)
        compile_mode = self.options.compile_mode
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown torch.compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        self.compile_mode = compile_mode
        self.max_graphs = max_graphs
        self.cache_dir = inductor_cache_dir(self.options.cache)
        self.fused_attention = self.device.type == "cuda" and fused_attention_allowed(policy)
        self.compiled = None
        self.fused_qkv_layers = 0
        self.padded_projections = 0
        self.blocks: list[nn.Module] = []  # regional mode: the blocks compiled in place
        self.cudnn_attention = False
        self._compiled_buckets: set[tuple[int, int]] = set()

    def _make_module(self) -> nn.Module:
        module = apply_policy(self.model.module, self.policy)
        if self.compile_mode not in REGIONAL_MODES:
            # Regional graphs take the weights as inputs, and the three slices' GEMMs were then not merged: the
            # generated code ran the [hidden, 3 x hidden] GEMM three times per layer (tiny-bert on the CPU: 6
            # addmm per layer against 4; on the H100 regional BERT was 1.25-1.45x slower than the default mode).
            self.fused_qkv_layers = fuse_qkv_projections(module)
        self.padded_projections = pad_unaligned_projections(module)
        if self.fused_attention:
            register_fused_attention()
            module.set_attn_implementation(FUSED_ATTENTION_NAME)
            self.cudnn_attention = cudnn_attention_works(self.device)
            for sub in module.modules():
                sub._fidelity_cudnn_attention = self.cudnn_attention
        return module

    def _build(self) -> None:
        super()._build()  # the module, and the audit of its eager run
        graphs_per_engine = len(BATCH_BUCKETS) * len(SEQUENCE_BUCKETS) + 2
        options = dict(COMPILE_MODES[self.compile_mode])
        # Static shapes: dynamic=True was tried on the H100 and Dynamo still
        # recompiled per sequence bucket (the mask code specializes on it), each
        # compile 2-3x slower than a static one.
        if self.compile_mode in REGIONAL_MODES:
            # Every compiled block's graphs are cache entries of one code object (nn.Module._call_impl): one per
            # bucket and block class (BERT: its embeddings and its layers), for every live regional engine.
            blocks = repeated_blocks(self.forward.model)
            _allow_recompiles(graphs_per_engine * len({type(block) for block in blocks}) * _REGIONAL_ENGINES_ALIVE)
            for block in blocks:  # nn.Module.compile: in place; blocks of one class share their graphs
                block.compile(options=options, dynamic=False)
            self.blocks = blocks
            self.compiled = self.forward
        else:
            _allow_recompiles(graphs_per_engine)
            self.compiled = torch.compile(self.forward, options=options, dynamic=False)
        if self.device.type == "cuda":
            self._graphs = CapturedGraphs(self.compiled, self.device, self.max_graphs)

    def padded(self, batch: TokenBatch) -> TokenBatch:
        """``batch`` padded up to its bucket: masked pad tokens, padded rows attend their first token only."""
        shape = batch.shape
        target = bucket_shape(shape, self.model.max_positions)
        if target == shape:
            return batch
        ids = batch.input_ids.new_full(target, self.model.pad_token_id)
        mask = batch.attention_mask.new_zeros(target)
        mask[shape[0] :, 0] = 1  # a fully masked row would be a NaN hazard in rows nobody reads
        ids[: shape[0], : shape[1]] = batch.input_ids
        mask[: shape[0], : shape[1]] = batch.attention_mask
        return TokenBatch(ids, mask, batch.source)

    def _stage(self, batch: TokenBatch) -> tuple[TokenBatch, tuple[int, int]]:
        """The batch on the device, padded to its bucket, with the rows and length to cut the output back to."""
        return self.padded(super()._stage(batch)), batch.shape

    @torch.inference_mode()
    def _run(self, staged: tuple[TokenBatch, tuple[int, int]]) -> torch.Tensor:
        padded, (rows, length) = staged
        if padded.shape in self._compiled_buckets:
            output = self._execute(padded)
        else:  # the first call at this bucket compiles: in this engine's cache folder
            with inductor_cache(self.cache_dir):
                output = self._execute(padded)
            self._compiled_buckets.add(padded.shape)
        return output[:rows, :length].float()

    def _execute(self, padded: TokenBatch) -> torch.Tensor:
        if self._graphs is None:  # the CPU: no graphs to capture
            return self.compiled(padded.input_ids, padded.attention_mask)
        return self._graphs.run(padded)

    def _close(self) -> None:
        self.compiled = None
        # nn.Module.compile keeps the compiled call on the block, and the call holds the block: left in place, that
        # cycle keeps a closed engine's blocks (nearly all its weights) alive until Python's garbage collector runs,
        # on the device in the middle of whatever is measured next.
        for block in self.blocks:
            block._compiled_call_impl = None
        self.blocks = []
        # Dynamo's code cache keeps every compiled graph, and with freezing their
        # weight constants, alive after the engine is gone: drop it.  Another
        # live compile engine keeps its captured graphs; a new shape recompiles.
        torch.compiler.reset()
        super()._close()  # the captured graphs, then the module and the allocator's cache

    @property
    def compiled_blocks(self) -> int:
        return len(self.blocks)

    def _info(self) -> EngineInfo:
        attention = "explicit policy attention"
        if self.fused_attention:
            attention = "memory-efficient attention kernel" + (
                f" (cuDNN attention from {CUDNN_MIN_KEY_LENGTH} keys)" if self.cudnn_attention else ""
            ) + ", FP32 softmax inside"
        graphs = f", CUDA graph per bucket (max {self.max_graphs} cached)" if self.device.type == "cuda" else ""
        mode = (
            f"torch.compile mode={self.compile_mode}, static shapes padded to buckets{graphs}; {attention}"
            + (f"; {self.compiled_blocks} repeated blocks compiled in place, the rest eager" if self.compiled_blocks else "")
            + (f"; Q|K|V as one GEMM in {self.fused_qkv_layers} layers" if self.fused_qkv_layers else "")
            + (f"; {self.padded_projections} unaligned projection(s) padded to 64" if self.padded_projections else "")
        )
        return dataclasses.replace(super()._info(), mode=mode, details={"inductor_cache": self.cache_dir})
