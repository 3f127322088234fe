"""The runner protocol every backend implements.

``build()`` does the expensive one-off work (conversion, export, compilation),
``infer(batch)`` returns the model output as an FP32 tensor on the engine's device,
``close()`` releases everything.  Input checks live here, once, so that every
backend refuses bad input with the same message; subclasses implement only the
``_build``/``_infer``/``_close`` steps.  Runners never time themselves: ``perf/``
does.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import torch

from engines.batch import TokenBatch, validate_batch
from engines.precision.audit import PrecisionAudit
from engines.models import LoadedModel
from engines.precision.policy import PrecisionPolicy


class BackendUnavailableError(RuntimeError):
    """The backend's runtime is not installed or cannot run here."""

    def __init__(self, message: str, install_hint: str | None = None) -> None:
        super().__init__(message if install_hint is None else f"{message}; install with: {install_hint}")
        self.install_hint = install_hint


def split_engine_name(name: str) -> tuple[str, str, str]:
    """``model/backend/precision`` (a :attr:`Runner.name`, as stored with each perf result) split into its parts."""
    model, backend, precision = name.split("/")
    return model, backend, precision


class Runner(abc.ABC):
    """One engine: a model at one precision on one backend and device."""

    backend: ClassVar[str]
    # Keyword arguments the runner takes from the session: "cache" (an EngineCache,
    # for backends that build artifacts), "compile_mode" (torch.compile's mode).
    session_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: LoadedModel, policy: PrecisionPolicy, device: str) -> None:
        self.model = model
        self.policy = policy
        self.device = torch.device(device)
        self.audit: PrecisionAudit | None = None
        # Device memory the torch allocator held for others when this engine was
        # built: perf/ subtracts it so that an engine's peak is its own, whatever
        # ran before it in the session.
        self.foreign_device_bytes = 0
        self._built = False
        self._closed = False

    # -- public protocol -------------------------------------------------------
    @property
    def name(self) -> str:
        """``model/backend/precision``; :func:`split_engine_name` takes it apart."""
        return f"{self.model.name}/{self.backend}/{self.policy.name}"

    def build(self) -> "Runner":
        if self._closed:
            raise RuntimeError(f"{self.name}: build() after close()")
        if not self._built:
            if self.device.type == "cuda":
                self.foreign_device_bytes = int(torch.cuda.memory_allocated(self.device))
            self._build()
            self._built = True
        return self

    def _check(self, batch: TokenBatch) -> None:
        """Build on first use, then refuse input this model cannot take."""
        if not self._built:
            self.build()
        validate_batch(
            batch,
            vocab_size=self.model.vocab_size,
            max_positions=self.model.max_positions,
            model_name=self.model.name,
        )

    def infer(self, batch: TokenBatch) -> torch.Tensor:
        """FP32 output [batch, sequence, features] on this engine's device."""
        self._check(batch)
        output = self._infer(batch)
        if output.dtype != torch.float32:
            output = output.float()
        return output

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        """Validate ``batch`` once and stage it on the engine's device, for :meth:`run`."""
        self._check(batch)
        return TokenBatch(batch.input_ids.to(self.device), batch.attention_mask.to(self.device), batch.source)

    def run(self, prepared: TokenBatch) -> torch.Tensor:
        """Inference on a batch from :meth:`prepare`: no checks, no host copies (what ``perf/`` times).

        Asynchronous on CUDA: the caller synchronizes before reading a clock.
        """
        return self._infer(prepared)

    def close(self) -> None:
        if not self._closed:
            self._close()
            self._closed = True

    def input_limits(self) -> tuple[int | None, int]:
        """The largest (batch, sequence) this engine takes; None: no batch limit."""
        return (None, self.model.max_positions)

    def describe(self) -> dict[str, Any]:
        """Backend facts for reports: name, runtime version, device, mode."""
        return {"backend": self.backend, "device": str(self.device)}

    def __enter__(self) -> "Runner":
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- backend hooks -----------------------------------------------------------
    @abc.abstractmethod
    def _build(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, batch: TokenBatch) -> torch.Tensor: ...

    def _close(self) -> None:
        pass
