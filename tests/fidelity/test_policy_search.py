"""The smallest FP32-keep policy: delta debugging finds a planted FP16-sensitive op, and its file runs everywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from engines.backends.torch_eager import TorchReferenceRunner, TorchRunner
from engines.batch import TokenBatch
from engines.perturb import parse_perturbation, perturbed
from engines.precision.policy import REFERENCE_POLICY, get_policy, load_policy_file, write_policy_file
from fidelity.policy_search import Keep, PolicySearch, ddmin

ROOT = Path(__file__).resolve().parents[2]
# A LayerNorm gain 100x in layer 0 (an outlier feature scale): layer 1's first LayerNorm then sees
# |x - mean| in the hundreds, whose square overflows FP16 when the reduction is computed in FP16 (fp16-strict).
PLANT = "*=encoder.layer.0.output.LayerNorm.weight:100"
SENSITIVE = Keep("layernorm", "encoder.layer.1.attention.output.LayerNorm")


def test_ddmin_returns_a_one_minimal_passing_subset():
    items = [Keep(c) for c in "abcdefgh"]
    calls = []

    def passes(subset):
        calls.append(subset)
        return {Keep("c"), Keep("f")} <= set(subset)

    assert ddmin(items, passes) == [Keep("c"), Keep("f")]
    assert len(calls) < 2 ** len(items)


def test_the_search_keeps_exactly_the_planted_fp16_sensitive_layernorm(tiny_bert, tmp_path):
    model = perturbed(tiny_bert, parse_perturbation(PLANT))  # the model itself: reference and engines alike
    reference = TorchReferenceRunner(model, REFERENCE_POLICY, "cpu").build()
    generator = torch.Generator().manual_seed(1)
    inputs = [TokenBatch(ids, torch.ones_like(ids), "seeded") for ids in
              (torch.randint(5, 200, (4, 32), generator=generator), torch.randint(5, 200, (2, 64), generator=generator))]
    start = get_policy("fp16-strict")
    result = PolicySearch(model, start, lambda p: TorchRunner(model, p, "cpu").build(), reference, inputs,
                          progress=lambda line: None).run()
    assert result.path[0].stage == "start" and not result.path[0].passed  # the plant does break fp16-strict
    assert result.keeps == [SENSITIVE]
    assert result.final.passed and result.final.nonfinite == 0
    assert result.policy.classes == start.classes and len(result.policy.overrides) == 1
    path = write_policy_file(result.policy, tmp_path / "policy.json")
    again = load_policy_file(path)
    assert again.fingerprint == result.policy.fingerprint
    assert again.dtype_of("layernorm", module=SENSITIVE.module) == "float32"
    assert again.dtype_of("layernorm", module="encoder.layer.0.output.LayerNorm") == "float16"


def test_the_command_writes_a_policy_file_that_the_fidelity_suite_runs_on_torch_and_onnx(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    found = subprocess.run([sys.executable, "-m", "fidelity.instability", "search", "--models=tiny-bert",
                            "--backends=torch", "--device=cpu", "--start=fp16", f"--out={tmp_path / 'out'}",
                            f"--engine-cache={tmp_path / 'cache'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert found.returncode == 0, found.stdout[-2000:] + found.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "search.json").read_text())
    assert record["algorithm"].startswith("delta debugging") and record["path"][0]["stage"] == "start"
    hybrid = record["path"][-1]  # the published policy, judged as the candidates were, for the comparison
    assert hybrid["stage"] == "published hybrid" and hybrid["passed"] and hybrid["min_cosine"] > 0.9999
    policy = tmp_path / "out" / "policy.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "fidelity", "fidelity",
                          "--models=tiny-bert", "--backends=torch,onnx-torch", f"--precisions=file:{policy}",
                          "--input-profile=ci", f"--engine-cache={tmp_path / 'cache'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "4 passed" in run.stdout, run.stdout[-3000:]
    bad = subprocess.run([sys.executable, "-m", "fidelity.instability", "search", "--models=tiny-bert,minilm",
                          "--backends=torch", "--device=cpu", f"--out={tmp_path / 'x'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give one model" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_values_are_usage_errors_before_any_work(tmp_path):
    base = [sys.executable, "-m", "fidelity.instability"]
    one = ["--models=tiny-bert", "--backends=torch", "--device=cpu"]
    (tmp_path / "file").write_text("x")
    cases = [
        (["search", *one, f"--out={tmp_path / 'file'}"], "is a file; give a folder"),
        (["search", *one, f"--out={tmp_path / 'o'}", "--cosine-min=2"], "give a cosine bar between 0 and 1"),
        (["search", *one, f"--out={tmp_path / 'o'}", "--margin=0"], "--margin 0.0: give 1 or more"),
        (["search", *one, f"--out={tmp_path / 'o'}", "--start=nosuch"], "--start nosuch: unknown precision 'nosuch'"),
        (["trace", *one, "--wikitext-path=/nonexistent"], "--wikitext-path /nonexistent does not exist"),
        (["trace"], "give one model (--models NAME) and one backend"),
    ]
    for args, message in cases:
        proc = subprocess.run([*base, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "o").exists()
