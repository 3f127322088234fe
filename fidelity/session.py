"""State of one fidelity run: options, models, references, engines and results.

The pytest plugin (``fidelity/plugin.py``) stays thin and delegates here, so the
same session can drive a run outside pytest too.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import time
from pathlib import Path

import torch

from engines.backends.base import BackendUnavailableError, Runner

from engines.batch import TokenBatch
from engines.cache import EngineCache
from engines.env import configure_fp32_reference_math, environment_info, resolve_device
from engines.models import LoadedModel, ModelLoader, get_spec
from engines.precision.policy import POLICIES, PrecisionPolicy, get_policy
from engines.backends.registry import default_backends, get_backend
from engines.backends.torch_eager import TorchReferenceRunner
from fidelity.corpus import TextCorpus, load_corpus, packed_batch, padded_batch
from fidelity.metrics import CompareContext, FidelityResult, compare_outputs, tolerance_for
from fidelity.report import FidelityReport
from fidelity.strategies import INPUT_PROFILES, InputProfile


DEFAULT_MODELS = ("tiny-bert", "tiny-gpt2", "minilm")
DEFAULT_PRECISIONS = tuple(POLICIES)
REFERENCE_CACHE_BYTES = {"cpu": 1 << 30, "cuda": 8 << 30}


class OptionError(ValueError):
    """A bad command-line option; pytest turns it into a usage error."""


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@dataclasses.dataclass(frozen=True)
class EngineCase:
    model: str
    backend: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.model}/{self.backend}/{self.precision}"


@dataclasses.dataclass
class FidelityOptions:
    models: list[str]
    precisions: list[str]
    backends: list[str]
    device: str
    cosine_min: float | None
    gate_precisions: list[str]
    report_path: Path | None
    profile: InputProfile
    model_paths: dict[str, Path]
    weights_mode: str
    wikitext_path: Path | None
    engine_cache: Path | None = None
    rebuild_engines: bool = False
    compile_mode: str = "default"

    @classmethod
    def parse(
        cls,
        *,
        models: str | None,
        precisions: str | None,
        backends: str | None,
        device: str,
        cosine_min: float | None,
        gate_precisions: str | None,
        report_path: str | None,
        profile: str | None,
        model_paths: dict[str, Path],
        weights_mode: str,
        wikitext_path: str | None,
        engine_cache: str | None = None,
        rebuild_engines: bool = False,
        compile_mode: str = "default",
    ) -> "FidelityOptions":
        """Validate every name up front: a typo is a usage error, not a failing test."""
        model_names = _split(models) or list(DEFAULT_MODELS)
        for name in model_names:
            get_spec(name)
        precision_names = _split(precisions) or list(DEFAULT_PRECISIONS)
        for name in precision_names:
            get_policy(name)
        resolved_device = resolve_device(device)
        backend_names = _split(backends) or default_backends(resolved_device)
        for name in backend_names:
            get_backend(name)
        gate = _split(gate_precisions)
        for name in gate:
            get_policy(name)
        if not gate:
            gate = [p for p in precision_names if POLICIES[p].gated_by_default]
        if cosine_min is not None and not 0.0 < cosine_min <= 1.0:
            raise OptionError(f"--cosine-min must be in (0, 1], got {cosine_min}")
        profile_name = profile or os.environ.get("FIDELITY_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
        if profile_name not in INPUT_PROFILES:
            raise OptionError(f"unknown input profile {profile_name!r}; known: {', '.join(INPUT_PROFILES)}")
        return cls(
            models=model_names,
            precisions=precision_names,
            backends=backend_names,
            device=resolved_device,
            cosine_min=cosine_min,
            gate_precisions=gate,
            report_path=Path(report_path) if report_path else None,
            profile=INPUT_PROFILES[profile_name],
            model_paths=model_paths,
            weights_mode=weights_mode,
            wikitext_path=Path(wikitext_path) if wikitext_path else None,
            engine_cache=Path(engine_cache).expanduser() if engine_cache else None,
            rebuild_engines=rebuild_engines,
            compile_mode=compile_mode,
        )

    def cases(self) -> list[EngineCase]:
        return [EngineCase(m, b, p) for m in self.models for b in self.backends for p in self.precisions]


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


class FidelitySession:
    def __init__(self, options: FidelityOptions, *, command: str = "") -> None:
        self.options = options
        self.device = options.device
        configure_fp32_reference_math()
        self.loader = ModelLoader(model_paths=options.model_paths, weights_mode=options.weights_mode)
        self.cache = EngineCache(options.engine_cache, rebuild=options.rebuild_engines)
        self._references: dict[str, TorchReferenceRunner] = {}
        self._reference_outputs = ReferenceCache(REFERENCE_CACHE_BYTES[self.device.split(":")[0]])
        self._corpus: tuple[TextCorpus, list[str]] | None = None
        self.environment = environment_info(self.device)
        self.report = FidelityReport(
            command=command,
            environment=self.environment,
            options={
                "models": options.models,
                "precisions": options.precisions,
                "backends": options.backends,
                "device": options.device,
                "cosine_min": options.cosine_min,
                "gate_precisions": options.gate_precisions,
                "profile": options.profile.name,
                "weights": options.weights_mode,
            },
            path=options.report_path,
        )

    # -- models, references, engines ------------------------------------------------
    def model(self, name: str) -> LoadedModel:
        model = self.loader.load(name)
        for note in self.loader.notes:
            self.report.add_note(note)
        return model

    def reference(self, model_name: str) -> TorchReferenceRunner:
        if model_name not in self._references:
            runner = TorchReferenceRunner(self.model(model_name), self.device)
            runner.build()
            self.report.add_audit(runner.name, runner.audit.as_dict())
            self._references[model_name] = runner
        return self._references[model_name]

    def reference_output(self, model_name: str, batch: TokenBatch) -> torch.Tensor:
        key = ReferenceCache.key(model_name, batch)
        cached = self._reference_outputs.get(key)
        if cached is None:
            cached = self.reference(model_name).infer(batch)
            self._reference_outputs.put(key, cached)
        return cached

    def build_engine(self, case: EngineCase) -> Runner:
        """Build the engine for ``case``; raises BackendUnavailableError to skip."""
        backend = get_backend(case.backend)
        if self.device.split(":")[0] not in backend.devices:
            raise BackendUnavailableError(
                f"backend {case.backend} runs on {', '.join(backend.devices)}, not {self.device}; "
                f"run on a GPU machine with --device cuda"
            )
        runner_cls = backend.load()
        model = self.model(case.model)
        policy: PrecisionPolicy = get_policy(case.precision)
        started = time.perf_counter()
        available = {"cache": self.cache, "compile_mode": self.options.compile_mode}
        options = {name: available[name] for name in runner_cls.session_options}
        runner = runner_cls(model, policy, self.device, **options)
        runner.build()
        description = dict(runner.describe(), build_seconds=round(time.perf_counter() - started, 3))
        self.report.add_engine(case.id, description)
        self.report.add_audit(runner.name, runner.audit.as_dict() if runner.audit else None)
        return runner

    # -- inputs ---------------------------------------------------------------------
    def corpus(self) -> TextCorpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.options.wikitext_path)
            for note in self._corpus[1]:
                self.report.add_note(note)
        return self._corpus[0]

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
        reference = self.reference_output(model.name, batch)
        output = engine.infer(batch)
        context = CompareContext(
            model=model.name,
            backend=engine.backend,
            precision=engine.policy.name,
            device=self.device,
            input_source=batch.source,
            tokenizer=model.tokenizer_source,
            weights=model.weights_source,
            runtime=self.report.engines.get(engine.name, {}).get("runtime", ""),
        )
        result = compare_outputs(output, reference, batch, context, tolerance_for(engine.policy.name, self.options.cosine_min))
        self.report.record(result, input_kind=input_kind, gated=self.is_gated(engine.policy.name))
        return result

    def finish(self) -> None:
        for runner in self._references.values():
            runner.close()
        self._references.clear()
        self.report.set_cache_events(self.cache)
        self.report.write()
