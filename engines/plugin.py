"""The pytest face of the engine factory, shared by the fidelity and perf plugins.

Registers the engine options (group "engines") and the ``gpu``/``slow`` markers,
validates the options at start-up (a bad value is a usage error naming the fix,
before any engine is built), parametrizes every test that asks for ``engine`` with
the selected model x backend x precision, and builds each engine once per session
through :class:`~engines.factory.EngineFactory`.  A backend that cannot run here is a
skip with its reason (and install hint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from engines.backends.base import BackendUnavailableError, Runner
from engines.backends.registry import get_backend
from engines.factory import EngineFactory, EngineSpec
from engines.options import ENGINE_OPTIONS, EngineSelection, add_options, collect, usage_errors
from engines.workers import (
    SESSION_START_KEY,
    engine_scheduler,
    pinned_device,
    session_start,
    share_cpu_threads,
    worker_id,
)

SELECTION_KEY = pytest.StashKey[EngineSelection]()
FACTORY_KEY = pytest.StashKey[EngineFactory]()

MARKERS = {
    "gpu": "needs a CUDA GPU; skipped on a CPU-only machine",
    "slow": "takes minutes; left out of quick runs with -m 'not slow'",
}
GPU_SKIP_REASON = "needs a CUDA GPU: run on a GPU machine with --device cuda (or auto)"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("engines", "engines under test (shared by the fidelity and perf suites)")
    add_options(group.addoption, ENGINE_OPTIONS)


def selection_of(config: pytest.Config) -> EngineSelection:
    """The validated engine options of this session (parsed once; a bad value is a usage error)."""
    selection = config.stash.get(SELECTION_KEY, None)
    if selection is None:
        try:
            selection = EngineSelection.from_values(collect(config.getoption, ENGINE_OPTIONS))
        except usage_errors() as exc:
            raise pytest.UsageError(str(exc)) from None
        device = pinned_device(selection.device, worker_id(config), list(selection.gpus))
        if device != selection.device:  # a pytest-xdist worker on its own GPU
            selection = dataclasses.replace(selection, device=device)
        config.stash[SELECTION_KEY] = selection
    return selection


def factory_of(config: pytest.Config) -> EngineFactory:
    """The session's engine factory, created on first use (it sets the session's numerics)."""
    factory = config.stash.get(FACTORY_KEY, None)
    if factory is None:
        factory = config.stash[FACTORY_KEY] = EngineFactory(selection_of(config), session_start=session_start(config))
        factory.apply_numerics()  # the session's numerics, before any engine exists
    return factory


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    selection = selection_of(config)  # validate now: errors at start-up, not in the first test
    if selection.perturbations:
        try:
            factory_of(config).check_perturbations()
        except usage_errors() as exc:
            raise pytest.UsageError(str(exc)) from None
    session_start(config)
    share_cpu_threads(config, selection.device)  # a pytest-xdist worker on a GPU: its share of the CPU threads


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``-n`` (xdist's load distribution): the tests of one engine go to one worker (engines.workers)."""
    if getattr(config.option, "dist", "no") == "load":
        return engine_scheduler(config, log)
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` on a GPU host: one worker per GPU (of --gpus); elsewhere xdist's own count."""
    selection = selection_of(config)
    return len(selection.gpus) if selection.device == "cuda" and selection.gpus else None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """The controller's session start goes to every worker (--rebuild-engines: once per session)."""
    node.workerinput[SESSION_START_KEY] = session_start(node.config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" not in metafunc.fixturenames:
        return
    factory = factory_of(metafunc.config)
    params = []
    for spec in factory.specs():
        backend = get_backend(spec.backend)
        # A backend that builds anywhere is built here and skips its run step with the reason where it cannot run.
        marks = [] if "cpu" in backend.devices or backend.builds_anywhere else [pytest.mark.gpu]
        params.append(pytest.param(spec, id=spec.id, marks=marks))
    metafunc.parametrize("engine", params, indirect=True, scope="session")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not selection_of(item.config).device.startswith("cuda"):
        spec = getattr(getattr(item, "callspec", None), "params", {}).get("engine")
        if isinstance(spec, EngineSpec):
            factory_of(item.config).skip(spec, GPU_SKIP_REASON)
        pytest.skip(GPU_SKIP_REASON)


@pytest.fixture(scope="session")
def engine_factory(request: pytest.FixtureRequest) -> EngineFactory:
    return factory_of(request.config)


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest, engine_factory: EngineFactory) -> Iterator[Runner]:
    """One built engine per model x backend x precision, kept for the session's tests on it."""
    from engines.cache import EngineCacheError
    from engines.graphs.export import ExportError
    from engines.models import ModelLoadError
    from engines.precision.policy import PolicyError

    spec: EngineSpec = request.param
    skip = failure = None
    try:
        runner = engine_factory.build(spec)
    except BackendUnavailableError as exc:
        skip = str(exc)
    except (ModelLoadError, ExportError, EngineCacheError, PolicyError) as exc:
        failure = f"{spec.id}: {exc}"
    # Outside the except blocks: the message alone, not a chained traceback.
    if skip:
        pytest.skip(skip)
    if failure:
        pytest.fail(failure, pytrace=False)
    yield runner
    runner.close()


@pytest.hookimpl(tryfirst=True)
def pytest_keyboard_interrupt(excinfo) -> None:
    """Keep Ctrl-C from crashing pytest's own report of it.

    On CPython 3.11, a traceback entry of the frame a signal interrupted can carry no line number
    (``tb_lineno`` None); pytest's terminal reporter then fails in ``ExceptionInfo.getrepr`` with
    ``TypeError: unsupported operand type(s) for -: 'NoneType' and 'int'`` (seen here under load, and in
    pytest-dev/pytest-xdist#1196), the run ends as a crash instead of "interrupted", and plugins after it
    never hear of the interrupt.  The traceback is cut before the first such entry, before anyone formats it.
    """
    tb = excinfo.tb
    while tb is not None and tb.tb_next is not None:
        if tb.tb_next.tb_lineno is None:
            tb.tb_next = None
            break
        tb = tb.tb_next


def pytest_unconfigure(config: pytest.Config) -> None:
    factory = config.stash.get(FACTORY_KEY, None)
    if factory is not None:
        factory.close()
