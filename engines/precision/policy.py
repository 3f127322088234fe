"""Precision policies: the one place that says which ops run in which dtype.

Every backend reads its precision from a :class:`PrecisionPolicy` here: the PyTorch
engine swaps modules and the attention function according to it, and the ONNX
precision graphs (and through them TensorRT, which since 11.0 only builds strongly
typed networks) get their Casts from the same op classes.

Op classes
----------
``matmul``
    GEMMs: ``nn.Linear``, GPT-2's ``Conv1D`` (``addmm``), the LM head, and the two
    attention products ``Q @ K^T`` and ``P @ V``.  ONNX: ``MatMul``, ``Gemm``.
``softmax``
    The attention softmax.  ONNX: ``Softmax``.
``layernorm``
    LayerNorm, including the residual sum that feeds it.  ONNX: ``LayerNormalization``
    or its decomposition (``ReduceMean``, ``Sub``, ``Pow``, ``Sqrt``, ``Div``).
``elementwise``
    Everything else that carries activations: embeddings and their sums, residual
    adds, GELU, the attention scale and mask.  This is "the residual stream".

Strict reductions
-----------------
PyTorch's CUDA (and CPU) kernels for ``layer_norm`` and ``softmax`` read half
inputs but accumulate in FP32, which hides the overflow that TensorRT's FP16
layers (and a decomposed FP16 LayerNorm) show.  A policy with
``strict_reductions=True`` makes the PyTorch engine compute those two ops from
FP16 elementwise arithmetic with a pairwise FP16 sum, so every intermediate
(``(x - mean)^2``, the sum of squares, ``exp`` and its sum) is rounded to FP16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

FLOAT32 = "float32"
FLOAT16 = "float16"
BFLOAT16 = "bfloat16"
DTYPES = (FLOAT32, FLOAT16, BFLOAT16)

OP_CLASSES = ("matmul", "softmax", "layernorm", "elementwise")

# ONNX op types per op class.  The ONNX precision converter keeps an op in FP32
# when the policy says FP32 for its class; ops not listed here (Gather, Shape,
# Reshape, Where on integer/bool data, ...) carry no float math of their own and
# follow their inputs.
ONNX_OP_TYPES: Mapping[str, frozenset[str]] = {
    "matmul": frozenset({"MatMul", "Gemm"}),
    "softmax": frozenset({"Softmax"}),
    "layernorm": frozenset(
        {"LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal"}
    ),
    "elementwise": frozenset(
        {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Gelu", "FastGelu", "Where"}
    ),
}


class UnknownPrecisionError(ValueError):
    """A precision name that no policy defines."""


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    description: str
    matmul: str
    softmax: str
    layernorm: str
    elementwise: str
    strict_reductions: bool = False
    # Gated precisions must meet the cosine bar with zero NaN/Inf in every
    # `pytest -m fidelity` run; the others are measured and reported unless the
    # user gates them with --gate-precisions.
    gated_by_default: bool = False

    def __post_init__(self) -> None:
        for op_class in OP_CLASSES:
            dtype = getattr(self, op_class)
            if dtype not in DTYPES:
                raise ValueError(f"policy {self.name!r}: {op_class} dtype {dtype!r} is not one of {DTYPES}")

    def dtype_of(self, op_class: str) -> str:
        if op_class not in OP_CLASSES:
            raise KeyError(f"unknown op class {op_class!r}; expected one of {OP_CLASSES}")
        return getattr(self, op_class)

    @property
    def low_precision_dtypes(self) -> frozenset[str]:
        return frozenset(getattr(self, c) for c in OP_CLASSES) - {FLOAT32}

    @property
    def is_reference(self) -> bool:
        return all(getattr(self, c) == FLOAT32 for c in OP_CLASSES)

    def onnx_op_dtypes(self) -> dict[str, str]:
        """ONNX op type -> dtype it must compute in under this policy."""
        table: dict[str, str] = {}
        for op_class in OP_CLASSES:
            for op_type in ONNX_OP_TYPES[op_class]:
                table[op_type] = getattr(self, op_class)
        return table

    def summary(self) -> str:
        parts = [f"{c}={getattr(self, c)}" for c in OP_CLASSES]
        if self.strict_reductions:
            parts.append("reductions=low-precision")
        return ", ".join(parts)


POLICIES: Mapping[str, PrecisionPolicy] = {
    p.name: p
    for p in (
        PrecisionPolicy(
            name="fp32",
            description="FP32 reference: IEEE FP32 everywhere, TF32 off",
            matmul=FLOAT32,
            softmax=FLOAT32,
            layernorm=FLOAT32,
            elementwise=FLOAT32,
            gated_by_default=True,
        ),
        PrecisionPolicy(
            name="hybrid",
            description="FP16 GEMMs (linear layers, attention products); FP32 softmax, LayerNorm and residual stream",
            matmul=FLOAT16,
            softmax=FLOAT32,
            layernorm=FLOAT32,
            elementwise=FLOAT32,
            gated_by_default=True,
        ),
        PrecisionPolicy(
            name="fp16",
            description="FP16 everywhere (framework kernels may accumulate reductions in FP32)",
            matmul=FLOAT16,
            softmax=FLOAT16,
            layernorm=FLOAT16,
            elementwise=FLOAT16,
        ),
        PrecisionPolicy(
            name="fp16-strict",
            description="FP16 everywhere, softmax and LayerNorm reductions computed in FP16 arithmetic",
            matmul=FLOAT16,
            softmax=FLOAT16,
            layernorm=FLOAT16,
            elementwise=FLOAT16,
            strict_reductions=True,
        ),
        PrecisionPolicy(
            name="bf16",
            description="BF16 everywhere (framework kernels may accumulate reductions in FP32)",
            matmul=BFLOAT16,
            softmax=BFLOAT16,
            layernorm=BFLOAT16,
            elementwise=BFLOAT16,
        ),
    )
}

REFERENCE_POLICY = POLICIES["fp32"]


def get_policy(name: str) -> PrecisionPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPrecisionError(
            f"unknown precision {name!r}; known precisions: {', '.join(POLICIES)}. "
            "Pass them with --precisions NAME[,NAME...]."
        ) from None


def parse_policies(names: Iterable[str]) -> list[PrecisionPolicy]:
    return [get_policy(n.strip()) for n in names if n.strip()]
