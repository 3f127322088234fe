"""Precision policies: the one place that says which ops run in which dtype.

Three tables, each defined once and read by every backend:

* :data:`DTYPES`: each dtype's name in torch, ONNX (``onnx.TensorProto``), TensorRT
  (``trt.DataType``) and the words TensorRT's engine inspector prints for it.
* :data:`OP_CLASSES`: which torch modules and functions, ONNX op types and TensorRT
  layer types belong to each op class.  The PyTorch rewrite
  (:mod:`engines.precision.torch_apply`), the ONNX converter
  (:mod:`engines.precision.onnx_convert`), the dtype audits
  (:mod:`engines.precision.audit`) and the TensorRT network check all look an op up
  here; editing this table changes every engine.
* :data:`POLICIES`: the built-in policies, op class -> dtype.  A policy can also be
  read from a file (:func:`load_policy_file`, selected as ``file:PATH``), with
  per-module or per-ONNX-node overrides (:func:`write_policy_file` writes one, for tools
  that search for the smallest set of ops to keep in FP32).

Op classes
----------
``matmul``
    GEMMs: ``nn.Linear``, GPT-2's ``Conv1D``, the LM head, and the two attention
    products ``Q @ K^T`` and ``P @ V``.
``softmax``
    The attention softmax.
``layernorm``
    LayerNorm.  (Its decomposition, for strict policies, is tagged with this class by
    the converter; a standalone ``ReduceMean`` or ``Pow`` in an exported graph is
    residual-stream arithmetic, class ``elementwise``.)
``elementwise``
    Everything else that carries activations: embeddings and their sums, residual
    adds, GELU, the attention scale and mask.  "The residual stream": one dtype per
    policy (a per-module override of it is refused: the stream crosses modules).

Strict reductions
-----------------
PyTorch's CUDA (and CPU) kernels for ``layer_norm`` and ``softmax`` read half
inputs but accumulate in FP32, which hides the overflow that TensorRT's FP16
layers (and a decomposed FP16 LayerNorm) show.  A policy with
``strict_reductions=True`` makes the PyTorch engine compute those two ops from
elementwise arithmetic with a pairwise sum in the op's dtype, so every intermediate
(``(x - mean)^2``, the sum of squares, ``exp`` and its sum) is rounded to it.

Policy files (schema 1)
-----------------------
JSON or TOML, chosen by suffix (``.json``, ``.toml``)::

    schema = 1
    name = "keep-last-ln"          # engine names use it: model/backend/NAME
    description = "fp16 with the last LayerNorm in FP32"
    base = "fp16"                  # optional: a built-in policy to start from
    gated = true                   # optional, default true: fails tests below the bar
    strict_reductions = false      # optional, default: the base's (else false)
    cosine_min = 0.9998            # optional, default: the bar of its lowest dtype

    [classes]                      # op class -> dtype; every class unless base is given
    softmax = "float32"

    [[overrides]]                  # optional, first match wins
    module = "encoder.layer.5.output.LayerNorm"   # a module path of the transformers model
    op_class = "layernorm"         # optional: every overridable class when absent
    dtype = "float32"

A ``module`` override covers that module and everything inside it (``encoder.layer.5``
covers the whole layer); a ``node`` override names one ONNX node and applies to the
ONNX backends only.  Dtypes are ``float32``/``float16``/``bfloat16`` (or ``fp32``/
``fp16``/``bf16``).  An override that matches nothing in the model is an error, so
a typo never passes as a policy that changed nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FLOAT32 = "float32"
FLOAT16 = "float16"
BFLOAT16 = "bfloat16"


@dataclasses.dataclass(frozen=True)
class DType:
    """One floating-point dtype under each runtime's name."""

    name: str
    short: str  # the precision-name spelling: fp32, fp16, bf16
    torch: str  # attribute of the torch module
    onnx: str  # attribute of onnx.TensorProto
    trt: str  # member of tensorrt.DataType
    inspector_words: tuple[str, ...]  # how TensorRT's reports write it
    itemsize: int  # bytes per element


DTYPES: Mapping[str, DType] = {
    d.name: d
    for d in (
        DType(FLOAT32, "fp32", "float32", "FLOAT", "FLOAT", ("FP32", "Float"), 4),
        DType(FLOAT16, "fp16", "float16", "FLOAT16", "HALF", ("FP16", "Half"), 2),
        DType(BFLOAT16, "bf16", "bfloat16", "BFLOAT16", "BF16", ("BF16", "BFloat16"), 2),
    )
}
_DTYPE_ALIASES = {d.short: d.name for d in DTYPES.values()}


