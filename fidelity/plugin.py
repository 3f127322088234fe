"""The pytest plugin: options, markers, profiles, fixtures and the summary.

Hooks stay thin; the state lives in :class:`fidelity.session.FidelitySession`.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator

import pytest

from engines.backends.base import BackendUnavailableError, Runner
from engines.cache import EngineCacheError
from engines.graphs.export import ExportError
from engines.env import DEVICE_CHOICES, DeviceUnavailableError
from engines.models import WEIGHTS_MODES, ModelLoadError, UnknownModelError, parse_model_paths
from engines.precision.policy import UnknownPrecisionError
from engines.backends.registry import UnknownBackendError, get_backend
from engines.backends.torch_compile import COMPILE_MODES
from fidelity.session import DEFAULT_MODELS, EngineCase, FidelityOptions, FidelitySession, OptionError
from fidelity.strategies import INPUT_PROFILES

SESSION_KEY = pytest.StashKey[FidelitySession]()

MARKERS = {
    "fidelity": "numerical fidelity against the FP32 reference (cosine, NaN/Inf)",
    "perf": "latency and memory benchmarks (pytest-benchmark)",
    "gpu": "needs a CUDA GPU; skipped on a CPU-only machine",
    "slow": "takes minutes; left out of quick runs with -m 'not slow'",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fidelity", "transformer inference fidelity suite")
    group.addoption("--models", default=None, help=f"comma-separated models (default: {','.join(DEFAULT_MODELS)})")
    group.addoption("--precisions", default=None, help="comma-separated precisions (default: all policies)")
    group.addoption("--backends", default=None, help="comma-separated backends (default: all that run on --device)")
    group.addoption("--device", default="auto", help=f"{'|'.join(DEVICE_CHOICES)} or cuda:N (default: auto)")
    group.addoption(
        "--cosine-min",
        type=float,
        default=None,
        help="per-sample cosine bar for every precision (default: the tolerance table; hybrid/fp16 0.9998)",
    )
    group.addoption(
        "--gate-precisions",
        default=None,
        help="precisions whose results fail tests when below the bar (default: fp32,hybrid)",
    )
    group.addoption("--fidelity-report", default=None, metavar="PATH", help="write the results as JSON to PATH")
    group.addoption(
        "--input-profile",
        default=None,
        choices=sorted(INPUT_PROFILES),
        help="input sizes and example counts (default: $FIDELITY_PROFILE, else 'ci' under CI, else 'dev')",
    )
    group.addoption(
        "--model-path",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="load model NAME from a local directory with safetensors weights (repeatable)",
    )
    group.addoption(
        "--weights",
        default="auto",
        choices=WEIGHTS_MODES,
        help="auto: pretrained where reachable, else random-init; pretrained: fail without; random: always random-init",
    )
    group.addoption("--wikitext-path", default=None, metavar="PATH", help="local WikiText-2 test split (parquet, json, raw)")
    group.addoption(
        "--engine-cache",
        default=None,
        metavar="DIR",
        help="where exported graphs and built engines are kept (default: $FIDELITY_ENGINE_CACHE, else the user cache dir)",
    )
    group.addoption("--rebuild-engines", action="store_true", help="rebuild cached graphs and engines once this session")
    group.addoption(
        "--compile-mode",
        default="default",
        choices=tuple(COMPILE_MODES),
        help="torch.compile mode of the torch-compile backend (max-autotune: GEMM autotuning, longer cold compiles)",
    )


def _register_hypothesis_profiles(config: pytest.Config, profile_name: str) -> None:
    from hypothesis import HealthCheck, settings

    for profile in INPUT_PROFILES.values():
        settings.register_profile(
            profile.name,
            max_examples=profile.max_examples,
            derandomize=profile.derandomize,
            deadline=None,  # engine builds and GPU warm-up make per-example time meaningless
            print_blob=True,
            database=None if profile.derandomize else settings.default.database,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
    # An explicit --hypothesis-profile wins over the input profile's.
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile(profile_name)


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    try:
        options = FidelityOptions.parse(
            models=config.getoption("--models"),
            precisions=config.getoption("--precisions"),
            backends=config.getoption("--backends"),
            device=config.getoption("--device"),
            cosine_min=config.getoption("--cosine-min"),
            gate_precisions=config.getoption("--gate-precisions"),
            report_path=config.getoption("--fidelity-report"),
            profile=config.getoption("--input-profile"),
            model_paths=parse_model_paths(config.getoption("--model-path")),
            weights_mode=config.getoption("--weights"),
            wikitext_path=config.getoption("--wikitext-path"),
            engine_cache=config.getoption("--engine-cache"),
            rebuild_engines=config.getoption("--rebuild-engines"),
            compile_mode=config.getoption("--compile-mode"),
        )
    except (
        OptionError,
        UnknownModelError,
        UnknownPrecisionError,
        UnknownBackendError,
        DeviceUnavailableError,
        ValueError,
    ) as exc:
        raise pytest.UsageError(str(exc)) from None
    _register_hypothesis_profiles(config, options.profile.name)
    command = "pytest " + " ".join(shlex.quote(a) for a in config.invocation_params.args)
    config.stash[SESSION_KEY] = FidelitySession(options, command=command)


def fidelity_session_of(config: pytest.Config) -> FidelitySession:
    return config.stash[SESSION_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" not in metafunc.fixturenames:
        return
    session = fidelity_session_of(metafunc.config)
    params = []
    for case in session.options.cases():
        marks = [] if "cpu" in get_backend(case.backend).devices else [pytest.mark.gpu]
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("engine", params, indirect=True, scope="session")


def pytest_runtest_setup(item: pytest.Item) -> None:
    session = fidelity_session_of(item.config)
    if item.get_closest_marker("gpu") and not session.device.startswith("cuda"):
        reason = "needs a CUDA GPU: run on a GPU machine with --device cuda (or auto)"
        case = getattr(getattr(item, "callspec", None), "params", {}).get("engine")
        if isinstance(case, EngineCase):
            session.report.add_skip(case.id, reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def fidelity_session(request: pytest.FixtureRequest) -> FidelitySession:
    return fidelity_session_of(request.config)


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest, fidelity_session: FidelitySession) -> Iterator[Runner]:
    """One built engine per model x backend x precision, kept for the session's tests on it."""
    case: EngineCase = request.param
    skip = failure = None
    try:
        runner = fidelity_session.build_engine(case)
    except BackendUnavailableError as exc:
        fidelity_session.report.add_skip(case.id, str(exc))
        skip = str(exc)
    except (ModelLoadError, ExportError, EngineCacheError) as exc:
        failure = str(exc)
    # Outside the except blocks: the message alone, not a chained traceback.
    if skip:
        pytest.skip(skip)
    if failure:
        pytest.fail(failure, pytrace=False)
    yield runner
    runner.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None or not (session.report.rows or session.report.skipped):
        return
    terminalreporter.write_sep("=", "fidelity summary")
    terminalreporter.write_line(session.report.table())
    if session.cache.events:
        terminalreporter.write_line(session.cache.summary())
    if session.report.path is not None:
        session.report.write()
        terminalreporter.write_line(f"fidelity report: {session.report.path}")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.finish()


def main() -> int:  # pragma: no cover - thin convenience entry point
    return pytest.main(["-m", "fidelity", *sys.argv[1:]])
