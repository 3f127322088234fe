"""TensorRT engines: one runner, two runtimes: ``trt`` (TensorRT >= 10, module ``tensorrt``) and ``trt-rtx``
(TensorRT for RTX, module ``tensorrt_rtx``, the same 10/11 Python API).

Build: the policy's ONNX precision graph (explicit Casts: TensorRT 11 and TensorRT for RTX build only strongly
typed networks) is parsed with ``OnnxParser``; before the build, every MATRIX_MULTIPLY, SOFTMAX and
NORMALIZATION layer's input dtype is checked against the dtype the policy gives that ONNX node
(:func:`check_network_types`, per node, so policy-file overrides are checked too).  One optimization profile
covers batch x sequence (default 1-32 x 1-512, opt 8 x 128); TF32 is cleared so that FP32 means IEEE FP32; the
timing cache persists next to the engine cache; the plan is cached with its builder log.

After the build (:func:`check_built_kernels`): the builder, at ``ProfilingVerbosity.DETAILED`` and VERBOSE
logging, prints the engine's kernels ("Layers:"), each with its type, the datatype of its input, output and
constant tensors, and the ONNX nodes it implements.  This is what the check reads, on every machine, GPU or not.
What it can see: the input datatype of every GEMM kernel (exact, per ONNX MatMul/Gemm node), which datatypes
each fused kernel takes and gives, and whether a low-precision dtype appears at all.  What it cannot see: the
arithmetic *inside* a fused kernel (Myelin fuses LayerNorm with casts and adds into one ``kgen`` kernel, and
QK^T, softmax and PV into one attention kernel), so a softmax or LayerNorm is checked only by the datatypes at
its kernel's boundary.  (TensorRT's engine inspector, after deserialization, shows a Myelin engine as one layer
with the graph's inputs and outputs only; it is not used for the check.)

Build without running: TensorRT for RTX builds ahead of time for a chosen compute capability
(``--trt-target``; default: the local GPU if the runtime runs on it, else SM80), also on a machine with no GPU.
Where the engine cannot run (no GPU, or a GPU the runtime refuses, such as Hopper), the build completes, the plan
is cached and checked, and the runner raises :class:`BuiltNotRunnableError` with the runtime's own reason: a
skip of the run step, recorded as "built, not runnable here".  Full TensorRT builds on the GPU it runs on.

Run: inputs and outputs are torch CUDA tensors bound with ``set_tensor_address``; ``execute_async_v3`` runs on
the current torch stream.  Full TensorRT and TensorRT for RTX have never run on a GPU of this project (neither
is installable on the lent H100 in a runnable form); the run path is written against the documented API.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, ClassVar

import torch

from engines.backends.base import (
    BackendUnavailableError,
    EngineInfo,
    EngineMemory,
    Runner,
    require_runtime,
)
from engines.batch import InvalidInputError, TokenBatch
from engines.files import atomic_write_bytes
from engines.precision.audit import PrecisionAudit, PrecisionMismatchError, raise_on_mismatch, tally
from engines.precision.policy import DTYPES, FLOAT32, OP_CLASSES

ENGINE_FILE = "engine.plan"
BUILD_LOG_FILE = "build.log"
KERNELS_FILE = "kernels.json"
AUTO_TARGET = "auto"
DEFAULT_AOT_TARGET = "SM80"  # A100, the published pipeline's cross-check GPU; runs on 8.0/8.6/8.9


@dataclasses.dataclass(frozen=True)
class TensorRTRuntime:
    backend: str
    module: str
    what: str
    minimum_major: int
    install_hint: str
    builds_ahead_of_time: bool  # builds for a chosen compute capability, with or without a GPU
    timing_cache: bool = True  # TensorRT for RTX: timing-cache calls are deprecated no-ops


RUNTIMES: dict[str, TensorRTRuntime] = {
    r.backend: r
    for r in (
        TensorRTRuntime(
            "trt",
            "tensorrt",
            "TensorRT",
            10,
            "pip install --extra-index-url https://pypi.nvidia.com tensorrt (TensorRT 10 or 11 for your CUDA), "
            "or run inside an NGC TensorRT container (nvcr.io/nvidia/tensorrt)",
            builds_ahead_of_time=False,
        ),
        TensorRTRuntime(
            "trt-rtx",
            "tensorrt_rtx",
            "TensorRT for RTX",
            1,
            'pip install -e ".[trt-rtx]" (or: pip install tensorrt-rtx-cu13)',
            builds_ahead_of_time=True,
            timing_cache=False,
        ),
    )
}


class BuiltNotRunnableError(BackendUnavailableError):
    """The engine was built (and checked, and cached) but cannot run on this machine; the message says why."""

    def __init__(self, message: str, *, info: EngineInfo, audit: PrecisionAudit) -> None:
        super().__init__(message)
        self.info = info
        self.audit = audit


def import_runtime(backend: str):
    runtime = RUNTIMES[backend]
    return require_runtime(
        runtime.module, what=runtime.what, install_hint=runtime.install_hint, minimum_major=runtime.minimum_major
    )


def offered_targets(trt) -> list[str]:
    """The compute capabilities this runtime builds for (TensorRT for RTX: SM75, SM80, ...)."""
    capability = getattr(trt, "ComputeCapability", None)
    if capability is None:
        return []
    return sorted((m for m in dir(capability) if re.fullmatch(r"SM\d+", m)), key=lambda m: int(m[2:]))


def local_target(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return f"SM{props.major}{props.minor}"


def resolve_target(trt, runtime: TensorRTRuntime, option: str, device: torch.device) -> str:
    """The compute capability to build for: ``--trt-target``, else the local GPU where the runtime runs, else SM80."""
    local = local_target(device)
    if not runtime.builds_ahead_of_time:
        if local is None:
            raise BackendUnavailableError(f"{runtime.what} builds on the GPU it runs on; there is no CUDA GPU here")
        if option not in (AUTO_TARGET, local):
            raise BackendUnavailableError(f"{runtime.what} builds for this GPU ({local}) only, not --trt-target {option}")
        return local
    offered = offered_targets(trt)
    if option == AUTO_TARGET:
        return local if local in offered else DEFAULT_AOT_TARGET
    if option not in offered:
        raise BackendUnavailableError(
            f"--trt-target {option} is not one {runtime.what} {trt.__version__} builds for; choose one of "
            f"{', '.join(offered)} (or auto)"
        )
    return option


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


class _LogCollector:
    """A TensorRT logger that keeps every message (VERBOSE included), for the builder log and the kernel report."""

    def __init__(self, trt) -> None:
        outer = self

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity, msg) -> None:
                outer.lines.append((getattr(severity, "name", str(severity)), msg))

        self.lines: list[tuple[str, str]] = []
        self.logger = Logger()

    def text(self) -> str:
        return "\n".join(f"[{severity}] {msg}" for severity, msg in self.lines) + "\n"

    def errors(self) -> list[str]:
        return [msg for severity, msg in self.lines if severity in ("ERROR", "INTERNAL_ERROR", "kERROR")]


# --- checks -----------------------------------------------------------------------------------------------


def trt_dtype_words(dtype: str) -> tuple[str, ...]:
    """How TensorRT writes a policy dtype in its reports (``Half``, ``BFloat16``, ``Float``, ...)."""
    return DTYPES[dtype].inspector_words


def check_network_types(network, expected: dict[str, tuple[str, str]], policy, trt) -> tuple[list[str], list[tuple[str, str]]]:
    """Problems with the parsed network's compute layers, and ``(op class, dtype)`` of each one seen.

    ``expected`` maps ONNX node names (which the parser gives its layers) to ``(op class, dtype)`` as the
    precision graph's own audit derived them; a layer missing from it is held to its class's dtype.
    Layer types per op class come from the op-class table, TensorRT dtypes from the dtype table.
    """
    wanted = {
        getattr(trt.LayerType, layer_type): op_class.name
        for op_class in OP_CLASSES.values()
        for layer_type in op_class.trt_layers
    }
    names = {getattr(trt.DataType, dtype.trt): name for name, dtype in DTYPES.items()}
    problems, seen = [], []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type not in wanted:
            continue
        op_class, want = expected.get(layer.name, (wanted[layer.type], policy.dtype_of(wanted[layer.type])))
        got = names.get(layer.get_input(0).dtype, str(layer.get_input(0).dtype))
        seen.append((op_class, got))
        if got != want:
            problems.append(f"{layer.name} ({op_class}) takes {got}, policy says {want}")
    if not any(c == "matmul" for c, _ in seen):
        problems.append("the network has no matrix-multiply layer")
    return problems, seen


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of a built engine, as the builder's layer report describes it."""

    name: str
    layer_type: str
    inputs: tuple[str, ...]  # datatypes
    outputs: tuple[str, ...]
    constants: tuple[str, ...]
    onnx_nodes: tuple[str, ...]

    @property
    def tensors(self) -> set[str]:
        return set(self.inputs) | set(self.outputs) | set(self.constants)


