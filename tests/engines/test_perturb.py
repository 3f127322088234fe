"""Injected weight faults: the engine's copy only, named in its weights source, cached apart, refused as a baseline."""

import json

import pytest
import torch

from engines.factory import EngineFactory, EngineSpec
from engines.graphs.export import export_key
from engines.options import EngineSelection, OptionError
from engines.perturb import PerturbationError, parse_perturbation, perturbed

PARAMETER = "encoder.layer.0.output.dense.weight"


@pytest.mark.parametrize("item", ["tiny-bert/torch/hybrid", "x=p", "x=p:abc", "x=p:1", "x=p:-2", "=p:2"])
def test_malformed_values_are_usage_errors(item):
    with pytest.raises(OptionError, match="PATTERN=PARAMETER:FACTOR"):
        EngineSelection.from_values({"models": "tiny-bert", "perturb_weight": [item], "device": "cpu"})


def test_an_unknown_parameter_names_the_close_ones(tiny_bert):
    with pytest.raises(PerturbationError, match="did you mean encoder.layer.0.output.dense.weight"):
        perturbed(tiny_bert, parse_perturbation("*=encoder.layer.0.output.dense.weigth:1.1"))


def test_only_the_matching_engine_computes_with_the_perturbed_weights(tmp_path):
    selection = EngineSelection.from_values({
        "models": "tiny-bert", "backends": "torch", "precisions": "fp32,hybrid", "device": "cpu",
        "engine_cache": str(tmp_path), "perturb_weight": [f"tiny-bert/torch/fp32={PARAMETER}:1.5"],
    })
    factory = EngineFactory(selection)
    hit, miss = factory.build(EngineSpec("tiny-bert", "torch", "fp32")), factory.build(EngineSpec("tiny-bert", "torch", "hybrid"))
    reference = factory.reference("tiny-bert")
    ids = torch.randint(5, 200, (2, 16))
    from engines.batch import TokenBatch

    batch = TokenBatch(ids, torch.ones_like(ids), "random")
    ref = reference.infer(batch)
    assert not torch.allclose(hit.infer(batch), ref, atol=1e-3)  # the perturbed engine is off
    assert torch.allclose(miss.infer(batch), ref, atol=5e-2)  # the other engine and the reference are not
    original = dict(factory.model("tiny-bert").module.named_parameters())[PARAMETER]
    assert torch.equal(original, dict(reference.model.module.named_parameters())[PARAMETER])
    assert hit.model.weights_source.endswith(f"[perturbed: {PARAMETER} x1.5]")
    assert export_key(hit.model)["weights"] != export_key(factory.model("tiny-bert"))["weights"]
    assert selection.record()["perturbations"] == [f"tiny-bert/torch/fp32={PARAMETER}:1.5"]
    factory.close()


def test_a_perf_run_with_perturbed_weights_is_never_a_baseline(tmp_path):
    from perf.baselines import Baseline, BaselineMismatchError

    run = {"machine_info": {"fidelity_suite": {"machine_id": "cpu-x"}}, "benchmarks": [],
           "fidelity_suite_options": {"engines": {"perturbations": ["*=p:2"]}}}
    path = tmp_path / "0001_x.json"
    path.write_text(json.dumps(run))
    with pytest.raises(BaselineMismatchError, match="injected weight faults"):
        Baseline(path)