def canonical_dtype(name: str) -> str:
    """``float16`` for ``float16`` or ``fp16``; anything else is an error naming the choices."""
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise PolicyError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)} (or {', '.join(_DTYPE_ALIASES)})")
    return name


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name].torch)


def onnx_type(name: str) -> int:
    """The ``onnx.TensorProto`` element type of a policy dtype."""
    from onnx import TensorProto

    return int(getattr(TensorProto, DTYPES[name].onnx))


def dtype_of_onnx_type(elem_type: int) -> str | None:
    """The policy dtype of an ONNX element type; None for non-float types (and FP64)."""
    from onnx import TensorProto

    for dtype in DTYPES.values():
        if int(getattr(TensorProto, dtype.onnx)) == elem_type:
            return dtype.name
    return None


@dataclasses.dataclass(frozen=True)
class OpClass:
    """What belongs to one op class in each representation of a model."""

    name: str
    description: str
    torch_modules: tuple[str, ...] = ()  # class names of modules the torch rewrite replaces
    torch_functions: tuple[str, ...] = ()  # torch function names the torch audit records
    onnx_ops: frozenset[str] = frozenset()  # ONNX op types the converter places in this class
    trt_layers: tuple[str, ...] = ()  # tensorrt.LayerType members checked before a TensorRT build
    overridable: bool = True  # whether a policy file may give one module/node its own dtype


# The op-class table.  Lookups (:func:`op_class_of_module`, ..._function, ..._onnx_op)
# read it at call time, so a change here reaches every backend.
OP_CLASSES: dict[str, OpClass] = {
    c.name: c
    for c in (
        OpClass(
            "matmul",
            "GEMMs: linear layers, GPT-2's Conv1D, the LM head, Q @ K^T and P @ V",
            torch_modules=("Linear", "Conv1D"),
            torch_functions=("linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum"),
            onnx_ops=frozenset({"MatMul", "Gemm"}),
            trt_layers=("MATRIX_MULTIPLY",),
        ),
        OpClass(
            "softmax",
            "the attention softmax",
            torch_functions=("softmax", "_softmax"),
            onnx_ops=frozenset({"Softmax"}),
            trt_layers=("SOFTMAX",),
        ),
        OpClass(
            "layernorm",
            "LayerNorm (its decomposition, for strict policies, is tagged with this class)",
            torch_modules=("LayerNorm",),
            torch_functions=("layer_norm",),
            onnx_ops=frozenset({"LayerNormalization"}),
            trt_layers=("NORMALIZATION",),
        ),
        OpClass(
            "elementwise",
            "the residual stream: embeddings, residual adds, GELU, attention scale and mask",
            onnx_ops=frozenset(
                {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Exp", "Neg", "Reciprocal", "Where",
                 "ReduceMean", "ReduceMax", "ReduceSum", "Max", "Min", "Relu", "Sigmoid", "Abs", "Clip", "Gelu",
                 "FastGelu"}
            ),
            overridable=False,
        ),
    )
}


def op_class_of_module(module: Any) -> str | None:
    """The op class a torch module belongs to by its class name (``Linear``, ``Conv1D``, ``LayerNorm``)."""
    kind = type(module).__name__
    return next((c.name for c in OP_CLASSES.values() if kind in c.torch_modules), None)


def op_class_of_function(name: str) -> str | None:
    return next((c.name for c in OP_CLASSES.values() if name in c.torch_functions), None)


def op_class_of_onnx_op(op_type: str) -> str | None:
    return next((c.name for c in OP_CLASSES.values() if op_type in c.onnx_ops), None)


def checked_classes() -> tuple[str, ...]:
    """Classes every engine's audit must observe: those with a function or layer of their own."""
    return tuple(c.name for c in OP_CLASSES.values() if c.torch_functions or c.trt_layers)


class PolicyError(ValueError):
    """A policy (built-in name, file or override) that cannot be used; the message names the fix."""


class UnknownPrecisionError(PolicyError):
    """A precision name that no policy defines."""


