"""Options, declared once: one table per job feeds the command line, validation, the session and the report.

An :class:`Option` says its flag, help, default (and how the help states a default
that depends on the machine), its kind and choices.  :func:`add_options` registers a
table with pytest (or argparse), :func:`collect` reads the values back, and each
consumer's ``from_values`` validates them in one place.  :func:`parse_list` is the
one comma-list parser.

This module holds the engine-selection table (:data:`ENGINE_OPTIONS`) and its
validated form, :class:`EngineSelection`; ``fidelity/`` and ``perf/`` declare their
own tables with the same :class:`Option`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from engines.backends.registry import BACKENDS, DEFAULT_BACKENDS, default_backends, get_backend
from engines.env import DEVICE_CHOICES, resolve_device
from engines.models import MODEL_SPECS, WEIGHTS_MODES, get_spec, validate_model_dir
from engines.numerics import DEFAULT_NUMERICS, NUMERICS, Numerics, get_numerics
from engines.perturb import PerturbationError, WeightPerturbation, parse_perturbation
from engines.precision.policy import FILE_PREFIX, POLICIES, PolicyError, PrecisionPolicy, get_policy

DEFAULT_MODELS = ("tiny-bert", "tiny-gpt2", "minilm")


class OptionError(ValueError):
    """A bad command-line option; the pytest plugins turn it into a usage error (exit code 4)."""


def usage_errors() -> tuple[type[Exception], ...]:
    """Every error that means "the command line is wrong": each becomes a usage error naming the fix."""
    from engines.backends.registry import UnknownBackendError
    from engines.env import DeviceUnavailableError
    from engines.models import ModelLoadError, UnknownModelError

    return (OptionError, PolicyError, UnknownModelError, UnknownBackendError, DeviceUnavailableError, ModelLoadError,
            PerturbationError)


@dataclasses.dataclass(frozen=True)
class Option:
    flag: str
    help: str
    default: Any = None
    kind: str = "str"  # str, list (comma-separated), float, int, flag, append (repeatable)
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None  # the help's statement of a default computed at run time

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def help_text(self) -> str:
        if self.kind in ("flag", "append"):
            return self.help
        shown = self.default_text if self.default_text is not None else self.default
        return self.help if shown is None else f"{self.help} (default: {shown})"

    def argument_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dest": self.dest, "help": self.help_text()}
        if self.kind == "flag":
            kwargs.update(action="store_true", default=False)
            return kwargs
        if self.kind == "append":
            kwargs.update(action="append", default=[])
        else:
            kwargs["default"] = None  # "not given": the consumer applies the default, so help and run agree
            if self.kind in ("float", "int"):
                kwargs["type"] = float if self.kind == "float" else int
        if self.choices:
            kwargs["choices"] = list(self.choices)
        if self.metavar:
            kwargs["metavar"] = self.metavar
        return kwargs


def options_markdown(options: Iterable[Option]) -> str:
    """A Markdown table of ``options`` (the README's option tables are this, checked by a test)."""
    from engines.tables import render_table

    rows = []
    for option in options:
        flag = f"`{option.flag}`" if option.metavar is None else f"`{option.flag} {option.metavar}`"
        if option.kind == "flag":
            default = "off"
        elif option.kind == "append":
            default = "none (repeatable)"
        else:
            default = option.default_text if option.default_text is not None else (
                "none" if option.default is None else f"`{option.default}`"
            )
        rows.append(tuple(cell.replace("|", "\\|") for cell in (flag, default, option.help)))
    return render_table(("option", "default", "meaning"), rows, markdown=True)


def add_options(add: Callable[..., Any], options: Iterable[Option]) -> None:
    """Register ``options`` through ``add(flag, **kwargs)``: a pytest option group's ``addoption`` or argparse's ``add_argument``."""
    for option in options:
        add(option.flag, **option.argument_kwargs())


def collect(get: Callable[[str], Any], options: Iterable[Option]) -> dict[str, Any]:
    """``{dest: value}`` for ``options``, read with ``get(dest)`` (pytest's ``config.getoption``, or ``vars(args).get``)."""
    return {option.dest: get(option.dest) for option in options}


def value_or_default(values: dict[str, Any], options: Iterable[Option], dest: str) -> Any:
    """``values[dest]`` when given, else the default its Option declares (the one place a default is written)."""
    value = values.get(dest)
    if value is not None:
        return value
    return next(o.default for o in options if o.dest == dest)


def parse_list(value: str | None, *, flag: str, default: Sequence[str] | None = None) -> list[str]:
    """The one comma-list parser: None (not given) is ``default``; an empty list given is an error."""
    if value is None:
        if default is None:
            raise OptionError(f"{flag} needs a value")
        return list(default)
    items = [item.strip() for item in value.split(",")]
    items = [item for item in items if item]
    if not items:
        shown = f"leave it out for the default ({','.join(default)})" if default is not None else "give at least one"
        raise OptionError(f"{flag} is empty: give NAME[,NAME...], or {shown}")
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise OptionError(f"{flag} names {', '.join(duplicates)} more than once")
    return items


ENGINE_OPTIONS: tuple[Option, ...] = (
    Option(
        "--models",
        f"comma-separated models: {', '.join(MODEL_SPECS)}",
        kind="list",
        default_text=",".join(DEFAULT_MODELS),
    ),
    Option(
        "--precisions",
        f"comma-separated precisions: {', '.join(POLICIES)}, or {FILE_PREFIX}PATH for a policy file",
        kind="list",
        default_text=f"all built-in: {','.join(POLICIES)}",
    ),
    Option(
        "--backends",
        f"comma-separated backends: {', '.join(BACKENDS)}",
        kind="list",
        default_text=f"those of {','.join(DEFAULT_BACKENDS)} that run on --device (on a CPU machine: torch)",
    ),
    Option("--device", f"{'|'.join(DEVICE_CHOICES)} or cuda:N", default="auto"),
    Option(
        "--gpus",
        "GPU indices for pytest-xdist workers (-n auto: one worker per GPU, each pinned to its own)",
        metavar="0,1,...",
        default_text="every visible GPU",
    ),
    Option(
        "--model-path",
        "load model NAME from a local directory with safetensors weights (repeatable)",
        kind="append",
        metavar="NAME=DIR",
    ),
    Option(
        "--onnx",
        "a user's BERT- or GPT-2-style FP32 ONNX graph as model NAME (int64 input_ids/attention_mask in, one float "
        "output): its FP32 graph is the reference, the ONNX backends run it; checked at start-up (repeatable)",
        kind="append",
        metavar="NAME=PATH",
    ),
    Option(
        "--weights",
        "auto: pretrained where reachable, else random-init; pretrained: fail without; random: always random-init; "
        "stress: random-init with the published outlier structure planted (bert-base, gpt2 only; engines.stress)",
        default="auto",
        choices=WEIGHTS_MODES,
    ),
    Option(
        "--engine-cache",
        "where exported graphs and built engines are kept; a read-only folder is used as it is",
        metavar="DIR",
        default_text="$FIDELITY_ENGINE_CACHE, else ~/.cache/transformer-fidelity-suite/engines",
    ),
    Option("--rebuild-engines", "rebuild cached graphs and engines once this session", kind="flag"),
    Option(
        "--compile-mode",
        "torch.compile mode of the torch-compile backend (max-autotune: GEMM autotuning, longer cold compiles; "
        "regional: each repeated transformer block compiled once for all blocks, no freezing, the rest eager: "
        "shorter first calls per shape)",
        default="default",
        choices=("default", "max-autotune", "regional"),
    ),
    Option(
        "--trt-target",
        "compute capability TensorRT engines are built for (SM75, SM80, SM86, SM89, SM120, ...): TensorRT for RTX "
        "builds ahead of time, also without a GPU; full TensorRT builds for the local GPU only",
        default="auto",
        default_text="auto: the local GPU where the runtime runs on it, else SM80",
    ),
    Option(
        "--numerics",
        "numerics of the engines under test: "
        + "; ".join(f"{n.name}: {n.description}" for n in NUMERICS.values())
        + ". The FP32 reference always runs deterministic kernels with TF32 off",
        default=DEFAULT_NUMERICS,
        choices=tuple(NUMERICS),
    ),
    Option(
        "--perturb-weight",
        "test of the gates: the engines matching PATTERN (model/backend/precision, fnmatch) get a copy of the "
        "weights with PARAMETER multiplied by FACTOR; the reference keeps the real ones; such a run is never a "
        "baseline (repeatable)",
        kind="append",
        metavar="PATTERN=PARAMETER:FACTOR",
    ),
)


def parse_model_paths(items: list[str]) -> dict[str, Path]:
    """``--model-path NAME=DIR`` values, each checked now: folder, config, readable safetensors."""
    paths: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise OptionError(f"--model-path expects NAME=DIR, got {item!r}")
        spec = get_spec(name)
        path = Path(folder).expanduser()
        validate_model_dir(path, spec)
        paths[name] = path
    return paths


def parse_onnx_graphs(items: list[str]) -> dict[str, Any]:
    """``--onnx NAME=PATH`` values, each graph checked now (engines.graphs.user_graph.inspect_graph)."""
    from engines.graphs.user_graph import UserGraphError, inspect_graph
    from engines.models import MODEL_SPECS

    graphs: dict[str, Any] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or "/" in name:
            raise OptionError(f"--onnx expects NAME=PATH (NAME without '/'), got {item!r}")
        if name in MODEL_SPECS or name in graphs:
            raise OptionError(f"--onnx {name}: the name is taken ({'a built-in model' if name in MODEL_SPECS else 'twice'}); choose another")
        try:
            graphs[name] = inspect_graph(name, Path(path))
        except UserGraphError as exc:
            raise OptionError(str(exc)) from None
    return graphs


def _gpus(value: str | None, device: str) -> list[int]:
    from engines.workers import parse_gpus

    if not device.startswith("cuda"):
        if value:
            raise OptionError(f"--gpus {value} needs --device cuda (the device is {device})")
        return []
    import torch

    try:
        return parse_gpus(value, torch.cuda.device_count())
    except ValueError as exc:
        raise OptionError(str(exc)) from None


def check_trt_target(value: str) -> str:
    """``auto`` or a compute capability written as TensorRT names it (``SM80``); the runtime checks it offers it."""
    import re

    if value != "auto" and not re.fullmatch(r"SM\d{2,3}", value):
        raise OptionError(f"--trt-target must be auto or a compute capability such as SM80 or SM86, got {value!r}")
    return value


def check_creatable(path: Path, *, source: str, fix: str) -> Path:
    """``path`` can be created: the nearest path above it that exists is a folder this process may write to."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OptionError(f"{source} {path} cannot be created under {parent}; {fix}")
    return path


def check_cache_folder(path: Path, *, source: str = "--engine-cache") -> Path:
    """An engine cache folder: refused if it is a file or cannot be created; a read-only one is allowed."""
    if path.exists() and not path.is_dir():
        raise OptionError(
            f"{source} {path} is a file, not a folder; point --engine-cache at a folder (it is created if missing)"
        )
    if not path.exists():
        check_creatable(path, source=source, fix="point --engine-cache at a writable folder")
    return path


@dataclasses.dataclass
class EngineSelection:
    """The validated engine options: which engines to build, where, with which numerics."""

    models: list[str]
    policies: dict[str, PrecisionPolicy]  # engine precision name -> policy, in the order given
    backends: list[str]
    device: str
    model_paths: dict[str, Path]
    weights_mode: str
    engine_cache: Path | None
    rebuild_engines: bool
    compile_mode: str
    numerics: Numerics
    trt_target: str = "auto"
    onnx_graphs: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> UserGraph
    perturbations: tuple[WeightPerturbation, ...] = ()  # injected weight faults (engines.perturb)
    gpus: tuple[int, ...] = ()  # the GPUs pytest-xdist workers are pinned to (engines.workers)

    @property
    def precisions(self) -> list[str]:
        return list(self.policies)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "EngineSelection":
        """Validate every engine option up front: a typo is a usage error, not a failing test."""
        try:
            onnx_graphs = parse_onnx_graphs(values.get("onnx") or [])
            models = parse_list(values.get("models"), flag="--models", default=list(onnx_graphs) or DEFAULT_MODELS)
            for name in models:
                if name not in onnx_graphs:
                    get_spec(name)
            given = lambda dest: value_or_default(values, ENGINE_OPTIONS, dest)  # noqa: E731
            device = resolve_device(given("device"))
            only_graphs = all(name in onnx_graphs for name in models)
            backends = parse_list(
                values.get("backends"), flag="--backends", default=default_backends(device, onnx_graphs_only=only_graphs)
            )
            for name in backends:
                get_backend(name)
            policies: dict[str, PrecisionPolicy] = {}
            for spec in parse_list(values.get("precisions"), flag="--precisions", default=tuple(POLICIES)):
                policy = get_policy(spec)
                if policy.name in policies:
                    raise OptionError(
                        f"--precisions: two policies are named {policy.name!r} ({policies[policy.name].source} and "
                        f"{policy.source}); engine names must be unique"
                    )
                policies[policy.name] = policy
            cache = values.get("engine_cache")
            engine_cache = check_cache_folder(Path(cache).expanduser()) if cache else None
            if engine_cache is None:
                from engines.cache import default_cache_root

                check_cache_folder(default_cache_root(), source="$FIDELITY_ENGINE_CACHE (or the default)")
            weights_mode = given("weights")
            if weights_mode not in WEIGHTS_MODES:
                raise OptionError(f"--weights must be one of {', '.join(WEIGHTS_MODES)}, got {weights_mode!r}")
            if weights_mode == "stress":
                from engines.stress import StressError, recipe_for

                for name in models:
                    try:
                        recipe_for(name)
                    except StressError as exc:
                        raise OptionError(str(exc)) from None
                    if name in {item.partition("=")[0] for item in values.get("model_path") or []}:
                        raise OptionError(f"--weights stress plants outliers into random-init weights, but --model-path "
                                          f"gives {name} its own: drop one of them")
            return cls(
                models=models,
                policies=policies,
                backends=backends,
                device=device,
                model_paths=parse_model_paths(values.get("model_path") or []),
                weights_mode=weights_mode,
                engine_cache=engine_cache,
                rebuild_engines=bool(values.get("rebuild_engines")),
                compile_mode=given("compile_mode"),
                numerics=get_numerics(given("numerics")),
                trt_target=check_trt_target(given("trt_target")),
                onnx_graphs=onnx_graphs,
                perturbations=tuple(parse_perturbation(item) for item in values.get("perturb_weight") or []),
                gpus=tuple(_gpus(values.get("gpus"), device)),
            )
        except (PolicyError, PerturbationError) as exc:
            raise OptionError(str(exc)) from None

    def record(self) -> dict[str, Any]:
        """What reports record about the selection."""
        return {
            "models": self.models,
            "precisions": self.precisions,
            "policies": {name: p.describe() for name, p in self.policies.items() if p.source != "built-in"},
            "backends": self.backends,
            "device": self.device,
            "weights": self.weights_mode,
            "compile_mode": self.compile_mode,
            "trt_target": self.trt_target,
            "onnx_graphs": {name: {"path": str(g.path), "sha256": g.sha256} for name, g in self.onnx_graphs.items()},
            "numerics": self.numerics.name,
            "perturbations": [p.record() for p in self.perturbations],
        }
