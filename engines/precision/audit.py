"""Run-time proof that an engine computes in the dtypes its policy claims.

:class:`DtypeAudit` is a ``TorchFunctionMode``: while it is active, every
``linear``/``matmul``/``addmm``/``bmm``, ``softmax`` and ``layer_norm`` call is
recorded with the dtype of the tensors it actually received and the module it ran
in.  The strict low-precision reductions, built from elementwise ops, report
themselves through :func:`note_reduction`.  :func:`check_policy` turns the record
into a verdict; an engine whose audit fails must not be measured.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

from engines.precision.policy import PrecisionPolicy

# torch function name -> op class of engines.precision.policy
_FUNCTION_CLASSES = {
    "linear": "matmul",
    "matmul": "matmul",
    "__matmul__": "matmul",
    "mm": "matmul",
    "bmm": "matmul",
    "addmm": "matmul",
    "baddbmm": "matmul",
    "einsum": "matmul",
    "softmax": "softmax",
    "_softmax": "softmax",
    "layer_norm": "layernorm",
    # Fused attention hides the dtype of its softmax; it is recorded so that a
    # policy that did not ask for it fails the audit instead of passing blind.
    "scaled_dot_product_attention": "fused_attention",
    "_scaled_dot_product_efficient_attention": "fused_attention",
    "_scaled_dot_product_flash_attention": "fused_attention",
    "_scaled_dot_product_cudnn_attention": "fused_attention",
}
AUDITED_CLASSES = ("matmul", "softmax", "layernorm")
NATIVE = "native"
LOW_PRECISION_REDUCTION = "low-precision-reduction"
# An attention kernel whose caller declares its arithmetic (half GEMM inputs,
# FP32 softmax): each declared call accounts for one fused_attention record.
FUSED_ATTENTION = "fused-attention-kernel"

_ACTIVE: list["DtypeAudit"] = []


class PrecisionMismatchError(AssertionError):
    """An engine does not compute in the precision it claims."""


@dataclasses.dataclass(frozen=True)
class OpRecord:
    op_class: str
    dtype: str
    impl: str
    module: str


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
        where = self._module_stack[-1] if self._module_stack else "<top>"
        self.records.append(OpRecord(op_class, _dtype_name(dtype), impl, where))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op_class = _FUNCTION_CLASSES.get(getattr(func, "__name__", ""))
        if op_class is not None:
            floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if floats:
                self._record(op_class, floats[0].dtype, NATIVE)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def watching(self, model: torch.nn.Module) -> Iterator["DtypeAudit"]:
        """Activate the audit and track which module each call came from."""
        stack = self._module_stack

        def enter(name: str):
            def hook(module, args) -> None:
                stack.append(name)

            return hook

        def leave(module, args, output) -> None:
            stack.pop()

        handles = []
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
        _ACTIVE.append(self)
        try:
            with self:
                yield self
        finally:
            _ACTIVE.pop()
            for handle in handles:
                handle.remove()

    def counts(self) -> dict[str, int]:
        tally = collections.Counter(f"{r.op_class}:{r.dtype}:{r.impl}" for r in self.records)
        return dict(sorted(tally.items()))


@dataclasses.dataclass
class PrecisionAudit:
    engine: str
    policy: str
    counts: dict[str, int]
    problems: list[str]

    def __bool__(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"policy": self.policy, "counts": self.counts, "problems": self.problems}


def check_policy(records: list[OpRecord], policy: PrecisionPolicy, *, engine: str, tf32: bool = False) -> PrecisionAudit:
    """Compare what ran with what the policy claims; list every disagreement."""
    problems: list[str] = []
    by_class: dict[str, list[OpRecord]] = collections.defaultdict(list)
    for record in records:
        by_class[record.op_class].append(record)

    expected_impl = LOW_PRECISION_REDUCTION if policy.strict_reductions else NATIVE
    for op_class in AUDITED_CLASSES:
        seen = by_class.get(op_class, [])
        if not seen:
            problems.append(f"no {op_class} op was observed, so its precision cannot be verified")
            continue
        want = policy.dtype_of(op_class)
        wrong = [r for r in seen if r.dtype != want]
        if wrong:
            problems.append(
                f"{op_class}: policy says {want}, but {len(wrong)} of {len(seen)} calls ran in "
                f"{sorted({r.dtype for r in wrong})} (first in {wrong[0].module!r})"
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
    fused_calls = by_class.pop("fused_attention", [])
    if len(fused_calls) > declared_fused:
        problems.append(
            f"{len(fused_calls) - declared_fused} fused attention call(s) (first in {fused_calls[0].module!r}) "
            "compute softmax in a precision this audit cannot see; the policy does not allow them"
        )
    for op_class, seen in by_class.items():
        if op_class not in AUDITED_CLASSES:
            problems.append(
                f"{len(seen)} {op_class} call(s) (first in {seen[0].module!r}) compute in a precision this "
                "audit cannot see; the policy does not allow them"
            )
    if tf32 and policy.dtype_of("matmul") == "float32":
        problems.append("TF32 is enabled, so FP32 matmuls may run in TF32; the FP32 policy requires it off")
    counts = dict(sorted(collections.Counter(f"{r.op_class}:{r.dtype}:{r.impl}" for r in records).items()))
    return PrecisionAudit(engine=engine, policy=policy.name, counts=counts, problems=problems)


def raise_on_mismatch(audit: PrecisionAudit) -> None:
    if not audit:
        raise PrecisionMismatchError(
            f"{audit.engine} claims precision {audit.policy!r} but computes otherwise:\n  - "
            + "\n  - ".join(audit.problems)
            + f"\n  observed ops: {audit.counts}"
        )