_FLOAT_WORDS = {word for dtype in DTYPES.values() for word in dtype.inspector_words}


def parse_kernel_report(log_text: str) -> list[Kernel]:
    """The kernels of the builder's "Layers:" report (printed at DETAILED profiling verbosity, VERBOSE logging)."""
    start = log_text.find("Layers:\nName: ")
    if start < 0:
        return []
    report = log_text[start:]
    end = re.search(r"\n\[(VERBOSE|INFO|WARNING|ERROR)\]", report)
    report = report[: end.start()] if end else report
    # Each entry: "Name: ..., LayerType: ..., Inputs: [...], Constants: [...], Outputs: [...], TacticName: ...";
    # the tensor lists nest brackets (Dimensions: [-1,64]), so each is cut at the key that follows it.
    following = {"Inputs": "Constants", "Constants": "Outputs", "Outputs": "TacticName"}
    kernels = []
    for entry in report.split("\nName: ")[1:]:
        def datatypes(section: str) -> tuple[str, ...]:
            match = re.search(rf"{section}: \[(.*?)\], {following[section]}:", entry, flags=re.S)
            return tuple(re.findall(r"Datatype: (\w+)", match.group(1))) if match else ()

        layer_type = re.search(r"LayerType: (\w+)", entry)
        kernels.append(
            Kernel(
                name=entry.split(",", 1)[0],
                layer_type=layer_type.group(1) if layer_type else "",
                inputs=datatypes("Inputs"),
                outputs=datatypes("Outputs"),
                constants=datatypes("Constants"),
                onnx_nodes=tuple(re.findall(r"\[ONNX Layer: ([^\]]+)\]", entry)),
            )
        )
    return kernels


