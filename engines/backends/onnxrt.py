"""ONNX Runtime engine: backend ``onnxrt``.

Runs the policy's ONNX precision graph.  Execution provider by device: the CPU
provider on ``cpu``; on ``cuda`` the TensorRT provider, else the CUDA provider,
when the installed onnxruntime has them (``onnxruntime-gpu``).

Note: the CPU provider has FP16 kernels for few ops; for the rest it inserts
Casts and computes in FP32, so its FP16 results show the storage rounding of the
graph's FP16 tensors, not FP16 arithmetic.  Reports say so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch

from engines.backends.base import BackendUnavailableError, EngineInfo, Runner, require_runtime
from engines.batch import TokenBatch
from engines.workers import onnxruntime_session_options

INSTALL_HINT = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA/TensorRT providers)"
CPU_NOTE = "CPU provider: FP16/BF16 ops without CPU kernels run in FP32 after inserted Casts"


def _onnxruntime():
    return require_runtime("onnxruntime", what="onnxruntime", install_hint=INSTALL_HINT)


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


@dataclasses.dataclass
class BoundBatch:
    """A batch bound to a session: its input tensors and the output tensor ORT writes into (kept alive here)."""

    binding: Any
    inputs: tuple[torch.Tensor, torch.Tensor]
    output: torch.Tensor


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime on the precision graph, inputs and output bound in place (IOBinding) on every device.

    The same binding code serves the CPU and the CUDA provider (only the device
    named in it differs), so the path the CPU tests run is the one a GPU runs.
    ``memory()`` reports nothing outside the torch allocator: ONNX Runtime's CUDA
    arena is invisible to it, so its peak-memory figures cover only the bound
    inputs and output (never run here: no onnxruntime-gpu on any machine of this project).
    """

    backend: ClassVar[str] = "onnxrt"

    def __init__(self, model, policy, device: str, options=None) -> None:
        super().__init__(model, policy, device, options)
        self.providers = providers_for(device)
        self.graph = None
        self.session = None

    def _build(self) -> None:
        from engines.cache import EngineCache
        from engines.graphs.precision_graph import precision_graph, verified_audit

        ort = _onnxruntime()
        self.graph = precision_graph(self.model, self.policy, self.options.cache or EngineCache())
        self.audit = verified_audit(self.graph, self.policy, engine=self.name)
        options = onnxruntime_session_options(ort, cpu_engine=self.device.type == "cpu")
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

    def _stage(self, batch: TokenBatch) -> BoundBatch:
        staged = super()._stage(batch)
        ids, mask = staged.input_ids.contiguous(), staged.attention_mask.contiguous()
        output = torch.empty((*ids.shape, self.model.output_width), dtype=torch.float32, device=self.device)
        device_type, device_id = self.device.type, self.device.index or 0
        binding = self.session.io_binding()
        for name, tensor in (("input_ids", ids), ("attention_mask", mask)):
            binding.bind_input(name, device_type, device_id, np.int64, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("output", device_type, device_id, np.float32, tuple(output.shape), output.data_ptr())
        return BoundBatch(binding, (ids, mask), output)

    def _run(self, staged: BoundBatch) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT reads the inputs on its own stream
        self.session.run_with_iobinding(staged.binding)
        return staged.output

    def _close(self) -> None:
        self.session = None

    def _info(self) -> EngineInfo:
        ort = _onnxruntime()
        details = {
            "provider": self.providers[0],
            "graph": str(self.graph.path) if self.graph else None,
            "graph_dtypes": self.graph.dtypes if self.graph else None,
        }
        if self.providers[0] == "CPUExecutionProvider" and self.policy.low_precision_dtypes:
            details["note"] = CPU_NOTE
        mode = f"{self.providers[0]}, basic graph optimizations, IOBinding"
        return EngineInfo(self.backend, f"onnxruntime {ort.__version__}", str(self.device), mode, details)
