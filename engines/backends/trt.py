"""TensorRT engine: backend ``trt`` (TensorRT >= 10, strongly typed networks).

Written against the TensorRT 10/11 Python API (read with the docs of 10.16 and
11.x; see docs/backends.md).  Not executed in this project's CI or on its lent
GPU: neither has TensorRT.  Its tests run where ``import tensorrt`` works.

Build: the policy's ONNX precision graph (explicit Casts: TensorRT 11 removed
``BuilderFlag.FP16``, ``OBEY_PRECISION_CONSTRAINTS`` and layer precisions) is
parsed with ``OnnxParser`` into a strongly typed network; one optimization
profile covers batch x sequence (default 1-32 x 1-512, opt 8 x 128); TF32 is
cleared so that FP32 means IEEE FP32; the timing cache persists next to the
engine cache.  Before the build, the network's matrix-multiply, softmax and
normalization layers are checked against the policy; after it, the engine
inspector (detailed verbosity) must show the policy's low-precision formats, so
an "FP16" engine that silently built in FP32 fails.

Run: inputs and outputs are torch CUDA tensors bound with
``set_tensor_address``; ``execute_async_v3`` runs on the current torch stream.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, ClassVar

import torch

from engines.precision.audit import PrecisionMismatchError
from engines.precision.policy import DTYPES, OP_CLASSES
from engines.backends.base import BackendUnavailableError, EngineInfo, EngineMemory, Runner, require_runtime
from engines.batch import InvalidInputError, TokenBatch

INSTALL_HINT = (
    "pip install --extra-index-url https://pypi.nvidia.com tensorrt (TensorRT 10 or 11 for your CUDA), "
    "or run inside an NGC TensorRT container (nvcr.io/nvidia/tensorrt)"
)
ENGINE_FILE = "engine.plan"
BUILD_LOG_FILE = "build.log"


def import_tensorrt():
    """``tensorrt`` >= 10, or BackendUnavailableError carrying the install hint."""
    return require_runtime("tensorrt", what="TensorRT", install_hint=INSTALL_HINT, minimum_major=10)


@dataclasses.dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile for (batch, sequence); the same for both inputs."""

    min: tuple[int, int] = (1, 1)
    opt: tuple[int, int] = (8, 128)
    max: tuple[int, int] = (32, 512)

    def clipped(self, max_positions: int) -> "ShapeProfile":
        def clip(shape):
            return (shape[0], min(shape[1], max_positions))

        return ShapeProfile(clip(self.min), clip(self.opt), clip(self.max))

    def check(self, shape: tuple[int, int], engine: str) -> None:
        if not all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max)):
            raise InvalidInputError(
                f"{engine}: input shape {shape} is outside the engine's optimization profile "
                f"{self.min}..{self.max}; rebuild with a wider profile"
            )


@dataclasses.dataclass(frozen=True)
class BuilderOptions:
    profile: ShapeProfile = ShapeProfile()
    workspace_bytes: int = 8 << 30
    builder_optimization_level: int = 3

    def as_key(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gpu_identity(device: torch.device) -> dict[str, str]:
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


class _FileLogger:
    """A TensorRT logger that keeps every message, for the builder log file."""

    def __init__(self, trt) -> None:
        outer = self

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity, msg) -> None:
                outer.lines.append(f"[{severity.name if hasattr(severity, 'name') else severity}] {msg}")

        self.lines: list[str] = []
        self.logger = Logger()

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")


def check_network_types(network, policy, trt) -> list[str]:
    """Problems with the parsed network's compute layers against the policy (before the build).

    Layer types per op class come from the op-class table; TensorRT dtypes from the dtype table.
    """
    wanted = {
        getattr(trt.LayerType, layer_type): op_class.name
        for op_class in OP_CLASSES.values()
        for layer_type in op_class.trt_layers
    }
    names = {name: getattr(trt.DataType, dtype.trt) for name, dtype in DTYPES.items()}
    problems = []
    seen = set()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type not in wanted:
            continue
        op_class = wanted[layer.type]
        dtype = policy.dtype_of(op_class, node=layer.name)
        seen.add(op_class)
        got = layer.get_input(0).dtype
        if got != names[dtype]:
            problems.append(f"{layer.name} ({op_class}) takes {got}, policy says {dtype}")
    if "matmul" not in seen:
        problems.append("the network has no matrix-multiply layer")
    return problems


def inspector_datatypes(info: dict) -> set[str]:
    """The tensor formats the built engine's layers use, as words like FP16/FP32."""
    words = set()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        for tensor in layer.get("Inputs", []) + layer.get("Outputs", []):
            text = str(tensor.get("Format/Datatype", ""))
            words.update(re.findall(r"FP32|FP16|BF16|Float|Half|Int64|Int32|Bool", text))
    return words


def check_engine_types(info: dict, policy) -> list[str]:
    words = inspector_datatypes(info)
    problems = []
    for dtype in policy.low_precision_dtypes:
        if not words & set(DTYPES[dtype].inspector_words):
            problems.append(
                f"the built engine shows no {dtype} tensor formats (found {sorted(words) or 'none'}): "
                "it did not build in the precision its graph asks for"
            )
    if policy.is_reference and words & {"FP16", "Half", "BF16"}:
        problems.append(f"the FP32 engine uses reduced-precision formats {sorted(words)}")
    return problems