def read_kernel_report(path: Path) -> tuple[dict[str, Any], list[Kernel]]:
    """The parsed network's tally and the kernels of a cached engine's ``kernels.json``."""
    report = json.loads(path.read_text())
    kernels = [Kernel(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) for d in report["kernels"]]
    return report["network"], kernels


def check_built_kernels(kernels: list[Kernel], expected: dict[str, tuple[str, str]], policy) -> tuple[list[str], list[str]]:
    """``(problems, blind spots)`` of a built engine's kernels against the dtype each ONNX compute node must have.

    Exact for GEMM kernels (their float inputs must be the node's dtype); for fused kernels, the node's dtype
    must appear at the kernel's boundary; for the policy, its low-precision dtypes must appear and an FP32
    policy must show none.
    """
    if not kernels:
        return ["the builder printed no layer report (DETAILED profiling verbosity), so the built engine's "
                "precision cannot be verified"], []
    problems, blind = [], []
    by_node: dict[str, list[Kernel]] = {}
    for kernel in kernels:
        for node in kernel.onnx_nodes:
            by_node.setdefault(node, []).append(kernel)
    gemm_nodes = {node for node, (op_class, _) in expected.items() if op_class == "matmul"}
    for node, (op_class, dtype) in sorted(expected.items()):
        found = by_node.get(node, [])
        words = set(trt_dtype_words(dtype))
        if not found:
            if op_class == "matmul":
                problems.append(f"{node} (matmul) is in no kernel of the built engine")
            continue
        for kernel in found:
            floats = [t for t in kernel.inputs if t in _FLOAT_WORDS]
            if op_class == "matmul":
                if kernel.layer_type == "gemm" and (not floats or not set(floats) <= words):
                    problems.append(f"{node} (matmul) runs in GEMM kernel {kernel.name} taking {floats}, policy says {dtype}")
                elif not kernel.tensors & words:
                    problems.append(
                        f"{node} (matmul) is fused into {kernel.layer_type} kernel {kernel.name}, which neither takes "
                        f"nor gives {dtype} (its tensors: {sorted(kernel.tensors)})"
                    )
            elif gemm_nodes & set(kernel.onnx_nodes):
                # Fused with GEMMs (an attention kernel: QK^T, softmax, PV): the boundary tensors are the GEMMs';
                # this op's own precision is internal to the kernel.
                if not kernel.tensors & words:
                    blind.append(
                        f"{node} ({op_class}, policy {dtype}) runs inside {kernel.layer_type} kernel {kernel.name} "
                        f"together with GEMMs; the kernel's tensors are {sorted(kernel.tensors)}, its {op_class} "
                        "arithmetic is not reported"
                    )
            elif not kernel.tensors & words:
                problems.append(
                    f"{node} ({op_class}) is fused into {kernel.layer_type} kernel {kernel.name}, which neither takes "
                    f"nor gives {dtype} (its tensors: {sorted(kernel.tensors)})"
                )
    all_tensors = set().union(*(k.tensors for k in kernels))
    for dtype in policy.low_precision_dtypes:
        if not all_tensors & set(trt_dtype_words(dtype)):
            problems.append(f"the built engine has no {dtype} tensor anywhere: it did not build in the precision its graph asks for")
    if policy.is_reference:
        low = all_tensors & {w for d in DTYPES.values() if d.name != FLOAT32 for w in d.inspector_words}
        if low:
            problems.append(f"the FP32 engine has reduced-precision tensors {sorted(low)}")
    return problems, blind


