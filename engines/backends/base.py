"""The runner protocol every backend implements.

``build()`` does the expensive one-off work (conversion, export, compilation) and
ends with the engine's precision audit; ``prepare(batch)`` checks a batch once and
stages it for the engine (on its device, in the form its runtime takes);
``run(staged)`` is inference and nothing else (what ``perf/`` times);
``infer(batch)`` is ``run(prepare(batch))``, the FP32 output on the engine's device;
``info()`` and ``memory()`` are the facts reports and benchmarks record; ``close()``
releases everything.  Subclasses implement ``_build``, ``_run`` and, where they
need them, ``_stage``, ``_close``, ``_info`` and ``memory``.  Every runner is
constructed the same way, ``Runner(model, policy, device, options)``, and no
constructor changes process-wide state.  Runners never time themselves: ``perf/`` does.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from engines.batch import TokenBatch, validate_batch
from engines.models import LoadedModel
from engines.precision.audit import PrecisionAudit, raise_on_mismatch
from engines.precision.policy import PrecisionPolicy

if TYPE_CHECKING:
    from engines.cache import EngineCache


class BackendUnavailableError(RuntimeError):
    """The backend's runtime is not installed or cannot run here."""

    def __init__(self, message: str, install_hint: str | None = None) -> None:
        super().__init__(message if install_hint is None else f"{message}; install with: {install_hint}")
        self.install_hint = install_hint


def require_runtime(module: str, *, what: str, install_hint: str, minimum_major: int | None = None):
    """Import a backend's runtime on first use; a missing or too old one is BackendUnavailableError with the hint."""
    import importlib

    try:
        runtime = importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(f"{what} is not installed", install_hint) from exc
    version = getattr(runtime, "__version__", "0")
    if minimum_major is not None and int(version.split(".")[0]) < minimum_major:
        raise BackendUnavailableError(
            f"{what} {version} is too old; this backend needs {module}>={minimum_major}", install_hint
        )
    return runtime


def engine_name(model: str, backend: str, precision: str) -> str:
    """An engine's name everywhere (reports, baselines, test ids): ``model/backend/precision``."""
    return f"{model}/{backend}/{precision}"


def split_engine_name(name: str) -> tuple[str, str, str]:
    """An :func:`engine_name` (as stored with each perf result) split into its parts."""
    model, backend, precision = name.split("/")
    return model, backend, precision


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What every runner is built with besides model, policy and device (from the engine factory)."""

    cache: "EngineCache | None" = None  # where exported graphs and built engines are kept
    compile_mode: str = "default"  # torch-compile's Inductor mode
    trt_target: str = "auto"  # the compute capability TensorRT engines are built for (SM80, ...; auto: engines.backends.trt)


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """The facts reports record about an engine."""

    backend: str
    runtime: str  # "torch 2.11.0", "onnxruntime 1.23.2", "TensorRT 10.13.0"
    device: str
    mode: str  # how it executes, in words
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "runtime": self.runtime, "device": self.device, "mode": self.mode, **self.details}


@dataclasses.dataclass(frozen=True)
class EngineMemory:
    """Device memory an engine holds outside the torch allocator, by its runtime's own report.

    ``perf/`` adds it to the allocator's peak: a TensorRT execution context and
    deserialized plan live in memory the allocator never sees.
    """

    outside_allocator_bytes: int = 0
    details: dict[str, int] = dataclasses.field(default_factory=dict)


class Runner(abc.ABC):
    """One engine: a model at one precision on one backend and device."""

    backend: ClassVar[str]

    def __init__(self, model: LoadedModel, policy: PrecisionPolicy, device: str, options: BuildOptions | None = None) -> None:
        self.model = model
        self.policy = policy
        self.device = torch.device(device)
        self.options = options or BuildOptions()
        self.audit: PrecisionAudit | None = None
        # Device memory the torch allocator held for others when this engine was
        # built: perf/ subtracts it so that an engine's peak is its own, whatever
        # ran before it in the session (engines.memory).
        self.foreign_device_bytes = 0
        self._built = False
        self._closed = False

    # -- public protocol -------------------------------------------------------
    @property
    def name(self) -> str:
        """``model/backend/precision`` (:func:`engine_name`)."""
        return engine_name(self.model.name, self.backend, self.policy.name)

    def build(self) -> "Runner":
        """Build once; every engine ends its build with a precision audit that must pass."""
        if self._closed:
            raise RuntimeError(f"{self.name}: build() after close()")
        if not self._built:
            if self.device.type == "cuda":
                from engines.memory import release_shared_device_memory

                self.foreign_device_bytes = release_shared_device_memory(self.device)
            self._build()
            if not isinstance(self.audit, PrecisionAudit):
                raise RuntimeError(f"{self.name}: the backend built no precision audit; every engine must prove its dtypes")
            raise_on_mismatch(self.audit)
            self._built = True
        return self

    def prepare(self, batch: TokenBatch) -> Any:
        """Check ``batch`` once and stage it for :meth:`run` (on the device, in the runtime's form)."""
        if not self._built:
            self.build()
        validate_batch(
            batch,
            vocab_size=self.model.vocab_size,
            max_positions=self.model.max_positions,
            model_name=self.model.name,
        )
        return self._stage(batch)

    def run(self, staged: Any) -> torch.Tensor:
        """Inference on what :meth:`prepare` staged: no checks, no host copies (what ``perf/`` times).

        Asynchronous on CUDA: the caller synchronizes before reading a clock.
        """
        return self._run(staged)

    def infer(self, batch: TokenBatch) -> torch.Tensor:
        """FP32 output [batch, sequence, features] on this engine's device."""
        output = self.run(self.prepare(batch))
        return output if output.dtype == torch.float32 else output.float()

    def close(self) -> None:
        if not self._closed:
            self._close()
            self._closed = True

    def input_limits(self) -> tuple[int | None, int]:
        """The largest (batch, sequence) this engine takes; None: no batch limit."""
        return (None, self.model.max_positions)

    def info(self) -> EngineInfo:
        return self._info()

    def memory(self) -> EngineMemory:
        """Device memory held outside the torch allocator (none, for engines that allocate through torch)."""
        return EngineMemory()

    def intermediates(self, batch: TokenBatch) -> list[tuple[str, torch.Tensor]] | None:
        """Every block's output for ``batch``, in execution order (``[(module path, tensor)]``), where the backend
        exposes them; None where it does not (compiled graphs, ONNX Runtime, TensorRT).  For fidelity.divergence."""
        return None

    def release_shapes(self) -> None:
        """Drop what the engine keeps per input shape (captured CUDA graphs), so that the next shape's memory is its own.

        Engines that keep nothing per shape do nothing; the next call at a dropped shape captures it again.
        """

    def __enter__(self) -> "Runner":
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- backend hooks -----------------------------------------------------------
    @abc.abstractmethod
    def _build(self) -> None:
        """Build the engine and set ``self.audit``."""

    def _stage(self, batch: TokenBatch) -> Any:
        """Default staging: the batch's tensors on the engine's device."""
        return TokenBatch(
            batch.input_ids.to(self.device, non_blocking=True),
            batch.attention_mask.to(self.device, non_blocking=True),
            batch.source,
        )

    @abc.abstractmethod
    def _run(self, staged: Any) -> torch.Tensor: ...

    @abc.abstractmethod
    def _info(self) -> EngineInfo: ...

    def _close(self) -> None:
        pass
