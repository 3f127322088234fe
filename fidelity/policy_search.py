"""The smallest FP32-keep policy: which op classes, then which modules, must stay FP32 for an engine to pass.

TensorRT 11 has no per-layer precision any more (strong typing), so the answer is a
graph-level policy: a schema-1 policy file (engines.precision.policy) that every backend
takes unchanged.  The search starts from a low-precision policy (fp16, fp16-strict,
bf16 or a file) and uses **delta debugging** (Zeller's ddmin, the "find a 1-minimal
passing subset" form) twice:

1. over the op classes (matmul, softmax, layernorm, elementwise): the fewest classes to
   keep FP32 everywhere;
2. over the module instances of each kept class that policies may override per module
   (every Linear/Conv1D for matmul, every LayerNorm, every attention module for
   softmax): the fewest modules to keep FP32, each an ``overrides`` entry, replacing the
   class-wide keep where that passes.

A candidate passes when, on every input, no output is non-finite and every sample's
cosine against the FP32 reference is at least ``1 - (1 - bar) / margin`` (bar 0.9998 and
margin 2 by default: half the published error budget).  1-minimal means: dropping any
one kept item fails.  Every candidate tried is recorded (the search path).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engines.batch import TokenBatch
from engines.precision.policy import FLOAT32, OP_CLASSES, Override, PrecisionPolicy, op_class_of_module
from fidelity.metrics import PUBLISHED_COSINE_MIN, CompareContext, Tolerance, compare_outputs

DEFAULT_BAR = PUBLISHED_COSINE_MIN
DEFAULT_MARGIN = 2.0
# Where a policy can give the softmax its own dtype: the attention modules (their path reaches the kernel).
_ATTENTION_PATH = re.compile(r"(?:attention\.self|\.attn)$")


@dataclasses.dataclass(frozen=True)
class Keep:
    """One thing kept in FP32: a whole op class (module None) or one module's op class."""

    op_class: str
    module: str | None = None

    def describe(self) -> str:
        return self.op_class if self.module is None else f"{self.op_class} @ {self.module}"


@dataclasses.dataclass(frozen=True)
class Candidate:
    stage: str
    keeps: tuple[Keep, ...]
    min_cosine: float
    nonfinite: int
    passed: bool
    seconds: float
    latency_ms: float | None = None


def policy_with(start: PrecisionPolicy, keeps: Sequence[Keep], *, name: str) -> PrecisionPolicy:
    classes = dict(start.classes)
    overrides = list(start.overrides)
    for keep in keeps:
        if keep.module is None:
            classes[keep.op_class] = FLOAT32
        else:
            overrides.insert(0, Override(dtype=FLOAT32, module=keep.module, op_class=keep.op_class))
    kept = ", ".join(k.describe() for k in keeps) or "nothing"
    return dataclasses.replace(
        start, name=name, classes=classes, overrides=tuple(overrides), gated_by_default=True, source="built-in",
        source_sha256=None, description=f"{start.name} with FP32 kept for: {kept} (found by fidelity.policy_search)",
    )


def module_keeps(module: torch.nn.Module, op_class: str) -> list[Keep]:
    """The per-module candidates of one op class, in module order."""
    if op_class == "softmax":
        return [Keep("softmax", name) for name, _ in module.named_modules() if _ATTENTION_PATH.search(name)]
    return [Keep(op_class, name) for name, m in module.named_modules() if name and op_class_of_module(m) == op_class]