@dataclasses.dataclass(frozen=True)
class Override:
    """One module subtree or ONNX node computing an op class (or all overridable ones) in ``dtype``."""

    dtype: str
    module: str | None = None
    node: str | None = None
    op_class: str | None = None

    def covers(self, op_class: str, module: str | None, node: str | None) -> bool:
        if self.op_class is not None and self.op_class != op_class:
            return False
        if not OP_CLASSES[op_class].overridable:
            return False
        return self.targets(module=module, node=node)

    def targets(self, *, module: str | None = None, node: str | None = None) -> bool:
        """Whether this override names ``node``, or ``module`` or a module inside it."""
        if self.node is not None:
            return node == self.node
        return module is not None and (module == self.module or module.startswith(f"{self.module}."))

    def describe(self) -> str:
        where = f"module {self.module!r}" if self.module is not None else f"ONNX node {self.node!r}"
        return f"{where}{'' if self.op_class is None else ' ' + self.op_class} -> {self.dtype}"

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    description: str
    classes: Mapping[str, str]  # op class -> dtype, one entry per OP_CLASSES key
    strict_reductions: bool = False
    # Gated precisions must meet the cosine bar with zero NaN/Inf in every
    # `pytest -m fidelity` run; the others are measured and reported unless the
    # user gates them with --gate-precisions.
    gated_by_default: bool = False
    overrides: tuple[Override, ...] = ()
    cosine_min: float | None = None  # None: the tolerance table's bar (fidelity.metrics)
    source: str = "built-in"  # or the file it was read from
    source_sha256: str | None = None

    def __post_init__(self) -> None:
        missing = set(OP_CLASSES) - set(self.classes)
        unknown = set(self.classes) - set(OP_CLASSES)
        if missing or unknown:
            raise PolicyError(
                f"policy {self.name!r}: op classes must be exactly {', '.join(OP_CLASSES)}"
                + (f"; missing {sorted(missing)}" if missing else "")
                + (f"; unknown {sorted(unknown)}" if unknown else "")
            )
        for op_class, dtype in self.classes.items():
            if dtype not in DTYPES:
                raise PolicyError(f"policy {self.name!r}: {op_class} dtype {dtype!r} is not one of {tuple(DTYPES)}")

    def __hash__(self) -> int:
        return hash((self.name, self.fingerprint))

    def dtype_of(self, op_class: str, *, module: str | None = None, node: str | None = None) -> str:
        """The dtype ``op_class`` computes in, in ``module`` (a module path) or ONNX ``node``."""
        if op_class not in OP_CLASSES:
            raise KeyError(f"unknown op class {op_class!r}; expected one of {tuple(OP_CLASSES)}")
        for override in self.overrides:
            if override.covers(op_class, module, node):
                return override.dtype
        return self.classes[op_class]

    @property
    def dtypes(self) -> frozenset[str]:
        return frozenset(self.classes.values()) | {o.dtype for o in self.overrides}

    @property
    def low_precision_dtypes(self) -> frozenset[str]:
        return self.dtypes - {FLOAT32}

    @property
    def is_reference(self) -> bool:
        return self.dtypes == {FLOAT32}

    @property
    def has_node_overrides(self) -> bool:
        return any(o.node is not None for o in self.overrides)

    @property
    def fingerprint(self) -> str:
        """sha256 of what the policy computes (classes, strictness, overrides): cache keys use it."""
        payload = {
            "classes": dict(sorted(self.classes.items())),
            "strict_reductions": self.strict_reductions,
            "overrides": [o.as_dict() for o in self.overrides],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def summary(self) -> str:
        parts = [f"{c}={self.classes[c]}" for c in OP_CLASSES]
        if self.strict_reductions:
            parts.append("reductions=low-precision")
        if self.overrides:
            parts.append(f"{len(self.overrides)} override(s)")
        return ", ".join(parts)

    def unmatched_overrides(self, *, modules: Iterable[str] = (), nodes: Iterable[str] = ()) -> list[Override]:
        """Overrides that cover no module path in ``modules`` and no node in ``nodes``."""
        modules, nodes = list(modules), set(nodes)
        return [
            o for o in self.overrides
            if not (o.node in nodes if o.node is not None else any(o.targets(module=m) for m in modules))
        ]

    def describe(self) -> dict[str, Any]:
        """What reports record about the policy: its source file and hash, classes and overrides."""
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.source_sha256,
            "classes": dict(self.classes),
            "strict_reductions": self.strict_reductions,
            "overrides": [o.as_dict() for o in self.overrides],
            "fingerprint": self.fingerprint,
        }


