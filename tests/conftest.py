"""Shared fixtures for the suite's own unit tests: small real models, loaded once."""

from __future__ import annotations

import pytest

from engines.models import ModelLoader


@pytest.fixture(scope="session")
def offline_loader() -> ModelLoader:
    # random weights, hub never asked: deterministic and fast on any machine
    return ModelLoader(weights_mode="random", hub_probe=lambda: False)


@pytest.fixture(scope="session")
def tiny_bert(offline_loader):
    return offline_loader.load("tiny-bert")


@pytest.fixture(scope="session")
def tiny_gpt2(offline_loader):
    return offline_loader.load("tiny-gpt2")


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory):
    """One engine cache for the test session: each model is exported once."""
    from engines.cache import EngineCache

    return EngineCache(tmp_path_factory.mktemp("engine-cache"))
