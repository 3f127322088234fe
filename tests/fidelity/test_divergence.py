"""First divergence on real engines with planted faults: the trace names the block where they were planted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines.backends.torch_eager import TorchReferenceRunner, TorchRunner
from engines.batch import TokenBatch
from engines.perturb import parse_perturbation, perturbed
from engines.precision.policy import REFERENCE_POLICY, get_policy
from fidelity.divergence import trace

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference(tiny_bert):
    return TorchReferenceRunner(tiny_bert, REFERENCE_POLICY, "cpu").build()


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(5, 200, (3, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return TokenBatch(ids, mask, "seeded random ids")


def engine_with(model, fault: str, precision: str):
    return TorchRunner(perturbed(model, parse_perturbation(f"*={fault}")), get_policy(precision), "cpu").build()


def test_an_fp16_overflow_planted_in_one_layer_is_localized_to_that_block(tiny_bert, reference, batch):
    engine = engine_with(tiny_bert, "encoder.layer.1.output.dense.weight:1e6", "fp16")
    found = trace(engine, reference, batch, bar=0.9998)
    assert found.first_nonfinite.name == "encoder.layer.1.output"
    assert all(b.nonfinite == 0 for b in found.blocks[: found.blocks.index(found.first_nonfinite)])
    assert "first non-finite block: encoder.layer.1.output" in found.compact()


def test_a_subtle_error_is_found_where_the_cosine_first_drops(tiny_bert, reference, batch):
    engine = engine_with(tiny_bert, "encoder.layer.0.intermediate.dense.weight:1.2", "fp32")
    found = trace(engine, reference, batch, bar=0.99999)
    assert found.first_nonfinite is None and found.first_below_bar.name == "encoder.layer.0.intermediate"
    healthy = trace(TorchRunner(tiny_bert, get_policy("fp32"), "cpu").build(), reference, batch, bar=0.99999)
    assert healthy.first_below_bar is None and not healthy.missing
    assert [b.name for b in healthy.blocks][:3] == ["embeddings", "encoder.layer.0.attention.probs",
                                                    "encoder.layer.0.attention"]


def test_attention_probabilities_are_compared_over_valid_queries_and_keys(tiny_bert, reference, batch):
    fp16 = trace(TorchRunner(tiny_bert, get_policy("fp16"), "cpu").build(), reference, batch, bar=0.9998)
    probs = [b for b in fp16.blocks if b.name.endswith(".probs")]
    assert [b.name for b in probs] == ["encoder.layer.0.attention.probs", "encoder.layer.1.attention.probs"]
    assert all(b.min_cosine > 0.9999 and b.nonfinite == 0 for b in probs)  # padding (row 2) masked on both axes
    query = engine_with(tiny_bert, "encoder.layer.1.attention.self.query.weight:3", "fp32")
    found = trace(query, reference, batch, bar=0.99999)
    assert found.first_below_bar.name == "encoder.layer.1.attention.probs"  # before the attention's output


def test_a_backend_without_block_outputs_gives_no_trace(tiny_bert, reference, batch, engine_cache):
    from engines.backends.base import BuildOptions
    from engines.backends.onnxrt import OnnxRuntimeRunner

    engine = OnnxRuntimeRunner(tiny_bert, get_policy("fp32"), "cpu", BuildOptions(cache=engine_cache)).build()
    assert trace(engine, reference, batch, bar=0.9998) is None


def test_a_failing_fidelity_test_prints_the_trace_beside_its_replay(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "fidelity", "fidelity", "-k", "natural_text",
         "--models=tiny-bert", "--backends=torch", "--precisions=hybrid", "--input-profile=ci",
         f"--engine-cache={tmp_path}", "--perturb-weight=tiny-bert/torch/hybrid=encoder.layer.1.output.dense.weight:1e6"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 1, proc.stdout[-3000:]
    failure = proc.stdout.split("Divergence:", 1)[1]
    assert "first non-finite block: encoder.layer.1.output" in failure.split("Replay:", 1)[0]
    assert "Replay: TokenBatch(" in failure


def test_the_trace_command_writes_every_block_and_refuses_backends_without_them(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "fidelity.instability", "trace", "--models=tiny-bert", "--precisions=fp16",
            "--device=cpu", f"--engine-cache={tmp_path / 'cache'}"]
    proc = subprocess.run([*base, "--backends=torch", f"--out={tmp_path / 'out'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    traces = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert traces and all(t["engine"] == "tiny-bert/torch/fp16" and t["first_below_bar"] is None for t in traces)
    assert [b["block"] for b in traces[0]["blocks"]][:3] == ["embeddings", "encoder.layer.0.attention.probs",
                                                             "encoder.layer.0.attention"]
    refused = subprocess.run([*base, "--backends=onnxrt"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "exposes no block outputs" in refused.stderr
