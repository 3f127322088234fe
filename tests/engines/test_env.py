import pytest
import torch

from engines.env import DeviceUnavailableError, env_flag, resolve_device


@pytest.mark.parametrize("raw,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False), ("", False)])
def test_env_flag_parses_booleans(monkeypatch, raw, expected):
    monkeypatch.setenv("FIDELITY_TEST_FLAG", raw)
    assert env_flag("FIDELITY_TEST_FLAG") is expected


def test_env_flag_rejects_garbage(monkeypatch):
    monkeypatch.setenv("FIDELITY_TEST_FLAG", "maybe")
    with pytest.raises(ValueError, match="FIDELITY_TEST_FLAG='maybe' is not a boolean"):
        env_flag("FIDELITY_TEST_FLAG")


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceUnavailableError, match="--device must be one of"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_says_what_to_do():
    with pytest.raises(DeviceUnavailableError, match="Use --device cpu"):
        resolve_device("cuda")