def _uniform(dtype: str) -> dict[str, str]:
    return {c: dtype for c in OP_CLASSES}


POLICIES: Mapping[str, PrecisionPolicy] = {
    p.name: p
    for p in (
        PrecisionPolicy(
            name="fp32",
            description="FP32 reference: IEEE FP32 everywhere, TF32 off",
            classes=_uniform(FLOAT32),
            gated_by_default=True,
        ),
        PrecisionPolicy(
            name="hybrid",
            description="FP16 GEMMs (linear layers, attention products); FP32 softmax, LayerNorm and residual stream",
            classes={"matmul": FLOAT16, "softmax": FLOAT32, "layernorm": FLOAT32, "elementwise": FLOAT32},
            gated_by_default=True,
        ),
        PrecisionPolicy(
            name="fp16",
            description="FP16 everywhere (framework kernels may accumulate reductions in FP32)",
            classes=_uniform(FLOAT16),
        ),
        PrecisionPolicy(
            name="fp16-strict",
            description="FP16 everywhere, softmax and LayerNorm reductions computed in FP16 arithmetic",
            classes=_uniform(FLOAT16),
            strict_reductions=True,
        ),
        PrecisionPolicy(
            name="bf16",
            description="BF16 everywhere (framework kernels may accumulate reductions in FP32)",
            classes=_uniform(BFLOAT16),
        ),
    )
}

REFERENCE_POLICY = POLICIES["fp32"]


def policies_markdown() -> str:
    """The built-in policies as a Markdown table (the README's is this, checked by a test)."""
    from engines.tables import render_table

    rows = [
        (f"`{p.name}`", *(p.classes[c] for c in OP_CLASSES), "yes" if p.strict_reductions else "no",
         "yes" if p.gated_by_default else "no", p.description)
        for p in POLICIES.values()
    ]
    return render_table(("policy", *OP_CLASSES, "strict reductions", "gated by default", "what it is"), rows, markdown=True)
FILE_PREFIX = "file:"
POLICY_FILE_SCHEMA_VERSION = 1
_FILE_KEYS = {"schema", "name", "description", "base", "gated", "strict_reductions", "cosine_min", "classes", "overrides"}
_OVERRIDE_KEYS = {"module", "node", "op_class", "dtype"}


def get_policy(name: str) -> PrecisionPolicy:
    """A built-in policy by name, or a policy file given as ``file:PATH``."""
    if name.startswith(FILE_PREFIX):
        return load_policy_file(Path(name[len(FILE_PREFIX) :]).expanduser())
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPrecisionError(
            f"unknown precision {name!r}; known precisions: {', '.join(POLICIES)}, or file:PATH for a policy file. "
            "Pass them with --precisions NAME[,NAME...]."
        ) from None


def _read_policy_data(path: Path) -> tuple[dict[str, Any], bytes]:
    if not path.is_file():
        raise PolicyError(f"policy file {path} does not exist (or is not a file); fix the path after 'file:'")
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(raw)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode())
        else:
            raise PolicyError(f"policy file {path}: use a .json or .toml file (got {suffix or 'no suffix'})")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise PolicyError(f"policy file {path} does not parse as {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"policy file {path}: the top level must be a table/object")
    return data, raw


def _override_from(item: Any, path: Path, index: int) -> Override:
    where = f"policy file {path}, overrides[{index}]"
    if not isinstance(item, dict):
        raise PolicyError(f"{where}: each override is a table with module or node, optional op_class, and dtype")
    unknown = set(item) - _OVERRIDE_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_OVERRIDE_KEYS)}")
    if ("module" in item) == ("node" in item):
        raise PolicyError(f"{where}: give exactly one of module (a module path) or node (an ONNX node name)")
    if "dtype" not in item:
        raise PolicyError(f"{where}: missing dtype")
    op_class = item.get("op_class")
    if op_class is not None:
        if op_class not in OP_CLASSES:
            raise PolicyError(f"{where}: unknown op_class {op_class!r}; one of {', '.join(OP_CLASSES)}")
        if not OP_CLASSES[op_class].overridable:
            raise PolicyError(
                f"{where}: {op_class} cannot be overridden per module or node (the residual stream crosses "
                "modules: it has one dtype per policy); set it under [classes]"
            )
    target = item.get("module", item.get("node"))
    if not isinstance(target, str) or not target.strip():
        raise PolicyError(f"{where}: module/node must be a non-empty string")
    try:
        dtype = canonical_dtype(str(item["dtype"]))
    except PolicyError as exc:
        raise PolicyError(f"{where}: {exc}") from None
    return Override(dtype=dtype, module=item.get("module"), node=item.get("node"), op_class=op_class)