# --- the runner ----------------------------------------------------------------------------------------------


class TensorRTRunner(Runner):
    backend: ClassVar[str] = "trt"

    def __init__(self, model, policy, device: str, options=None, *, builder: BuilderOptions | None = None) -> None:
        super().__init__(model, policy, device, options)
        self.runtime = RUNTIMES[self.backend]
        self.trt = import_runtime(self.backend)
        if self.device.type != "cuda" and not self.runtime.builds_ahead_of_time:
            raise BackendUnavailableError(f"{self.runtime.what} needs a CUDA device, got {self.device}")
        from engines.cache import EngineCache

        self.cache = self.options.cache or EngineCache()
        self.builder = builder or BuilderOptions()
        self.profile = self.builder.profile.clipped(model.max_positions)
        self.target: str | None = None
        self.plan_path: Path | None = None
        self.engine = None
        self.context = None
        self._memory = EngineMemory()

    def input_limits(self) -> tuple[int, int]:
        return self.profile.max

    # -- build -------------------------------------------------------------------
    def _engine_fields(self, graph) -> dict[str, Any]:
        return {
            "artifact": "trt-engine",
            "runtime": self.runtime.module,
            "runtime_version": self.trt.__version__,
            "target": self.target,
            "model": self.model.name,
            "policy": self.policy.name,
            "policy_fingerprint": self.policy.fingerprint,
            "graph": graph.digest,
            "builder": dataclasses.replace(self.builder, profile=self.profile).as_key(),
        }

    def _timing_cache_path(self) -> Path:
        name = re.sub(r"[^A-Za-z0-9]+", "_", f"{self.runtime.module}-{self.trt.__version__}-{self.target}")
        return self.cache.root / "timing" / f"{name}.cache"

    def _configure(self, builder, config) -> None:
        trt = self.trt
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.builder.workspace_bytes)
        config.builder_optimization_level = self.builder.builder_optimization_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the kernel report the post-build check reads
        config.clear_flag(trt.BuilderFlag.TF32)  # policy FP32 means IEEE FP32
        if self.runtime.builds_ahead_of_time:
            config.num_compute_capabilities = 1
            config.set_compute_capability(getattr(trt.ComputeCapability, self.target), 0)
        profile = builder.create_optimization_profile()
        for name in ("input_ids", "attention_mask"):
            profile.set_shape(name, self.profile.min, self.profile.opt, self.profile.max)
        config.add_optimization_profile(profile)

    def _network_flags(self) -> int:
        trt = self.trt
        major = int(trt.__version__.split(".")[0])
        # TensorRT 11 and TensorRT for RTX are always strongly typed (the flag is deprecated or absent).
        if self.runtime.builds_ahead_of_time or major >= 11:
            return 0
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def parse(self, graph_path: Path, log: _LogCollector):
        """``(builder, network, parser)`` for the graph at ``graph_path``; parser errors are a RuntimeError naming them."""
        trt = self.trt
        builder = trt.Builder(log.logger)
        network = builder.create_network(self._network_flags())
        parser = trt.OnnxParser(network, log.logger)
        if not parser.parse_from_file(str(graph_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError(f"{self.runtime.what} ONNX parser: " + "; ".join(errors))
        return builder, network, parser

    def _build_plan(self, graph_path: Path, expected: dict[str, tuple[str, str]], folder: Path) -> None:
        trt = self.trt
        log = _LogCollector(trt)
        try:
            builder, network, _parser = self.parse(graph_path, log)
            problems, seen = check_network_types(network, expected, self.policy, trt)
            if problems:
                raise PrecisionMismatchError(
                    f"{self.name}: the parsed network does not follow the policy: " + "; ".join(problems[:10])
                )
            config = builder.create_builder_config()
            self._configure(builder, config)
            if self.runtime.timing_cache:
                timing_path = self._timing_cache_path()
                with self.cache.lock(f"timing-{timing_path.stem}"):
                    blob = timing_path.read_bytes() if timing_path.exists() else b""
                    config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
                    plan = builder.build_serialized_network(network, config)
                    if plan is not None:
                        atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))
            else:
                plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise RuntimeError("build_serialized_network returned None: " + "; ".join(log.errors()[-3:]))
            (folder / ENGINE_FILE).write_bytes(bytes(plan))
            kernels = parse_kernel_report(log.text())
            (folder / KERNELS_FILE).write_text(json.dumps({
                "network": tally(seen),
                "kernels": [dataclasses.asdict(k) for k in kernels],
            }, indent=1))
        except Exception as exc:
            kept = self.cache.root / "failed-builds" / f"{self.model.name}-{self.backend}-{self.policy.name}.log"
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(log.text())
            if isinstance(exc, PrecisionMismatchError):
                raise
            raise RuntimeError(f"{self.name}: {self.runtime.what} build failed ({exc}); builder log: {kept}") from exc
        (folder / BUILD_LOG_FILE).write_text(log.text())

    def _build(self) -> None:
        import onnx

        from engines.graphs.precision_graph import precision_graph, verified_audit
        from engines.precision.onnx_convert import expected_node_dtypes

        self.target = resolve_target(self.trt, self.runtime, self.options.trt_target, self.device)
        graph = precision_graph(self.model, self.policy, self.cache)
        graph_audit = verified_audit(graph, self.policy, engine=self.name)
        raise_on_mismatch(graph_audit)  # a graph that breaks its policy is never built
        expected = expected_node_dtypes(onnx.load(str(graph.path), load_external_data=False), self.policy)
        entry = self.cache.get_or_build(
            self._engine_fields(graph),
            lambda folder: self._build_plan(graph.path, expected, folder),
            description=f"{self.name} {self.runtime.what} engine for {self.target}",
        )
        self.plan_path = entry.file(ENGINE_FILE)
        network, kernels = read_kernel_report(entry.file(KERNELS_FILE))
        problems, blind = check_built_kernels(kernels, expected, self.policy)
        self.audit = dataclasses.replace(
            graph_audit,
            method=graph_audit.method + f"; the parsed {self.runtime.what} network's layers before the build; "
            "the built engine's kernels from the builder's layer report",
            problems=graph_audit.problems + problems,
            blind_spots=graph_audit.blind_spots + blind,
            details=dict(graph_audit.details, network=network,
                         kernels=dict(collections.Counter(k.layer_type for k in kernels))),
        )
        raise_on_mismatch(self.audit)  # a wrong engine fails even where it cannot run
        reason = self._deserialize()
        if reason is not None:
            raise BuiltNotRunnableError(
                f"{self.name}: built for {self.target} and cached ({self.plan_path}), not runnable here: {reason}",
                info=self._info(),
                audit=self.audit,
            )

    def _deserialize(self) -> str | None:
        """Load the plan on this GPU; None when it runs, else the reason it cannot (the runtime's own words)."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            offered = offered_targets(self.trt)
            where = f"; it runs on {', '.join(offered)}" if offered else ""
            return f"there is no CUDA GPU here{where}"
        trt = self.trt
        log = _LogCollector(trt)
        # Deserializing is trusting: only plans this suite's cache wrote and checksummed reach here.
        self._runtime = trt.Runtime(log.logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            return "; ".join(log.errors()) or "deserialize_cuda_engine returned None"
        self.context = self.engine.create_execution_context()
        device_bytes = int(getattr(self.engine, "device_memory_size_v2", getattr(self.engine, "device_memory_size", 0)))
        plan_bytes = self.plan_path.stat().st_size
        self._memory = EngineMemory(device_bytes + plan_bytes, {"device_memory_bytes": device_bytes, "plan_bytes": plan_bytes})
        return None

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
        built = "ahead of time" if self.runtime.builds_ahead_of_time else "on this GPU"
        return EngineInfo(
            self.backend,
            f"{self.runtime.what} {self.trt.__version__}",
            str(self.device),
            f"strongly typed network from the precision graph, built {built} for {self.target}, one optimization profile",
            {"profile": dataclasses.asdict(self.profile), "target": self.target,
             "plan": None if self.plan_path is None else str(self.plan_path)},
        )


class TensorRTRTXRunner(TensorRTRunner):
    """TensorRT for RTX: the same runner; builds ahead of time for a chosen compute capability."""

    backend: ClassVar[str] = "trt-rtx"
