"""Non-finite rates by input source: the statistics on known counts, and a planted outlier mechanism measured for real."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines.backends.torch_eager import TorchReferenceRunner, TorchRunner
from engines.precision.policy import REFERENCE_POLICY, get_policy
from fidelity import nan_rates as nr
from fidelity.corpus import python_docs_corpus

ROOT = Path(__file__).resolve().parents[2]


def rate(source, samples, bad):
    return nr.Rate(source, samples, bad, None, 0)


def test_the_ratio_and_its_interval_on_known_counts():
    six = nr.ratio(rate("text", 100, 30), rate("random", 100, 5))
    assert six.ratio == pytest.approx(6.0) and six.low > 1 and six.verdict == "reproduced"
    assert nr.ratio(rate("text", 100, 5), rate("random", 100, 30)).verdict == "refuted"
    assert nr.ratio(rate("text", 50, 3), rate("random", 50, 2)).verdict == "undecided"  # too few to tell
    assert nr.ratio(rate("text", 48, 0), rate("random", 48, 0)).verdict == "undecided"
    ceiling = nr.ratio(rate("text", 64, 64), rate("random", 64, 64))  # every sample fails on both: no evidence
    assert ceiling.ratio == pytest.approx(1.0) and ceiling.low < 1 < ceiling.high and ceiling.verdict == "undecided"
    assert nr.ratio(rate("text", 64, 64), rate("random", 64, 2)).verdict == "reproduced"
    low, high = rate("text", 48, 0).interval()
    assert low == 0 and high == pytest.approx(0.0741, abs=1e-4)  # Wilson, 0 of 48


def test_fp16_overflows_on_planted_outlier_tokens_of_natural_text_and_hybrid_does_not(tiny_bert):
    """The published mechanism in miniature: a few frequent tokens with outlier embeddings overflow FP16."""
    corpus = python_docs_corpus()
    text = nr.text_batches(tiny_bert, corpus, samples=32, seq_len=64)
    frequent = torch.bincount(text[0].input_ids.flatten(), minlength=tiny_bert.vocab_size).argsort(descending=True)[:3]
    module = copy.deepcopy(tiny_bert.module)
    module.embeddings.word_embeddings.weight.data[frequent] *= 1e7  # beyond FP16's 65504 once embedded
    model = dataclasses.replace(tiny_bert, module=module)
    reference = TorchReferenceRunner(model, REFERENCE_POLICY, "cpu").build()
    random = nr.random_batches(model, samples=32, seq_len=64, seed=1)
    fp16 = TorchRunner(model, get_policy("fp16"), "cpu").build()
    on_text = nr.measure(fp16, text, "text", reference_nonfinite=nr.reference_samples(reference, text))
    on_random = nr.measure(fp16, random, "random", reference_nonfinite=nr.reference_samples(reference, random))
    assert on_text.nonfinite_output == 32 and on_text.nonfinite_intermediate == 32 and on_text.reference_nonfinite == 0
    assert on_random.nonfinite_output < on_text.nonfinite_output
    assert nr.ratio(on_text, on_random).verdict == "reproduced"
    hybrid = TorchRunner(model, get_policy("hybrid"), "cpu").build()  # FP32 residual stream: no overflow
    assert nr.measure(hybrid, text, "text", reference_nonfinite=0).nonfinite_output == 0


def test_the_command_reports_every_source_and_says_undecided_without_any_nan(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fidelity.instability", "nan-rates", "--models=tiny-bert",
                           "--backends=torch", "--device=cpu", "--precisions=fp16", "--samples=8", "--seq-len=32",
                           f"--out={tmp_path}", f"--engine-cache={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "nan_rates.json").read_text())
    sources = {r["source"] for r in results if "source" in r}
    assert sources == {"random", "hypothesis", "text", "stress-padding", "stress-repeat", "stress-max"}
    assert all(isinstance(r["below_bar"], int) for r in results if "source" in r)  # counted beside non-finite ones
    assert {r["bar"] for r in results if "source" in r} == {0.9998}  # fp16's own bar, as the fidelity tests hold it
    verdict = next(r for r in results if "ratio_text_over_random" in r)["ratio_text_over_random"]
    assert verdict["verdict"] == "undecided"
