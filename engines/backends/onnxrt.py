"""ONNX Runtime engine: backend ``onnxrt``.

Runs the policy's ONNX precision graph.  Execution provider by device: the CPU
provider on ``cpu``; on ``cuda`` the TensorRT provider, else the CUDA provider,
when the installed onnxruntime has them (``onnxruntime-gpu``).

Note: the CPU provider has FP16 kernels for few ops; for the rest it inserts
Casts and computes in FP32, so its FP16 results show the storage rounding of the
graph's FP16 tensors, not FP16 arithmetic.  Reports say so.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from engines.backends.base import BackendUnavailableError, Runner

from engines.batch import TokenBatch

INSTALL_HINT = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA/TensorRT providers)"
CPU_NOTE = "CPU provider: FP16/BF16 ops without CPU kernels run in FP32 after inserted Casts"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError("onnxruntime is not installed", INSTALL_HINT) from exc
    return onnxruntime


def providers_for(device: str) -> list[str]:
    ort = _onnxruntime()
    available = ort.get_available_providers()
    if device.startswith("cuda"):
        wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        if not wanted:
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__} here has no GPU execution provider (has {', '.join(available)})",
                "pip install onnxruntime-gpu",
            )
        return wanted[-1:]  # CUDA provider: runs the graph as typed; the TensorRT provider would rebuild it
    return ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    backend: ClassVar[str] = "onnxrt"
    session_options: ClassVar[tuple[str, ...]] = ("cache",)

    def __init__(self, model, policy, device: str, *, cache=None) -> None:
        super().__init__(model, policy, device)
        from engines.cache import EngineCache

        self.cache = cache or EngineCache()
        self.providers = providers_for(device)
        self.graph = None
        self.session = None

    def _build(self) -> None:
        from engines.graphs.precision_graph import precision_graph, verified_audit

        ort = _onnxruntime()
        self.graph = precision_graph(self.model, self.policy, self.cache)
        self.audit = verified_audit(self.graph, self.policy, engine=self.name)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Basic optimizations only: constant folding and dead-code removal, no
        # fusions that would change which ops compute in which dtype.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            self.session = ort.InferenceSession(str(self.graph.path), options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            message = str(exc).splitlines()[0]
            if "NOT_IMPLEMENTED" in str(exc) or "Could not find an implementation" in str(exc):
                raise BackendUnavailableError(
                    f"onnxruntime {ort.__version__} {self.providers[0]} cannot run the {self.policy.name} graph: {message}"
                ) from exc
            raise

    def _infer(self, batch: TokenBatch) -> torch.Tensor:
        feeds = {"input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy()}
        (output,) = self.session.run(["output"], feeds)
        return torch.from_numpy(np.asarray(output, dtype=np.float32)).to(self.device)

    def _close(self) -> None:
        self.session = None

    def describe(self) -> dict[str, Any]:
        ort = _onnxruntime()
        info = {
            "backend": self.backend,
            "runtime": f"onnxruntime {ort.__version__}",
            "provider": self.providers[0],
            "device": str(self.device),
            "graph": str(self.graph.path) if self.graph else None,
            "graph_dtypes": self.graph.dtypes if self.graph else None,
        }
        if self.providers[0] == "CPUExecutionProvider" and self.policy.low_precision_dtypes:
            info["note"] = CPU_NOTE
        return info
