"""Make a Hugging Face BERT/GPT-2 module compute exactly what a PrecisionPolicy says.

``apply_policy`` rewrites a deep copy of the FP32 model:

* every module whose class the op-class table (:data:`engines.precision.policy.OP_CLASSES`)
  lists is replaced by its policy implementation (:data:`IMPLEMENTATIONS`): ``nn.Linear``
  and GPT-2's ``Conv1D`` by a :class:`PolicyLinear` that casts its input to its class's
  dtype, runs the GEMM there and casts the result to the residual-stream
  (elementwise) dtype; ``nn.LayerNorm`` by a :class:`PolicyLayerNorm`, native or, for
  strict policies, from arithmetic in its dtype;
* attention runs through :func:`policy_attention`, registered with transformers'
  ``AttentionInterface`` under :data:`ATTENTION_NAME`, which does ``Q @ K^T`` and
  ``P @ V`` in the matmul dtype and the masked softmax in the softmax dtype;
* everything else (embeddings, residual adds, GELU) is in the elementwise dtype.

Each dtype is the policy's for the module's path (``encoder.layer.3.output.LayerNorm``),
so a policy file's per-module overrides hold here as in the ONNX graphs.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.nn import functional as F

from engines.precision.audit import note_reduction
from engines.precision.policy import PolicyError, PrecisionPolicy, op_class_of_module, torch_dtype

ATTENTION_NAME = "fidelity_policy"
# Per module: {op class: torch dtype} for the computations the module does itself
# (attention's products and softmax); set by apply_policy.
DTYPES_ATTRIBUTE = "_fidelity_dtypes"
# Set on an attention module while a divergence trace runs (Runner.intermediates): the module then returns its
# attention probabilities, as transformers' eager attention does; otherwise None (nothing kept alive in a graph).
CAPTURE_PROBS_ATTRIBUTE = "_fidelity_capture_probs"


# --- strict low-precision reductions ----------------------------------------


def low_precision_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum along ``dim`` as a pairwise tree of additions in ``x.dtype``.

    Each partial sum is rounded to ``x.dtype`` (elementwise half ops round their
    result), unlike ``torch.sum``, whose half kernels accumulate in FP32.  This is
    how a reduction computed in FP16 arithmetic behaves: it overflows at 65504.
    """
    x = x.movedim(dim, -1)
    width = x.shape[-1]
    padded = 1 << max(width - 1, 0).bit_length()
    if padded != width:
        x = F.pad(x, (0, padded - width))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x.movedim(-1, dim)


def strict_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm whose every intermediate is rounded to ``x.dtype`` (TensorRT FP16 style)."""
    width = x.shape[-1]
    mean = low_precision_sum(x) / width
    centered = x - mean
    variance = low_precision_sum(centered * centered) / width
    # The sum is rounded to x.dtype, so an eps below its smallest subnormal is
    # lost, as in an FP16 graph: a constant row then divides by zero.
    denom = torch.sqrt(variance + eps)
    return centered / denom * weight + bias


def strict_softmax(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.amax(dim=-1, keepdim=True)
    exps = torch.exp(shifted)
    return exps / low_precision_sum(exps)


# --- modules ------------------------------------------------------------------


class PolicyLinear(nn.Module):
    """A GEMM in ``compute_dtype`` with its result in ``output_dtype``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype, output_dtype) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.output_dtype = output_dtype
        self.weight = nn.Parameter(weight.detach().to(compute_dtype).contiguous(), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        )

    @classmethod
    def from_linear(cls, module: nn.Linear, compute_dtype, output_dtype) -> "PolicyLinear":
        return cls(module.weight, module.bias, compute_dtype, output_dtype)

    @classmethod
    def from_conv1d(cls, module, compute_dtype, output_dtype) -> "PolicyLinear":
        # GPT-2's Conv1D stores W as [in, out] and computes x @ W + b.
        return cls(module.weight.t(), module.bias, compute_dtype, output_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.compute_dtype), self.weight, self.bias).to(self.output_dtype)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in={in_f}, out={out_f}, compute={self.compute_dtype}, output={self.output_dtype}"


class PolicyLayerNorm(nn.Module):
    def __init__(self, module: nn.LayerNorm, compute_dtype, output_dtype, strict: bool) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.output_dtype = output_dtype
        self.strict = strict
        self.eps = module.eps
        self.normalized_shape = module.normalized_shape
        self.weight = nn.Parameter(module.weight.detach().to(compute_dtype), requires_grad=False)
        self.bias = nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.strict:
            note_reduction("layernorm", x.dtype)
            y = strict_layer_norm(x, self.weight, self.bias, self.eps)
        else:
            y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.to(self.output_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, compute={self.compute_dtype}, strict={self.strict}"


# --- attention ----------------------------------------------------------------


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The same convention as transformers' eager path: 0 where attended, the
    # dtype's most negative finite value where masked, added to the scores.
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype).clamp_min(torch.finfo(dtype).min)


