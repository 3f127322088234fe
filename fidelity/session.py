"""State of one fidelity run: options, the engine factory's references, inputs and results.

The pytest plugin (``fidelity/plugin.py``) stays thin and delegates here, so the
same session can drive a run outside pytest too.  Engines come from the shared
:class:`engines.factory.EngineFactory`; this module only feeds them inputs,
compares their outputs with the FP32 reference and records the results.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import torch

from engines.backends.base import Runner
from engines.batch import TokenBatch
from engines.factory import EngineFactory
from engines.models import LoadedModel
from fidelity.corpus import TextCorpus, load_corpus, packed_batch, padded_batch
from fidelity.divergence import trace
from fidelity.metrics import CompareContext, FidelityResult, compare_outputs, tolerance_for
from fidelity.options import FidelityOptions
from fidelity.report import FidelityReport

REFERENCE_CACHE_BYTES = {"cpu": 1 << 30, "cuda": 8 << 30}


class ReferenceCache:
    """FP32 reference outputs keyed by model and input bytes, bounded in memory."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple[str, str], torch.Tensor] = collections.OrderedDict()
        self._bytes = 0

    @staticmethod
    def key(model: str, batch: TokenBatch) -> tuple[str, str]:
        digest = hashlib.sha1(batch.input_ids.numpy().tobytes())
        digest.update(batch.attention_mask.numpy().tobytes())
        digest.update(str(tuple(batch.input_ids.shape)).encode())
        return model, digest.hexdigest()

    def get(self, key) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()


# A failing check traces where the engine diverged (fidelity.divergence); at most this many times per engine.
MAX_TRACES_PER_ENGINE = 25


class FidelitySession:
    def __init__(self, options: FidelityOptions, factory: EngineFactory, *, command: str = "") -> None:
        self.options = options
        self.factory = factory
        self.device = factory.device
        self._reference_outputs = ReferenceCache(REFERENCE_CACHE_BYTES[self.device.split(":")[0]])
        self._corpus: TextCorpus | None = None
        self._corpus_notes: list[str] = []
        self._finished = False
        self._traces: collections.Counter[str] = collections.Counter()  # divergence traces made per engine
        if options.wikitext_path is not None:
            # Read now: a missing, empty or unreadable file is a usage error before any engine is built.
            self._corpus, self._corpus_notes = load_corpus(options.wikitext_path)
        self.report = FidelityReport(
            command=command,
            environment=dict(factory.environment(), numerics=factory.numerics_record()),
            options={**factory.selection.record(), **options.record()},
            path=options.report_path,
            engines=factory.built,
            skipped=factory.skipped,
        )

    # -- references -----------------------------------------------------------------
    def reference_output(self, model: LoadedModel, batch: TokenBatch) -> torch.Tensor:
        key = ReferenceCache.key(model.name, batch)
        cached = self._reference_outputs.get(key)
        if cached is None:
            cached = self.factory.reference(model.name).infer(batch)
            self._reference_outputs.put(key, cached)
        return cached

    def _notes(self) -> None:
        for note in self.factory.notes + self._corpus_notes:
            self.report.add_note(note)

    # -- inputs ---------------------------------------------------------------------
    def corpus(self) -> TextCorpus:
        if self._corpus is None:
            self._corpus, self._corpus_notes = load_corpus(None)
        self._notes()
        return self._corpus

    def text_batches(self, model: LoadedModel, limits: tuple[int | None, int] | None = None) -> list[TokenBatch]:
        """The profile's natural-text batches for ``model``, packed and padded, within an engine's limits."""
        corpus = self.corpus()
        max_batch, max_seq = limits or (None, model.max_positions)
        batches = []
        for batch, seq_len in self.options.profile.text_shapes:
            seq_len = min(seq_len, model.max_positions, max_seq)
            batch = min(batch, max_batch or batch)
            batches.append(packed_batch(corpus, model, batch=batch, seq_len=seq_len))
            batches.append(padded_batch(corpus, model, batch=batch, seq_len=seq_len))
        return batches

    def max_seq(self, model: LoadedModel) -> int:
        cap = self.options.profile.max_seq
        return model.max_positions if cap is None else min(cap, model.max_positions)

    # -- checking -------------------------------------------------------------------
    def is_gated(self, precision: str) -> bool:
        return precision in self.options.gate_precisions

    def check(self, engine: Runner, batch: TokenBatch, *, input_kind: str) -> FidelityResult:
        """Run ``batch`` through ``engine`` and the reference, compare, record."""
        model = engine.model
        reference = self.reference_output(model, batch)
        output = engine.infer(batch)
        self._notes()
        context = CompareContext(
            model=model.name,
            backend=engine.backend,
            precision=engine.policy.name,
            device=self.device,
            input_source=batch.source,
            tokenizer=model.tokenizer_source,
            weights=model.weights_source,
            runtime=self.factory.built.get(engine.name, {}).get("runtime", ""),
        )
        tolerance = tolerance_for(engine.policy, self.options.cosine_min)
        result = compare_outputs(output, reference, batch, context, tolerance)
        if not result.passed and not result.reference_failed and self._traces[engine.name] < MAX_TRACES_PER_ENGINE:
            # Two more forward passes per failure: bounded, since Hypothesis shrinking fails many times.
            self._traces[engine.name] += 1
            found = trace(engine, self.factory.reference(model.name), batch, bar=tolerance.cosine_min)
            if found is not None:
                result = dataclasses.replace(result, divergence=found.compact(output_failed=True))
        self.report.record(result, input_kind=input_kind, gated=self.is_gated(engine.policy.name))
        return result

    def finish(self) -> None:
        """The report's last notes and the cache's events, written (once: the summary and unconfigure both call it)."""
        if self._finished:
            return
        self._finished = True
        self._notes()
        self.report.set_cache_events(self.factory.cache)
        self.report.write()
