"""Proof, per engine, that it computes in the dtypes its policy claims; one result shape for every backend.

Every engine's build ends with a :class:`PrecisionAudit`: how the proof was made
(``method``), how many ops of each op class ran (or are declared) in each dtype
(``counts``), what disagrees with the policy (``problems``: an engine with any must
not be measured), and what the method cannot see (``blind_spots``).  Three methods,
one per kind of engine:

* PyTorch engines (:func:`check_policy`): :class:`DtypeAudit` is a
  ``TorchFunctionMode``: while it is active, every call of a torch function the
  op-class table lists (``linear``/``matmul``/..., ``softmax``, ``layer_norm``) is
  recorded with the dtype of the tensors it received and the module it ran in.  The
  strict low-precision reductions and fused attention kernels, which it cannot see
  into, report themselves through :func:`note_reduction`.
* ONNX graphs (:func:`engines.precision.onnx_convert.audit_graph`): every compute
  node's input dtypes, read from the graph.
* TensorRT (:mod:`engines.backends.trt`): the parsed network's layers before the build.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from engines.precision.policy import FLOAT32, PrecisionPolicy, checked_classes, op_class_of_function

# Fused attention hides the dtype of its softmax; its calls are recorded so that a
# policy that did not ask for it fails the audit instead of passing blind.  (Not an
# op class of the policy: a kernel that computes two of them.)
FUSED_ATTENTION_FUNCTIONS = frozenset(
    {
        "scaled_dot_product_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
    }
)
FUSED_CALL = "fused_attention"
NATIVE = "native"
LOW_PRECISION_REDUCTION = "low-precision-reduction"
# An attention kernel whose caller declares its arithmetic (half GEMM inputs,
# FP32 softmax): each declared call accounts for one fused_attention record.
FUSED_ATTENTION = "fused-attention-kernel"
TOP = "<top>"

_ACTIVE: list["DtypeAudit"] = []


class PrecisionMismatchError(AssertionError):
    """An engine does not compute in the precision it claims."""


@dataclasses.dataclass(frozen=True)
class OpRecord:
    op_class: str
    dtype: str
    impl: str
    module: str  # module path inside the transformers model, or TOP


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def note_reduction(op_class: str, dtype: torch.dtype, impl: str = LOW_PRECISION_REDUCTION) -> None:
    """Called by code the audit cannot see into: it computes ``op_class`` in ``dtype`` arithmetic.

    The strict reductions (``impl`` LOW_PRECISION_REDUCTION) and the fused attention
    kernel (FUSED_ATTENTION, once for its GEMMs and once for its softmax).
    """
    if _ACTIVE:
        _ACTIVE[-1]._record(op_class, dtype, impl)


class DtypeAudit(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self._module_stack: list[str] = []

    def _record(self, op_class: str, dtype: torch.dtype, impl: str) -> None:
        where = self._module_stack[-1] if self._module_stack else TOP
        self.records.append(OpRecord(op_class, _dtype_name(dtype), impl, where))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        op_class = FUSED_CALL if name in FUSED_ATTENTION_FUNCTIONS else op_class_of_function(name)
        if op_class is not None:
            floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if floats:
                self._record(op_class, floats[0].dtype, NATIVE)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def watching(self, model: torch.nn.Module) -> Iterator["DtypeAudit"]:
        """Activate the audit and track which module (path inside ``model``) each call came from."""
        stack = self._module_stack

        def enter(name: str):
            def hook(module, args) -> None:
                stack.append(name)

            return hook

        def leave(module, args, output) -> None:
            stack.pop()

        handles = []
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name or TOP)))
            handles.append(module.register_forward_hook(leave))
        _ACTIVE.append(self)
        try:
            with self:
                yield self
        finally:
            _ACTIVE.pop()
            for handle in handles:
                handle.remove()


@dataclasses.dataclass
class PrecisionAudit:
    """The one audit shape: how the proof was made, what ran in which dtype, what disagrees."""

    engine: str
    policy: str
    method: str
    counts: dict[str, dict[str, int]]  # op class -> dtype -> ops
    problems: list[str]
    blind_spots: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # method-specific tallies

    def __bool__(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tally(pairs) -> dict[str, dict[str, int]]:
    """``{op class: {dtype: n}}`` from ``(op class, dtype)`` pairs, sorted."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for op_class, dtype in pairs:
        counts[op_class][dtype] += 1
    return {c: dict(sorted(n.items())) for c, n in sorted(counts.items())}