def policy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with each step in the dtype the module's policy assigns it."""
    policy: PrecisionPolicy = module._fidelity_policy
    dtypes = getattr(module, DTYPES_ATTRIBUTE)
    matmul_dtype, softmax_dtype, stream_dtype = dtypes["matmul"], dtypes["softmax"], dtypes["elementwise"]
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    # GPT-2 may hand grouped K/V in other models; here heads always match.
    scores = torch.matmul(query.to(matmul_dtype), key.to(matmul_dtype).transpose(-1, -2))
    scores = scores.to(softmax_dtype) * scaling
    if attention_mask is not None:
        scores = scores + _additive_mask(attention_mask, softmax_dtype)
    if policy.strict_reductions:
        note_reduction("softmax", scores.dtype)
        probs = strict_softmax(scores)
    else:
        probs = F.softmax(scores, dim=-1)
    output = torch.matmul(probs.to(matmul_dtype), value.to(matmul_dtype)).to(stream_dtype)
    return output.transpose(1, 2).contiguous(), (probs if getattr(module, CAPTURE_PROBS_ATTRIBUTE) else None)


def _policy_mask(*args, **kwargs):
    # A full boolean mask every time: skipping it (transformers' "is_causal"
    # shortcut) would hand the decision back to a fused kernel we do not audit.
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


@functools.cache
def register_policy_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, policy_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _policy_mask)


# --- applying a policy --------------------------------------------------------


# Module class name (as the op-class table lists it) -> its policy implementation:
# (module, compute dtype, residual-stream dtype, policy) -> replacement.
IMPLEMENTATIONS = {
    "Linear": lambda m, dtype, stream, policy: PolicyLinear.from_linear(m, dtype, stream),
    "Conv1D": lambda m, dtype, stream, policy: PolicyLinear.from_conv1d(m, dtype, stream),
    "LayerNorm": lambda m, dtype, stream, policy: PolicyLayerNorm(m, dtype, stream, policy.strict_reductions),
}


def check_overrides(policy: PrecisionPolicy, module_paths: list[str], *, model_name: str = "model") -> None:
    """Refuse a policy the torch engines cannot apply as written: ONNX node overrides, or overrides matching nothing."""
    if policy.has_node_overrides:
        nodes = [o.describe() for o in policy.overrides if o.node is not None]
        raise PolicyError(
            f"policy {policy.name!r} ({policy.source}) names ONNX nodes ({'; '.join(nodes)}): only the ONNX backends "
            "(onnxrt, onnx-torch, trt) can apply it. Use module overrides for the torch backends."
        )
    unmatched = policy.unmatched_overrides(modules=module_paths)
    if unmatched:
        raise PolicyError(
            f"policy {policy.name!r} ({policy.source}): override(s) {'; '.join(o.describe() for o in unmatched)} "
            f"match no module of {model_name}; module paths look like {module_paths[min(3, len(module_paths) - 1)]!r}"
        )


POLICY_MODULES = (PolicyLinear, PolicyLayerNorm)


def _to_stream_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters and buffers of every module but the policy modules to ``dtype``."""
    for module in model.modules():
        if isinstance(module, POLICY_MODULES):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)


def apply_policy(model: nn.Module, policy: PrecisionPolicy) -> nn.Module:
    """A deep copy of ``model`` rewritten to compute as ``policy`` says, module by module."""
    register_policy_attention()
    paths = [name for name, _ in model.named_modules() if name]
    check_overrides(policy, paths, model_name=type(model).__name__)
    stream_dtype = torch_dtype(policy.dtype_of("elementwise"))

    model = copy.deepcopy(model)
    # GPT-2 ties lm_head to the token embedding; a policy may want them in
    # different dtypes, so the copy is untied before anything is converted.
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)

    # Policy modules take their weights from the FP32 originals, converted once to their
    # own dtype (an FP32 override on an FP16 base keeps the exact FP32 weights, as the ONNX
    # converter does); everything else is then cast to the residual-stream dtype.
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for parent_path, parent in model.named_modules():
        for child_name, child in parent.named_children():
            op_class = op_class_of_module(child)
            if op_class is None:
                continue
            kind = type(child).__name__
            if kind not in IMPLEMENTATIONS:
                raise PolicyError(
                    f"the op-class table puts {kind} modules in {op_class!r}, but the torch rewrite has no policy "
                    f"implementation for {kind}: add one to engines/precision/torch_apply.py IMPLEMENTATIONS"
                )
            path = f"{parent_path}.{child_name}" if parent_path else child_name
            dtype = torch_dtype(policy.dtype_of(op_class, module=path))
            replacements.append((parent, child_name, IMPLEMENTATIONS[kind](child, dtype, stream_dtype, policy)))
    for parent, child_name, new in replacements:
        setattr(parent, child_name, new)
    _to_stream_dtype(model, stream_dtype)

    for path, module in model.named_modules():
        module._fidelity_policy = policy
        # Present (False) from the start: a compiled graph guards on it, and a trace sets it only for its own run.
        setattr(module, CAPTURE_PROBS_ATTRIBUTE, False)
        setattr(
            module,
            DTYPES_ATTRIBUTE,
            {c: torch_dtype(policy.dtype_of(c, module=path or None)) for c in ("matmul", "softmax", "elementwise")},
        )
    model.set_attn_implementation(ATTENTION_NAME)
    return model.eval()
