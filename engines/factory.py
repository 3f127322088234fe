"""The engine factory: the one place that turns an engine name into a built engine, for fidelity/ and perf/ alike.

A :class:`EngineFactory` holds one session's models, engine cache, numerics and
FP32 references.  ``build(spec)`` constructs a runner the same way for every
backend (``Runner(model, policy, device, BuildOptions)``), builds it (which ends in
its precision audit) and records what was built; a backend that cannot run here
raises :class:`~engines.backends.base.BackendUnavailableError`, recorded as a skip.
Nothing here times or judges anything.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from engines.backends.base import BackendUnavailableError, BuildOptions, Runner, engine_name
from engines.backends.registry import BACKENDS, get_backend
from engines.backends.torch_eager import TorchReferenceRunner
from engines.cache import EngineCache
from engines.env import environment_info
from engines.models import LoadedModel, ModelLoader
from engines.numerics import configure_process, record
from engines.options import EngineSelection
from engines.perturb import PerturbationError, check_parameter, perturbed
from engines.precision.policy import REFERENCE_POLICY, PrecisionPolicy, get_policy


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """One engine to build: model x backend x precision (a precision name of the selection)."""

    model: str
    backend: str
    precision: str

    @property
    def id(self) -> str:
        """``model/backend/precision`` (:func:`~engines.backends.base.engine_name`)."""
        return engine_name(self.model, self.backend, self.precision)


class EngineFactory:
    def __init__(self, selection: EngineSelection, *, session_start: float | None = None) -> None:
        self.selection = selection
        self.device = selection.device
        self.loader = ModelLoader(
            model_paths=selection.model_paths, weights_mode=selection.weights_mode, onnx_graphs=selection.onnx_graphs
        )
        self.cache = EngineCache(selection.engine_cache, rebuild=selection.rebuild_engines, session_start=session_start)
        self.options = BuildOptions(cache=self.cache, compile_mode=selection.compile_mode, trt_target=selection.trt_target)
        self.built: dict[str, dict[str, Any]] = {}  # engine id -> info, audit, build seconds
        self.skipped: dict[str, str] = {}  # engine id -> reason
        self._references: dict[str, TorchReferenceRunner] = {}
        self._environment: dict[str, Any] | None = None

    def cpu_baseline_spec(self, model_name: str) -> EngineSpec:
        """The CPU FP32 engine a model's speedups are measured against: eager PyTorch, or ONNX Runtime for a graph."""
        backend = "onnxrt" if self.model(model_name).spec.is_onnx_graph else "torch"
        return EngineSpec(model_name, backend, "fp32")

    def apply_numerics(self) -> None:
        """Set the session's numerics; torch's settings are process-wide, so once, before any engine exists."""
        configure_process(self.selection.numerics)

    # -- what to build -----------------------------------------------------------------
    def specs(self) -> list[EngineSpec]:
        s = self.selection
        return [EngineSpec(m, b, p) for m in s.models for b in s.backends for p in s.precisions]

    def check_perturbations(self) -> None:
        """Every ``--perturb-weight`` matches a selected engine and names a parameter of its model (the models
        it applies to are loaded now): a typo is a usage error at start-up, not a failed build later."""
        for perturbation in self.selection.perturbations:
            specs = [spec for spec in self.specs() if perturbation.matches(spec.id)]
            if not specs:
                raise PerturbationError(
                    f"--perturb-weight {perturbation.record()}: the pattern matches none of the selected engines "
                    f"({', '.join(spec.id for spec in self.specs())})"
                )
            for model_name in dict.fromkeys(spec.model for spec in specs):
                check_parameter(self.model(model_name), perturbation)

    def policy(self, precision: str) -> PrecisionPolicy:
        """A selected precision's policy; a built-in one (the CPU baseline's fp32) even when not selected."""
        return self.selection.policies.get(precision) or get_policy(precision)

    def runs_here(self, backend: str, device: str | None = None) -> bool:
        return (device or self.device).split(":")[0] in get_backend(backend).devices

    # -- building ----------------------------------------------------------------------
    def model(self, name: str) -> LoadedModel:
        return self.loader.load(name)

    @property
    def notes(self) -> list[str]:
        """Why a fallback was taken (random-init weights, ...), for reports."""
        return list(self.loader.notes)

    def build(self, spec: EngineSpec, *, device: str | None = None) -> Runner:
        """The built engine for ``spec`` (on ``device``, default the session's); BackendUnavailableError where it cannot run."""
        backend = get_backend(spec.backend)
        device = device or self.device
        key = spec.id if device == self.device else f"{spec.id} on {device}"
        started = time.perf_counter()
        try:
            if not self.runs_here(spec.backend, device) and not backend.builds_anywhere:
                raise BackendUnavailableError(
                    f"backend {spec.backend} runs on {', '.join(backend.devices)}, not {device}; "
                    "run on a GPU machine with --device cuda"
                )
            model = self.model(spec.model)
            for perturbation in self.selection.perturbations:  # an injected fault: this engine's weights only
                if perturbation.matches(spec.id):
                    model = perturbed(model, perturbation)
            if model.spec.is_onnx_graph and not backend.runs_onnx_graphs:
                raise BackendUnavailableError(
                    f"{spec.model} is an ONNX graph (--onnx): {spec.backend} cannot run it; the ONNX backends can: "
                    + ", ".join(name for name, info in BACKENDS.items() if info.runs_onnx_graphs)
                )
            runner_cls = backend.load()
            runner = runner_cls(model, self.policy(spec.precision), device, self.options)
            runner.build()
        except BackendUnavailableError as exc:
            self.skipped[key] = str(exc)
            built_only = getattr(exc, "info", None)  # built, checked and cached, but not runnable here
            if built_only is not None:
                self.built[key] = self._build_record(built_only, spec, exc.audit, started)
                self.built[key].update(runnable=False, not_runnable_because=str(exc))
            raise
        self.built[key] = self._build_record(runner.info(), spec, runner.audit, started)
        return runner

    def _build_record(self, info, spec: EngineSpec, audit, started: float) -> dict[str, Any]:
        """What reports keep of a built engine: its facts, policy, build time and precision audit."""
        return {
            **info.as_dict(),
            "policy": self.policy(spec.precision).describe(),
            "build_seconds": round(time.perf_counter() - started, 3),
            "audit": audit.as_dict(),
        }

    def skip(self, spec: EngineSpec, reason: str) -> None:
        self.skipped[spec.id] = reason

    def reference(self, model_name: str) -> TorchReferenceRunner:
        """The FP32 reference of ``model_name`` on this device, built once (deterministic kernels, TF32 off)."""
        if model_name not in self._references:
            model = self.model(model_name)
            if model.spec.is_onnx_graph:  # a user's graph: its own FP32 graph, interpreted, is the reference
                from engines.backends.onnx_torch import OnnxReferenceRunner

                runner = OnnxReferenceRunner(model, REFERENCE_POLICY, self.device, self.options).build()
            else:
                runner = TorchReferenceRunner(model, REFERENCE_POLICY, self.device).build()
            self.built[runner.name] = {**runner.info().as_dict(), "audit": runner.audit.as_dict()}
            self._references[model_name] = runner
        return self._references[model_name]

    # -- facts ---------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        if self._environment is None:
            self._environment = environment_info(self.device)
        return self._environment

    def numerics_record(self) -> dict[str, Any]:
        return record(self.selection.numerics)

    def close(self) -> None:
        for runner in self._references.values():
            runner.close()
        self._references.clear()
