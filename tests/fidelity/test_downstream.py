"""Downstream agreement: the SST-2 loader on files in its schema, and agreement measured on real engines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.backends.torch_eager import TorchReferenceRunner, TorchRunner
from engines.perturb import parse_perturbation, perturbed
from engines.precision.policy import REFERENCE_POLICY, get_policy
from fidelity import downstream as ds

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_sample_is_in_sst2s_schema_and_loads():
    sentences = ds.load_sst2_file(ds.SAMPLE_SST2)
    assert len(sentences.texts) == 24 and sorted(set(sentences.labels)) == [0, 1]
    assert sentences.labels.count(1) == 12


def test_a_parquet_in_sst2s_schema_loads_and_bad_files_name_the_problem(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence": ["good .", "bad ."], "label": [1, 0], "idx": [0, 1]}), tmp_path / "v.parquet")
    assert ds.load_sst2_file(tmp_path / "v.parquet").labels == [1, 0]
    (tmp_path / "no-header.tsv").write_text("good .\t1\n")
    (tmp_path / "three.tsv").write_text("sentence\tlabel\nfine .\t2\n")
    for name, message in (("no-header.tsv", "the header must name sentence and label"),
                          ("three.tsv", "labels must be 0 or 1"), ("missing.tsv", "does not exist")):
        with pytest.raises(ds.DownstreamDataError, match=message):
            ds.load_sst2_file(tmp_path / name)


@pytest.fixture(scope="module")
def sentences():
    return ds.load_sst2_file(ds.SAMPLE_SST2)


def test_fp32_agrees_with_itself_and_a_perturbed_engine_does_not(tiny_bert, sentences):
    batch = ds.encode(tiny_bert, sentences.texts)
    reference = TorchReferenceRunner(tiny_bert, REFERENCE_POLICY, "cpu").build().infer(batch)
    same = ds.agreement(TorchRunner(tiny_bert, get_policy("fp32"), "cpu").build(), reference, batch, causal=False)
    assert same.label_agreement == 1.0 and same.nearest_neighbour_agreement == 1.0
    assert same.similarity_spearman == pytest.approx(1.0, abs=1e-9)
    broken = perturbed(tiny_bert, parse_perturbation("*=encoder.layer.1.output.dense.weight:40"))
    off = ds.agreement(TorchRunner(broken, get_policy("fp32"), "cpu").build(), reference, batch, causal=False)
    assert off.similarity_spearman < 0.99 and min(off.label_agreement, off.nearest_neighbour_agreement) < 1.0


def test_next_token_agreement_and_kl_for_a_causal_model(tiny_gpt2, sentences):
    batch = ds.encode(tiny_gpt2, sentences.texts)
    reference = TorchReferenceRunner(tiny_gpt2, REFERENCE_POLICY, "cpu").build().infer(batch)
    same = ds.agreement(TorchRunner(tiny_gpt2, get_policy("fp32"), "cpu").build(), reference, batch, causal=True)
    assert same.next_token_agreement == 1.0 and same.mean_kl == pytest.approx(0.0, abs=1e-9)
    bf16 = ds.agreement(TorchRunner(tiny_gpt2, get_policy("bf16"), "cpu").build(), reference, batch, causal=True)
    assert bf16.mean_kl > same.mean_kl and bf16.nearest_neighbour_agreement is None


def test_the_command_writes_the_agreement_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fidelity.instability", "downstream", "--models=tiny-bert",
                           "--backends=torch", "--device=cpu", "--precisions=fp16", f"--out={tmp_path}",
                           f"--engine-cache={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((tmp_path / "downstream.json").read_text())
    assert record["agreement"][0]["engine"] == "tiny-bert/torch/fp16" and "sample shipped here" in record["note"]


def _fine_tuned_classifier(tiny_bert, sentences, folder: Path) -> Path:
    """A real, if tiny, fine-tuned SST-2 classifier: tiny-bert's encoder and a fresh head trained on the sentences."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert.module.config.__class__(**{
        **tiny_bert.module.config.to_dict(), "num_labels": 2}))
    model.bert.load_state_dict(tiny_bert.module.state_dict(), strict=False)
    batch = ds.encode(tiny_bert, sentences.texts)
    labels = torch.tensor(sentences.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def test_accuracy_with_a_fine_tuned_classifier_is_what_its_own_forward_gives(tiny_bert, sentences, tmp_path):
    import torch
    from transformers import BertForSequenceClassification

    from engines.models import ModelLoader

    folder = _fine_tuned_classifier(tiny_bert, sentences, tmp_path / "clf")
    model = ModelLoader(model_paths={"tiny-bert": folder}).load("tiny-bert")  # the fine-tuned encoder
    head = ds.ClassifierHead.load(folder)
    batch = ds.encode(model, sentences.texts)
    reference = TorchReferenceRunner(model, REFERENCE_POLICY, "cpu").build().infer(batch)
    with torch.no_grad():
        logits = BertForSequenceClassification.from_pretrained(folder).eval()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = float((logits.argmax(1) == torch.tensor(sentences.labels)).double().mean())
    assert head.accuracy(reference, sentences.labels) == expected > 0.5  # trained, and scored as HF scores it
    fp16 = TorchRunner(model, get_policy("fp16"), "cpu").build()
    assert head.accuracy(fp16.infer(batch), sentences.labels) == pytest.approx(expected, abs=1 / 24)
    with pytest.raises(ds.DownstreamDataError, match="BertForSequenceClassification"):
        ds.ClassifierHead.load(ROOT / "fidelity" / "data")  # no head there


def test_perplexity_is_the_exponent_of_the_language_model_loss(tiny_gpt2):
    import torch

    from fidelity.corpus import load_corpus, packed_batch

    batch = packed_batch(load_corpus(None)[0], tiny_gpt2, batch=2, seq_len=64)
    logits = TorchReferenceRunner(tiny_gpt2, REFERENCE_POLICY, "cpu").build().infer(batch)
    with torch.no_grad():
        loss = tiny_gpt2.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                labels=batch.input_ids).loss
    assert ds.perplexity(logits, batch) == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_the_command_reports_accuracy_with_a_classifier_and_says_why_not_without(tiny_bert, sentences, tmp_path):
    folder = _fine_tuned_classifier(tiny_bert, sentences, tmp_path / "clf")
    base = [sys.executable, "-m", "fidelity.instability", "downstream", "--models=tiny-bert", "--backends=torch",
            "--device=cpu", "--precisions=fp16", f"--engine-cache={tmp_path / 'c'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([*base, f"--model-path=tiny-bert={folder}", "--classifier", f"--out={tmp_path / 'o'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads((tmp_path / "o" / "downstream.json").read_text())
    assert found["fp32"]["accuracy"] > 0.5 and found["agreement"][0]["accuracy"] is not None
    bad = subprocess.run([*base, "--classifier"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--model-path tiny-bert=DIR" in bad.stderr and "Traceback" not in bad.stderr
