"""Injected weight faults: one parameter of one engine's copy of the weights scaled by a factor.

A test of the gates, never a result: ``--perturb-weight PATTERN=PARAMETER:FACTOR``
(``minilm/torch/hybrid=encoder.layer.1.output.dense.weight:1.05``) gives the engines
whose ``model/backend/precision`` name matches ``PATTERN`` (fnmatch) a copy of the
model with that parameter multiplied by ``FACTOR``, while the FP32 reference and
the CPU baseline keep the real weights: the engine then computes a slightly wrong
function, as a miscompiled GEMM or a bad converter would.  The weights source of
such an engine says so (``... [perturbed: PARAMETER xFACTOR]``), every report
records the option, its exported graphs are cached under their own key, and
neither the latency gate nor the upgrade gate accepts such a run as a baseline.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch

PERTURBED_MARK = " [perturbed: "


class PerturbationError(ValueError):
    """A --perturb-weight value that cannot apply (syntax, factor, or a parameter the model does not have)."""


@dataclasses.dataclass(frozen=True)
class WeightPerturbation:
    pattern: str  # fnmatch over model/backend/precision
    parameter: str  # a name in the model's state dict
    factor: float

    def matches(self, engine: str) -> bool:
        return fnmatch.fnmatchcase(engine, self.pattern)

    def describe(self) -> str:
        return f"{self.parameter} x{self.factor:g}"

    def record(self) -> str:
        return f"{self.pattern}={self.parameter}:{self.factor:g}"


def parse_perturbation(item: str) -> WeightPerturbation:
    pattern, sep, rest = item.partition("=")
    parameter, sep2, factor_text = rest.rpartition(":")
    try:
        factor = float(factor_text)
    except ValueError:
        factor = None
    if not (sep and sep2 and pattern and parameter) or factor is None or not factor > 0 or factor == 1:
        raise PerturbationError(
            f"--perturb-weight expects PATTERN=PARAMETER:FACTOR with a factor > 0 other than 1 (for example "
            f"minilm/torch/hybrid=encoder.layer.1.output.dense.weight:1.05), got {item!r}"
        )
    return WeightPerturbation(pattern, parameter, factor)


def check_parameter(model, perturbation: WeightPerturbation) -> None:
    """``perturbation`` names a parameter of ``model`` (engines.models.LoadedModel); PerturbationError otherwise."""
    if model.module is None:
        raise PerturbationError(f"--perturb-weight {perturbation.record()}: {model.name} is an ONNX graph, not a module")
    names = dict(model.module.named_parameters())
    if perturbation.parameter not in names:
        close = difflib.get_close_matches(perturbation.parameter, list(names), n=3)
        raise PerturbationError(
            f"--perturb-weight {perturbation.record()}: {model.name} has no parameter {perturbation.parameter!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )


def perturbed(model, perturbation: WeightPerturbation):
    """A copy of ``model`` (engines.models.LoadedModel) whose ``parameter`` is scaled; the original is untouched."""
    check_parameter(model, perturbation)
    module = copy.deepcopy(model.module)
    dict(module.named_parameters())[perturbation.parameter].data.mul_(perturbation.factor)
    return dataclasses.replace(
        model, module=module, weights_source=f"{model.weights_source}{PERTURBED_MARK}{perturbation.describe()}]"
    )
