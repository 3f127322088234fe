"""The fidelity plugin: its options and markers, Hypothesis profiles, the session fixture and the summary.

Hooks stay thin; the state lives in :class:`fidelity.session.FidelitySession`.
Engines (options, fixture, factory) come from :mod:`engines.plugin`.
"""

from __future__ import annotations

import shlex

import pytest

from engines.options import add_options, collect, usage_errors
from engines.plugin import factory_of, selection_of
from fidelity.corpus import CorpusError
from fidelity.options import FIDELITY_OPTIONS, FidelityOptions
from fidelity.session import FidelitySession
from fidelity.strategies import INPUT_PROFILES

SESSION_KEY = pytest.StashKey[FidelitySession]()
MARKERS = {"fidelity": "numerical fidelity against the FP32 reference (cosine, NaN/Inf)"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fidelity", "numerical fidelity against the FP32 reference")
    add_options(group.addoption, FIDELITY_OPTIONS)


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
    selection = selection_of(config)
    try:
        options = FidelityOptions.from_values(collect(config.getoption, FIDELITY_OPTIONS), selection)
        command = "pytest " + " ".join(shlex.quote(a) for a in config.invocation_params.args)
        session = FidelitySession(options, factory_of(config), command=command)
    except (*usage_errors(), CorpusError) as exc:
        raise pytest.UsageError(str(exc)) from None
    _register_hypothesis_profiles(config, options.profile.name)
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker is not None:  # a pytest-xdist worker: its rows go to its own shard, the controller merges them
        session.report.path = session.report.shard_path(worker)
    else:
        for stale in session.report.shards():  # a previous run's leftovers are not this run's rows
            stale.unlink(missing_ok=True)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(InterruptWatch(session), "fidelity-interrupt-watch")


class InterruptWatch:
    """Marks the report interrupted the moment Ctrl-C arrives, before any other plugin reports it."""

    def __init__(self, session: FidelitySession) -> None:
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_keyboard_interrupt(self, excinfo) -> None:
        self.session.report.mark_interrupted()


@pytest.fixture(scope="session")
def fidelity_session(request: pytest.FixtureRequest) -> FidelitySession:
    return request.config.stash[SESSION_KEY]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Rows a test adds to are complete only when it finishes; Ctrl-C leaves them marked partial."""
    session = item.config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.report.begin_item()
    result = yield
    if session is not None:
        session.report.end_item()
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Runs before the terminal summary: a run stopped otherwise (collection errors, -x) is marked too."""
    fidelity = session.config.stash.get(SESSION_KEY, None)
    if fidelity is not None and exitstatus == pytest.ExitCode.INTERRUPTED and not fidelity.report.interrupted:
        fidelity.report.mark_interrupted()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.report.absorb_shards()  # pytest-xdist: what the workers measured
    if session is None or not (session.report.all_rows() or session.report.skipped):
        return
    terminalreporter.write_sep("=", "fidelity summary")
    terminalreporter.write_line(session.report.table())
    merged = session.report.cache_summary()  # pytest-xdist: every worker's cache events
    if merged or session.factory.cache.events:
        terminalreporter.write_line(merged or session.factory.cache.summary())
    if session.report.path is not None:
        session.finish()
        terminalreporter.write_line(f"fidelity report: {session.report.path}")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        merged = session.report.absorb_shards()
        session.finish()
        if merged:  # pytest-xdist: the workers' last snapshots, written into the report, then dropped
            session.report.write()
            session.report.absorb_shards(remove=True)