def check_policy(records: list[OpRecord], policy: PrecisionPolicy, *, engine: str, tf32: bool = False) -> PrecisionAudit:
    """Compare what ran with what the policy claims, module by module; list every disagreement."""
    problems: list[str] = []
    by_class: dict[str, list[OpRecord]] = collections.defaultdict(list)
    for record in records:
        by_class[record.op_class].append(record)

    expected_impl = LOW_PRECISION_REDUCTION if policy.strict_reductions else NATIVE
    for op_class in checked_classes():
        seen = by_class.get(op_class, [])
        if not seen:
            problems.append(f"no {op_class} op was observed, so its precision cannot be verified")
            continue
        wrong = [
            r for r in seen if r.dtype != policy.dtype_of(op_class, module=None if r.module == TOP else r.module)
        ]
        if wrong:
            first = wrong[0]
            problems.append(
                f"{op_class}: {len(wrong)} of {len(seen)} calls ran in {sorted({r.dtype for r in wrong})} where the "
                f"policy says {policy.dtype_of(op_class, module=first.module)} (first in {first.module!r})"
            )
        if op_class in ("softmax", "layernorm"):
            allowed = {expected_impl}
            if op_class == "softmax" and not policy.strict_reductions:
                allowed.add(FUSED_ATTENTION)  # the kernel's softmax is native FP32 arithmetic
            wrong_impl = [r for r in seen if r.impl not in allowed]
            if wrong_impl:
                problems.append(
                    f"{op_class}: policy wants the {expected_impl} implementation, but {len(wrong_impl)} of "
                    f"{len(seen)} calls used {wrong_impl[0].impl} (first in {wrong_impl[0].module!r})"
                )
    declared_fused = sum(1 for r in by_class.get("softmax", []) if r.impl == FUSED_ATTENTION)
    fused_calls = by_class.pop(FUSED_CALL, [])
    if len(fused_calls) > declared_fused:
        problems.append(
            f"{len(fused_calls) - declared_fused} fused attention call(s) (first in {fused_calls[0].module!r}) "
            "compute softmax in a precision this audit cannot see; the policy does not allow them"
        )
    for op_class, seen in by_class.items():
        if op_class not in checked_classes():
            problems.append(
                f"{len(seen)} {op_class} call(s) (first in {seen[0].module!r}) compute in a precision this "
                "audit cannot see; the policy does not allow them"
            )
    if tf32 and policy.dtype_of("matmul") == FLOAT32:
        problems.append("TF32 is enabled, so FP32 matmuls may run in TF32; the FP32 policy requires it off")
    implementations = collections.Counter(f"{r.op_class}:{r.impl}" for r in records)
    return PrecisionAudit(
        engine=engine,
        policy=policy.name,
        method="torch function calls recorded while the engine ran a probe batch",
        counts=tally((r.op_class, r.dtype) for r in records if r.op_class != FUSED_CALL),
        problems=problems,
        blind_spots=["elementwise arithmetic (the residual stream) is not recorded per call"],
        details={"implementations": dict(sorted(implementations.items()))},
    )


def raise_on_mismatch(audit: PrecisionAudit) -> None:
    if not audit:
        raise PrecisionMismatchError(
            f"{audit.engine} claims precision {audit.policy!r} but computes otherwise ({audit.method}):\n  - "
            + "\n  - ".join(audit.problems)
            + f"\n  observed ops: {audit.counts}"
        )
