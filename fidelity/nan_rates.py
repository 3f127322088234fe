"""NaN/Inf rates by input source: does natural text make an engine overflow more often than random tokens?

For one engine, per input source, the share of samples (rows) whose output has any
non-finite value at a valid position, and the share with any non-finite block output
(``Runner.intermediates``, where the backend exposes them), each with a Wilson 95%
interval (``scipy.stats.binomtest``); the FP32 reference's own count is the control.
Sources: ``random`` (uniform token ids, every position valid), ``hypothesis`` (the
suite's strategies, derandomized), ``text`` (natural text: WikiText-2 where given,
else the bundled prose; needs a tokenizer), and the stress inputs ``stress-padding``
(one valid token, the rest padding), ``stress-repeat`` (one token repeated to full length),
``stress-max`` (random ids at the model's maximum length).  Fully masked rows are not a
source: every engine refuses them as invalid input (``engines.batch.validate_batch``).

The published claim is that FP16 gives NaN on real text up to 6x more often than random
inputs suggest.  The ratio text/random comes with a 95% interval (Katz's log method;
with an empty cell, Haldane's +0.5 on every cell), and the verdict per engine is
*reproduced* (the interval lies above 1), *refuted* (it lies below 1), or
*undecided* (it straddles 1, or neither source produced a non-finite sample; every sample
failing on both is a ceiling, also undecided).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from engines.batch import TokenBatch
from fidelity.divergence import valid_positions

Z95 = 1.959963984540054
SOURCES = ("random", "hypothesis", "text", "stress-padding", "stress-repeat", "stress-max")


@dataclasses.dataclass(frozen=True)
class Rate:
    source: str
    samples: int
    nonfinite_output: int
    nonfinite_intermediate: int | None  # None: the backend exposes no block outputs
    reference_nonfinite: int
    below_bar: int | None = None  # samples whose cosine against FP32 is below the bar or not finite (None: not asked)

    def interval(self, count: int | None = None) -> tuple[float, float]:
        from scipy.stats import binomtest

        k = self.nonfinite_output if count is None else count
        if self.samples == 0:
            return (0.0, 1.0)
        ci = binomtest(k, self.samples).proportion_ci(confidence_level=0.95, method="wilson")
        return (float(ci.low), float(ci.high))

    @property
    def rate(self) -> float:
        return self.nonfinite_output / self.samples if self.samples else math.nan


@dataclasses.dataclass(frozen=True)
class RateRatio:
    ratio: float
    low: float
    high: float
    verdict: str  # "reproduced", "refuted", "undecided"


def ratio(text: Rate, random: Rate, *, of: str = "nonfinite_output") -> RateRatio:
    """text rate / random rate of the samples counted by ``of`` (non-finite, or ``below_bar``), with a 95% interval
    (Katz's log method).

    When a cell of the 2x2 table is empty (no sample failed, or every sample did), 0.5 is added to every cell
    (Haldane-Anscombe): with every sample failing on both sources the ratio is 1 with a finite interval, which
    straddles 1 (undecided: a ceiling says nothing about which source fails more), instead of the degenerate [1, 1].
    """
    a, n1, b, n2 = getattr(text, of), text.samples, getattr(random, of), random.samples
    if a == 0 and b == 0:
        return RateRatio(math.nan, 0.0, math.inf, "undecided")
    if 0 in (a, b, n1 - a, n2 - b):
        a, b, n1, n2 = a + 0.5, b + 0.5, n1 + 1, n2 + 1
    value = (a / n1) / (b / n2)
    spread = Z95 * math.sqrt(1 / a - 1 / n1 + 1 / b - 1 / n2)
    low, high = value * math.exp(-spread), value * math.exp(spread)
    verdict = "reproduced" if low > 1 else ("refuted" if high < 1 else "undecided")
    return RateRatio(value, low, high, verdict)


def _sample_flags(output: torch.Tensor, batch: TokenBatch, runner=None) -> tuple[list[bool], list[bool] | None]:
    """Per row, at valid positions: any non-finite value in ``output``; with ``runner``, any non-finite block output
    of it on ``batch`` (None without one, or where its backend exposes none)."""
    bad = ~torch.isfinite(output) & valid_positions(output, batch.attention_mask)
    out_flags = [bool(x) for x in bad.flatten(1).any(dim=1).tolist()]
    intermediates = runner.intermediates(batch) if runner is not None else None
    if intermediates is None:
        return out_flags, None
    inner = torch.zeros(len(out_flags), dtype=torch.bool)
    for _, tensor in intermediates:
        if tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(batch.shape):  # per-sample block outputs only
            bad = ~torch.isfinite(tensor) & valid_positions(tensor, batch.attention_mask)
            inner |= bad.flatten(1).any(dim=1).cpu()
    return out_flags, [bool(x) for x in inner.tolist()]


def reference_samples(reference, batches: Sequence[TokenBatch]) -> int:
    """Samples whose FP32 reference output is non-finite: the control, computed once per source."""
    return nonfinite_samples([reference.infer(batch) for batch in batches], batches)


def nonfinite_samples(outputs: Sequence[torch.Tensor], batches: Sequence[TokenBatch]) -> int:
    """The same count from outputs already computed (the reference's, kept for the below-the-bar comparison)."""
    return sum(sum(_sample_flags(output, batch)[0]) for output, batch in zip(outputs, batches))


def _below_bar(engine, output, reference_output, batch: TokenBatch, bar: float) -> int:
    """Samples whose cosine against FP32 (the suite's comparison, fidelity.metrics) is below ``bar`` or not finite."""
    from fidelity.metrics import CompareContext, Tolerance, compare_outputs

    model = engine.model
    context = CompareContext(model.name, engine.backend, engine.policy.name, str(output.device), batch.source,
                             model.tokenizer_source, model.weights_source)
    cosines = compare_outputs(output, reference_output.to(output.device), batch, context,
                              Tolerance(cosine_min=bar)).cosines
    return sum(1 for c in cosines if not c >= bar)


def measure(engine, batches: Sequence[TokenBatch], source: str, *, reference_nonfinite: int,
            references: Sequence[torch.Tensor] | None = None, bar: float | None = None) -> Rate:
    """The rate of one engine on one source's batches, with the reference's count (:func:`reference_samples`).

    With ``references`` (the FP32 outputs of ``batches``) and ``bar``, also the samples below the cosine bar:
    an overflow that zeroes a LayerNorm is wrong without being non-finite.
    """
    outputs, inners, samples, exposed, below = 0, 0, 0, True, 0
    for index, batch in enumerate(batches):
        output = engine.infer(batch)
        out, inner = _sample_flags(output, batch, engine)
        if references is not None and bar is not None:
            below += _below_bar(engine, output, references[index], batch, bar)
        samples += len(out)
        outputs += sum(out)
        if inner is None:
            exposed = False
        else:
            inners += sum(inner)
    return Rate(source, samples, outputs, inners if exposed else None, reference_nonfinite,
                below if references is not None and bar is not None else None)


# --- the inputs ---------------------------------------------------------------------------------------


def random_batches(model, *, samples: int, seq_len: int, seed: int, batch: int = 8) -> list[TokenBatch]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, samples, batch):
        rows = min(batch, samples - start)
        ids = torch.randint(0, model.vocab_size, (rows, seq_len), generator=generator)
        out.append(TokenBatch(ids, torch.ones_like(ids), f"uniform random ids (seed {seed})"))
    return out


def hypothesis_batches(model, *, samples: int, max_seq: int) -> list[TokenBatch]:
    """The suite's strategies, derandomized: the same batches every run."""
    from hypothesis import HealthCheck, given, settings

    from fidelity.strategies import token_batches

    drawn: list[TokenBatch] = []

    @settings(max_examples=max(1, samples // 4), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(token_batches(vocab_size=model.vocab_size, max_batch=8, max_seq=max_seq,
                         special_ids=model.special_token_ids, pad_id=model.pad_token_id))
    def draw(batch):
        if sum(b.shape[0] for b in drawn) < samples:
            drawn.append(batch)

    draw()
    return drawn


def text_batches(model, corpus, *, samples: int, seq_len: int) -> list[TokenBatch]:
    from fidelity.corpus import packed_batch

    return [packed_batch(corpus, model, batch=samples, seq_len=seq_len)]


def stress_batches(model, kind: str, *, samples: int, seq_len: int, seed: int) -> list[TokenBatch]:
    generator = torch.Generator().manual_seed(seed)
    pad = model.pad_token_id
    if kind == "stress-max":
        return random_batches(model, samples=samples, seq_len=model.max_positions, seed=seed, batch=4)
    ids = torch.randint(0, model.vocab_size, (samples, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    if kind == "stress-padding":
        ids[:, 1:] = pad
        mask[:, 1:] = 0
    elif kind == "stress-repeat":
        ids[:] = ids[:, :1]
    else:
        raise ValueError(f"unknown stress input {kind!r}")
    return [TokenBatch(ids, mask, f"{kind} (seed {seed})")]