class TensorRTRunner(Runner):
    backend: ClassVar[str] = "trt"

    def __init__(self, model, policy, device: str, options=None, *, builder: BuilderOptions | None = None) -> None:
        super().__init__(model, policy, device, options)
        self.trt = import_tensorrt()
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"TensorRT needs a CUDA device, got {self.device}")
        from engines.cache import EngineCache

        self.cache = self.options.cache or EngineCache()
        self.builder = builder or BuilderOptions()
        self.profile = self.builder.profile.clipped(model.max_positions)
        self.engine = None
        self.context = None
        self._memory = EngineMemory()

    def input_limits(self) -> tuple[int, int]:
        return self.profile.max

    # -- build -------------------------------------------------------------------
    def _engine_fields(self, graph) -> dict[str, Any]:
        return {
            "artifact": "trt-engine",
            "model": self.model.name,
            "policy": self.policy.name,
            "graph": graph.digest,
            "tensorrt": self.trt.__version__,
            **gpu_identity(self.device),
            "builder": dataclasses.replace(self.builder, profile=self.profile).as_key(),
        }

    def _timing_cache_path(self) -> Path:
        ident = gpu_identity(self.device)
        name = re.sub(r"[^A-Za-z0-9]+", "_", f"{ident['gpu']}-sm{ident['compute_capability']}-trt{self.trt.__version__}")
        return self.cache.root / "timing" / f"{name}.cache"

    def _build_plan(self, graph_path: Path, folder: Path) -> None:
        trt = self.trt
        log = _FileLogger(trt)
        builder = trt.Builder(log.logger)
        major = int(trt.__version__.split(".")[0])
        # TensorRT 11 is always strongly typed (the flag is deprecated and ignored).
        flags = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, log.logger)
        try:
            if not parser.parse_from_file(str(graph_path)):
                errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise RuntimeError("ONNX parser: " + "; ".join(errors))
            problems = check_network_types(network, self.policy, trt)
            if problems:
                raise PrecisionMismatchError(f"{self.name}: the parsed network does not follow the policy: " + "; ".join(problems))
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.builder.workspace_bytes)
            config.builder_optimization_level = self.builder.builder_optimization_level
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
            config.clear_flag(trt.BuilderFlag.TF32)  # policy FP32 means IEEE FP32
            profile = builder.create_optimization_profile()
            for name in ("input_ids", "attention_mask"):
                profile.set_shape(name, self.profile.min, self.profile.opt, self.profile.max)
            config.add_optimization_profile(profile)
            timing_path = self._timing_cache_path()
            with self.cache.lock(f"timing-{timing_path.stem}"):
                blob = timing_path.read_bytes() if timing_path.exists() else b""
                timing = config.create_timing_cache(blob)
                config.set_timing_cache(timing, ignore_mismatch=False)
                plan = builder.build_serialized_network(network, config)
                if plan is None:
                    raise RuntimeError("build_serialized_network returned None")
                timing_path.parent.mkdir(parents=True, exist_ok=True)
                timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
            (folder / ENGINE_FILE).write_bytes(bytes(plan))
        except Exception as exc:
            kept = self.cache.root / "failed-builds" / f"{self.model.name}-{self.policy.name}.log"
            kept.parent.mkdir(parents=True, exist_ok=True)
            log.write(kept)
            if isinstance(exc, PrecisionMismatchError):
                raise
            raise RuntimeError(f"{self.name}: TensorRT build failed ({exc}); builder log: {kept}") from exc
        log.write(folder / BUILD_LOG_FILE)

    def _build(self) -> None:
        from engines.graphs.precision_graph import precision_graph, verified_audit

        trt = self.trt
        graph = precision_graph(self.model, self.policy, self.cache)
        graph_audit = verified_audit(graph, self.policy, engine=self.name)
        entry = self.cache.get_or_build(
            self._engine_fields(graph),
            lambda folder: self._build_plan(graph.path, folder),
            description=f"{self.name} TensorRT engine",
        )
        # Deserializing is trusting: only plans this suite's cache wrote and checksummed.
        self._runtime = trt.Runtime(_FileLogger(trt).logger)
        self.engine = self._runtime.deserialize_cuda_engine(entry.file(ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{self.name}: the cached plan {entry.file(ENGINE_FILE)} does not deserialize")
        self.context = self.engine.create_execution_context()
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        problems = check_engine_types(info, self.policy)
        self.audit = dataclasses.replace(
            graph_audit,
            method=graph_audit.method + "; the TensorRT network's layers before the build; the engine inspector after it",
            problems=graph_audit.problems + problems,
            details=dict(graph_audit.details, engine_formats=sorted(inspector_datatypes(info))),
        )
        device_bytes = int(self.engine.device_memory_size_v2)
        plan_bytes = entry.file(ENGINE_FILE).stat().st_size
        self._memory = EngineMemory(device_bytes + plan_bytes, {"device_memory_bytes": device_bytes, "plan_bytes": plan_bytes})

    # -- run ---------------------------------------------------------------------
    def _stage(self, batch: TokenBatch) -> TokenBatch:
        self.profile.check(batch.shape, self.name)
        staged = super()._stage(batch)
        return TokenBatch(staged.input_ids.contiguous(), staged.attention_mask.contiguous(), staged.source)

    def _run(self, staged: TokenBatch) -> torch.Tensor:
        ids, mask = staged.input_ids, staged.attention_mask
        for name, tensor in (("input_ids", ids), ("attention_mask", mask)):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(self.context.get_tensor_shape("output"))
        output = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.context.set_tensor_address("output", output.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed")
        return output

    def _close(self) -> None:
        self.context = None
        self.engine = None

    def memory(self) -> EngineMemory:
        return self._memory

    def _info(self) -> EngineInfo:
        return EngineInfo(
            self.backend,
            f"TensorRT {self.trt.__version__}",
            str(self.device),
            "strongly typed network from the precision graph, one optimization profile",
            {"profile": dataclasses.asdict(self.profile)},
        )
