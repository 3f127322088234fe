"""The engine factory: every backend built the same way, what was built and skipped recorded for the reports."""

import pytest

from engines.backends.base import BackendUnavailableError
from engines.factory import EngineFactory, EngineSpec
from engines.options import EngineSelection


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    selection = EngineSelection.from_values({
        "models": "tiny-bert", "precisions": "fp32,hybrid", "backends": "torch,torch-cudagraph",
        "weights": "random", "engine_cache": str(tmp_path_factory.mktemp("cache")), "device": "cpu",
    })
    made = EngineFactory(selection)
    yield made
    made.close()


def test_specs_are_the_selection_product_and_name_engines_once(factory):
    assert [s.id for s in factory.specs()] == [
        "tiny-bert/torch/fp32", "tiny-bert/torch/hybrid", "tiny-bert/torch-cudagraph/fp32",
        "tiny-bert/torch-cudagraph/hybrid",
    ]


def test_a_built_engine_is_recorded_with_its_runtime_policy_and_audit(factory):
    runner = factory.build(EngineSpec("tiny-bert", "torch", "hybrid"))
    record = factory.built["tiny-bert/torch/hybrid"]
    assert record["backend"] == "torch" and record["runtime"].startswith("torch ")
    assert record["policy"]["classes"]["matmul"] == "float16" and record["audit"]["problems"] == []
    assert record["build_seconds"] >= 0
    runner.close()


def test_a_backend_that_cannot_run_here_is_a_recorded_skip(factory):
    with pytest.raises(BackendUnavailableError, match="runs on cuda, not cpu"):
        factory.build(EngineSpec("tiny-bert", "torch-cudagraph", "fp32"))
    assert "runs on cuda, not cpu" in factory.skipped["tiny-bert/torch-cudagraph/fp32"]


def test_the_cpu_baseline_engine_is_built_on_the_cpu_whatever_the_session_device(factory):
    runner = factory.build(EngineSpec("tiny-bert", "torch", "fp32"), device="cpu")
    assert runner.device.type == "cpu"
    reference = factory.reference("tiny-bert")
    assert reference is factory.reference("tiny-bert")  # built once
    assert factory.built["tiny-bert/torch-reference/fp32"]["mode"].endswith("deterministic kernels")
