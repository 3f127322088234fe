"""Stress weights: the planted outliers sit where the recipe says, at the calibrated size, and do what they do to FP16.

Every check runs the real bert-base / gpt2 shapes (random-init, planted) on the CPU, on seeded
inputs other than the calibration batch.
"""

from __future__ import annotations

import pytest
import torch

from engines import stress
from engines.backends.torch_eager import TorchReferenceRunner, TorchRunner
from engines.batch import TokenBatch
from engines.models import ModelLoader
from engines.options import EngineSelection, OptionError
from engines.precision.policy import REFERENCE_POLICY, get_policy
from fidelity.metrics import PUBLISHED_COSINE_MIN


@pytest.fixture(scope="module")
def stress_loader():
    return ModelLoader(weights_mode="stress")


@pytest.fixture(scope="module")
def bert_stress(stress_loader):
    return stress_loader.load("bert-base")


@pytest.fixture(scope="module")
def gpt2_stress(stress_loader):
    return stress_loader.load("gpt2")


def _sentences(seed: int, marked_ids=()) -> TokenBatch:
    """4 x 48 seeded ids; where ``marked_ids`` is given, each row carries one of them at positions 10 and 30."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2000, 30000, (4, 48), generator=generator)
    for row, token in enumerate(marked_ids):
        ids[row, 10] = ids[row, 30] = token
    return TokenBatch(ids, torch.ones_like(ids), f"seeded ids (seed {seed})")


def test_gpt2_massive_activations_sit_in_the_published_dims_of_the_first_token(gpt2_stress):
    recipe = stress.RECIPES["gpt2"]
    batch = _sentences(7)
    profile = stress.activation_profile(gpt2_stress.module, batch.input_ids, batch.attention_mask)
    assert max(e["value"] for e in profile[1]["top"]) < 10  # nothing before the writer layer
    for row in profile[2:11]:  # written by block 2, held to block 10
        top1, top2 = row["top"][:2]
        assert (top1["dim"], top1["position"], top2["dim"], top2["position"]) == (447, 0, 138, 0)
        assert top1["value"] == pytest.approx(2475, rel=0.2) and top2["value"] == pytest.approx(703, rel=0.2)
        assert row["top"][2]["value"] < 10  # and nowhere else
    assert profile[11]["top"][0]["value"] == pytest.approx(452, rel=0.35)  # mostly removed by the last block
    compared = {(c["quantity"], c["layer"]): c for c in stress.compare_with_published(recipe, profile)}
    assert compared[("top-1 |residual|", 2)]["ratio"] == pytest.approx(1, rel=0.2)
    assert compared[("top-1 |residual|", 2)]["status"] == "secondary"


def test_bert_outlier_dims_lead_every_layer_and_delimiters_carry_ffn_outliers(bert_stress):
    delimiters = [token for _, token in stress.RECIPES["bert-base"].marker_tokens]
    batch = _sentences(11, marked_ids=delimiters + [1012])
    profile = stress.activation_profile(bert_stress.module, batch.input_ids, batch.attention_mask)
    for row in profile:
        assert {e["dim"] for e in row["top"][:2]} == {308, 381}, row
    for row in profile[10:]:
        assert row["ffn_top1"] / row["ffn_median"] == pytest.approx(2000, rel=0.35)
    plain = _sentences(11)  # the same ids without delimiters: no FFN outliers
    quiet = stress.activation_profile(bert_stress.module, plain.input_ids, plain.attention_mask)
    assert all(row["ffn_top1"] / row["ffn_median"] < 50 for row in quiet)
    compared = stress.compare_with_published(stress.RECIPES["bert-base"], profile)
    assert compared[0]["planted"] == 2 and compared[0]["status"] == "paper"


def test_strict_fp16_breaks_on_delimiters_and_hybrid_holds(bert_stress):
    """The overflow mechanism at the real shape: |x| ~ 500 squared is beyond 65504 in an FP16 LayerNorm."""
    reference = TorchReferenceRunner(bert_stress, REFERENCE_POLICY, "cpu").build()
    strict = TorchRunner(bert_stress, get_policy("fp16-strict"), "cpu").build()
    hybrid = TorchRunner(bert_stress, get_policy("hybrid"), "cpu").build()
    marked, plain = _sentences(3, marked_ids=[102, 1012, 1010, 102]), _sentences(3)

    def worst(engine, batch):
        out, ref = engine.infer(batch).double(), reference.infer(batch).double()
        return float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).min())

    assert worst(strict, marked) < 0.9 < PUBLISHED_COSINE_MIN <= worst(strict, plain)
    assert worst(hybrid, marked) >= PUBLISHED_COSINE_MIN


def test_planting_is_seeded_labelled_and_leaves_the_random_init_model_alone(offline_loader):
    base = ModelLoader(weights_mode="random").load("gpt2").module
    before = base.transformer.h[2].mlp.c_fc.weight.clone()
    one, two = (stress.plant(base, stress.RECIPES["gpt2"], seed=0) for _ in range(2))
    assert torch.equal(base.transformer.h[2].mlp.c_fc.weight, before)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    other = stress.plant(base, stress.RECIPES["gpt2"], seed=1)
    assert not torch.equal(other.transformer.wpe.weight, one.transformer.wpe.weight)
    label = stress.RECIPES["gpt2"].label(0)
    assert label.startswith("stress(seed=0, v1, ") and stress.RECIPES["gpt2"].digest in label


def test_stress_is_refused_at_start_up_for_models_without_a_recipe_or_with_their_own_weights(tmp_path):
    values = {"models": "bert-base,minilm", "weights": "stress", "device": "cpu", "backends": "torch",
              "engine_cache": str(tmp_path)}
    with pytest.raises(OptionError, match="minilm has no recipe.*--weights auto"):
        EngineSelection.from_values(values)
    with pytest.raises(OptionError, match="drop one of them"):
        EngineSelection.from_values({**values, "models": "bert-base", "model_path": [f"bert-base={tmp_path}"]})


def test_a_marker_that_does_not_separate_is_refused(offline_loader):
    import dataclasses

    recipe = dataclasses.replace(stress.RECIPES["bert-base"], marker_norm=0.0)  # no marker: nothing to read
    with pytest.raises(stress.StressError, match="do not separate"):
        stress.plant(ModelLoader(weights_mode="random").load("bert-base").module, recipe)


def test_the_activations_command_puts_the_planted_statistics_beside_the_published_ones(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "fidelity.instability", "activations", "--models=gpt2",
                           "--weights=stress", "--device=cpu", f"--out={tmp_path}", f"--engine-cache={tmp_path / 'c'}"],
                          cwd=root, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = json.loads((tmp_path / "activations.json").read_text())
    assert found["weights"] == stress.RECIPES["gpt2"].label(0)
    by = {(c["quantity"], c["layer"]): c for c in found["published"]}
    assert by[("top-1 |residual|", 2)]["ratio"] == pytest.approx(1, rel=0.2)
    assert by[("top-1 |residual|", 0)]["ratio"] < 0.1  # the trained embeddings' own outliers are not planted
    assert "| quantity" in (tmp_path / "activations.md").read_text()


@pytest.mark.parametrize("name", ["bert-base", "gpt2"])
def test_the_planting_code_plants_what_the_committed_h100_results_measured(request, name):
    """The committed results name their weights by recipe digest; this ties them to the planting code as well: change
    how neurons are planted and this fails, meaning bump STRESS_VERSION (a new label, new cache keys) and rerun."""
    import json
    from pathlib import Path

    from fidelity.instability import inputs_for

    model = request.getfixturevalue("bert_stress" if name == "bert-base" else "gpt2_stress")
    committed = json.loads((Path(__file__).resolve().parents[2] / "docs" / "results" / "instability-h100"
                            / f"{name}-stress" / "activations.json").read_text())
    inputs = [b for b in inputs_for(model, wikitext_path=None, random_batches=2, shapes=((4, 128),))
              if "padded" not in b.source]
    assert [b.source for b in inputs] == [i["input"] for i in committed["inputs"]]
    for batch, then in zip(inputs, committed["inputs"]):
        now = stress.activation_profile(model.module, batch.input_ids, batch.attention_mask)
        for block_now, block_then in zip(now, then["blocks"], strict=True):
            assert [e["dim"] for e in block_now["top"][:2]] == [e["dim"] for e in block_then["top"][:2]]
            assert block_now["top"][0]["value"] == pytest.approx(block_then["top"][0]["value"], rel=1e-3)
            assert block_now["ffn_top1"] == pytest.approx(block_then["ffn_top1"], rel=1e-3)
