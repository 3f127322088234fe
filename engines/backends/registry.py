"""Backends by name: where each runner lives, which devices it runs on, how to install it.

Runner modules are imported only when a backend is used, so a missing optional
runtime (onnxruntime, tensorrt) costs nothing until it is asked for, and then
becomes a skip that carries the install hint.
"""

from __future__ import annotations

import dataclasses
import importlib

from engines.backends.base import BackendUnavailableError, Runner


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:Class"
    devices: tuple[str, ...]  # device types it runs on
    description: str
    # The package whose major version a stored latency baseline must share (perf/baselines.py).
    runtime: str = "torch"
    # Builds (and checks, and caches) its engine on a device it cannot run on; running is then a skip.
    builds_anywhere: bool = False
    # Runs a user's ONNX graph (--onnx NAME=PATH): the backends that start from an ONNX graph.
    runs_onnx_graphs: bool = False
    # Its build exports an ONNX graph or compiles (seconds to a minute an engine, the others' well under one):
    # pytest-xdist workers take these engines first (engines/workers.py: work_order).
    slow_build: bool = False

    def load(self) -> type[Runner]:
        module_name, _, class_name = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional runtime imported at module level
            raise BackendUnavailableError(f"backend {self.name}: {exc}") from exc
        return getattr(module, class_name)


BACKENDS: dict[str, BackendInfo] = {
    b.name: b
    for b in (
        BackendInfo("torch", "engines.backends.torch_eager:TorchRunner", ("cpu", "cuda"), "PyTorch eager"),
        BackendInfo(
            "torch-cudagraph",
            "engines.backends.torch_cudagraph:TorchCudaGraphRunner",
            ("cuda",),
            "PyTorch with one CUDA graph per input shape",
        ),
        BackendInfo(
            "torch-compile",
            "engines.backends.torch_compile:TorchCompileRunner",
            ("cpu", "cuda"),
            "torch.compile (Inductor), static shape buckets, CUDA graph per bucket, fused attention for hybrid",
            slow_build=True,
        ),
        BackendInfo(
            "onnxrt",
            "engines.backends.onnxrt:OnnxRuntimeRunner",
            ("cpu", "cuda"),
            "ONNX Runtime on the precision graph",
            runtime="onnxruntime",
            runs_onnx_graphs=True,
            slow_build=True,
        ),
        BackendInfo(
            "onnx-torch",
            "engines.backends.onnx_torch:OnnxTorchRunner",
            ("cpu", "cuda"),
            "the precision graph interpreted with torch ops (real FP16/BF16 arithmetic on CUDA)",
            runs_onnx_graphs=True,
            slow_build=True,
        ),
        BackendInfo(
            "trt", "engines.backends.trt:TensorRTRunner", ("cuda",), "TensorRT >= 10, strongly typed network", runtime="tensorrt",
            runs_onnx_graphs=True, slow_build=True,
        ),
        BackendInfo(
            "trt-rtx",
            "engines.backends.trt:TensorRTRTXRunner",
            ("cuda",),
            "TensorRT for RTX, strongly typed network built ahead of time for --trt-target (also without a GPU)",
            runtime="tensorrt_rtx",
            builds_anywhere=True,
            runs_onnx_graphs=True,
            slow_build=True,
        ),
    )
}


class UnknownBackendError(ValueError):
    pass


def get_backend(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}. Pass them with --backends NAME[,NAME...]."
        ) from None


# Run by default when no --backends is given: the others are opt-in.
DEFAULT_BACKENDS = ("torch", "torch-cudagraph")


# Run by default for a selection of user ONNX graphs only (--onnx): the PyTorch backends cannot run them.
DEFAULT_ONNX_BACKENDS = ("onnx-torch", "onnxrt")


def default_backends(device: str, *, onnx_graphs_only: bool = False) -> list[str]:
    names = DEFAULT_ONNX_BACKENDS if onnx_graphs_only else DEFAULT_BACKENDS
    return [n for n in names if device.split(":")[0] in BACKENDS[n].devices]