def load_policy_file(path: Path) -> PrecisionPolicy:
    """Read and validate a policy file (schema in this module's docstring)."""
    data, raw = _read_policy_data(path)
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise PolicyError(f"policy file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_FILE_KEYS)}")
    if data.get("schema") != POLICY_FILE_SCHEMA_VERSION:
        raise PolicyError(
            f"policy file {path}: schema {data.get('schema')!r} is not supported; this suite reads schema "
            f"{POLICY_FILE_SCHEMA_VERSION} (add `schema = {POLICY_FILE_SCHEMA_VERSION}`)"
        )
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(FILE_PREFIX):
        raise PolicyError(f"policy file {path}: name must be a non-empty string without '/' (engine names use it)")
    if name in POLICIES:
        raise PolicyError(f"policy file {path}: name {name!r} is a built-in policy's; choose another name")
    base_name = data.get("base")
    base = None
    if base_name is not None:
        if base_name not in POLICIES:
            raise PolicyError(f"policy file {path}: base {base_name!r} is not a built-in policy ({', '.join(POLICIES)})")
        base = POLICIES[base_name]
    classes = dict(base.classes) if base else {}
    given = data.get("classes", {})
    if not isinstance(given, dict):
        raise PolicyError(f"policy file {path}: classes must be a table of op class = dtype")
    for op_class, dtype in given.items():
        if op_class not in OP_CLASSES:
            raise PolicyError(f"policy file {path}: unknown op class {op_class!r}; one of {', '.join(OP_CLASSES)}")
        try:
            classes[op_class] = canonical_dtype(str(dtype))
        except PolicyError as exc:
            raise PolicyError(f"policy file {path}, classes.{op_class}: {exc}") from None
    missing = [c for c in OP_CLASSES if c not in classes]
    if missing:
        raise PolicyError(f"policy file {path}: no dtype for {', '.join(missing)}; set them under [classes] or give a base")
    overrides_data = data.get("overrides", [])
    if not isinstance(overrides_data, list):
        raise PolicyError(f"policy file {path}: overrides must be a list of tables ([[overrides]] in TOML)")
    overrides = tuple(_override_from(item, path, i) for i, item in enumerate(overrides_data))
    cosine_min = data.get("cosine_min")
    if cosine_min is not None and not (isinstance(cosine_min, (int, float)) and 0.0 < cosine_min <= 1.0):
        raise PolicyError(f"policy file {path}: cosine_min must be a number in (0, 1], got {cosine_min!r}")
    strict = data.get("strict_reductions", base.strict_reductions if base else False)
    gated = data.get("gated", True)
    for key, value in (("strict_reductions", strict), ("gated", gated)):
        if not isinstance(value, bool):
            raise PolicyError(f"policy file {path}: {key} must be true or false, got {value!r}")
    return PrecisionPolicy(
        name=name,
        description=str(data.get("description", f"policy file {path.name}")),
        classes=classes,
        strict_reductions=strict,
        gated_by_default=gated,
        overrides=overrides,
        cosine_min=None if cosine_min is None else float(cosine_min),
        source=str(path.resolve()),
        source_sha256=hashlib.sha256(raw).hexdigest(),
    )


def write_policy_file(policy: PrecisionPolicy, path: Path) -> Path:
    """Write ``policy`` as a schema-1 JSON policy file (what a search hands to every backend)."""
    data: dict[str, Any] = {
        "schema": POLICY_FILE_SCHEMA_VERSION,
        "name": policy.name,
        "description": policy.description,
        "gated": policy.gated_by_default,
        "strict_reductions": policy.strict_reductions,
        "classes": dict(policy.classes),
        "overrides": [o.as_dict() for o in policy.overrides],
    }
    if policy.cosine_min is not None:
        data["cosine_min"] = policy.cosine_min
    from engines.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