def ddmin(items: list[Keep], passes: Callable[[list[Keep]], bool]) -> list[Keep]:
    """A 1-minimal subset of ``items`` that passes (``passes(items)`` is known to hold; the empty set fails)."""
    n = 2
    while len(items) >= 2:
        size = math.ceil(len(items) / n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        for chunk in chunks:
            if passes(chunk):
                items, n = chunk, 2
                break
        else:
            for chunk in chunks:
                rest = [x for x in items if x not in chunk]
                if rest and passes(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(len(items), 2 * n)
    return items


@dataclasses.dataclass
class SearchResult:
    start: PrecisionPolicy
    policy: PrecisionPolicy
    keeps: list[Keep]
    path: list[Candidate]
    threshold: float
    bar: float
    margin: float

    @property
    def final(self) -> Candidate:
        return next(c for c in reversed(self.path)
                    if c.stage != "published hybrid" and frozenset(c.keeps) == frozenset(self.keeps))

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.name, "bar": self.bar, "margin": self.margin, "cosine_threshold": self.threshold,
            "algorithm": "delta debugging (ddmin, 1-minimal passing subset): op classes, then modules",
            "keeps": [k.describe() for k in self.keeps], "policy": self.policy.describe(),
            "path": [{**dataclasses.asdict(c), "keeps": [k.describe() for k in c.keeps]} for c in self.path],
        }


class PolicySearch:
    """Searches for ``model`` on one backend: ``build(policy)`` gives a built runner, ``reference`` the FP32 one."""

    def __init__(self, model, start: PrecisionPolicy, build: Callable[[PrecisionPolicy], Any], reference,
                 inputs: Sequence[TokenBatch], *, bar: float = DEFAULT_BAR, margin: float = DEFAULT_MARGIN,
                 time_engine: Callable[[Any, TokenBatch], float] | None = None, progress=print) -> None:
        if not 0 < bar < 1 or margin < 1:
            raise ValueError("the bar must be in (0, 1) and the margin >= 1")
        self.model, self.start, self.build, self.inputs = model, start, build, list(inputs)
        self.bar, self.margin = bar, margin
        self.threshold = 1.0 - (1.0 - bar) / margin
        self.references = [reference.infer(batch) for batch in self.inputs]
        self.time_engine = time_engine
        self.progress = progress
        self.path: list[Candidate] = []
        self._seen: dict[frozenset[Keep], bool] = {}

    def _judge(self, stage: str, keeps: Sequence[Keep]) -> bool:
        key = frozenset(keeps)
        if key in self._seen:
            return self._seen[key]
        candidate = self.evaluate(stage, policy_with(self.start, keeps, name=f"search-{len(self.path)}"), keeps)
        self._seen[key] = candidate.passed
        return candidate.passed

    def evaluate(self, stage: str, policy: PrecisionPolicy, keeps: Sequence[Keep] = ()) -> Candidate:
        """One policy on the search's inputs, judged and timed as every candidate is; recorded in the path.

        The CLI also puts the published hybrid policy through it, so the report shows it beside the found one."""
        started = time.perf_counter()
        runner = self.build(policy)
        try:
            # The suite's own comparison (fidelity.metrics), held to the search's threshold.
            tolerance = Tolerance(self.threshold, source=f"policy search: bar {self.bar}, margin {self.margin:g}")
            results = [
                compare_outputs(runner.infer(batch), reference.to(runner.device), batch,
                                CompareContext(self.model.name, runner.backend, policy.name, str(runner.device),
                                               batch.source), tolerance)
                for batch, reference in zip(self.inputs, self.references)
            ]
            worst = min((r.min_cosine for r in results), key=lambda c: (not math.isnan(c), c))
            nonfinite = sum(r.nan_count + r.inf_count for r in results)
            passed = all(r.passed for r in results)
            latency = self.time_engine(runner, self.inputs[0]) if self.time_engine else None
        finally:
            runner.close()
        candidate = Candidate(stage, tuple(keeps), worst, nonfinite, passed, time.perf_counter() - started, latency)
        self.path.append(candidate)
        self.progress(f"  [{len(self.path):3d}] {stage}: keep {', '.join(k.describe() for k in keeps) or 'nothing'}: "
                      f"min cosine {worst:.7f}, {nonfinite} non-finite -> {'pass' if passed else 'fail'}")
        return candidate

    def run(self) -> SearchResult:
        classes = [Keep(c) for c in OP_CLASSES if self.start.classes[c] != FLOAT32]
        if not self._judge("start", []):
            if not self._judge("classes", classes):
                raise RuntimeError(f"{self.start.name} with every op class in FP32 still fails: the reference or the "
                                   "engine is wrong, not the precision")
            keeps = ddmin(classes, lambda subset: self._judge("classes", subset))
            refined: list[Keep] = []
            for index, keep in enumerate(keeps):  # each kept class: the fewest modules instead, where that passes
                modules = module_keeps(self.model.module, keep.op_class) if OP_CLASSES[keep.op_class].overridable else []
                context = refined + keeps[index + 1:]  # what is kept besides: refined classes' modules, later classes
                if modules and self._judge("modules", context + modules):
                    refined += ddmin(modules, lambda subset, c=context: self._judge("modules", c + subset))
                else:
                    refined.append(keep)
            keeps = refined
        else:
            keeps = []
        policy = policy_with(self.start, keeps, name=f"{self.start.name}-minimal-fp32")
        self._judge("final", keeps)
        return SearchResult(self.start, policy, keeps, self.path, self.threshold, self.bar, self.margin)
