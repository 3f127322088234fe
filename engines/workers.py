"""pytest-xdist on GPU hosts: one worker per GPU, each pinned to its own device, one engine per worker.

* ``-n auto`` with ``--device cuda`` starts one worker per GPU of ``--gpus`` (default:
  every visible GPU) instead of one per CPU core (``pytest_xdist_auto_num_workers``).
* Each worker ``gwN`` runs on ``cuda:G`` with ``G`` the N-th of those GPUs (modulo their
  number): pinned by device index, so the controller's ``CUDA_VISIBLE_DEVICES`` holds for
  every worker and each row of the reports names the GPU it ran on.  ``--device cuda:K``
  (one GPU named) pins nothing: every worker runs there.
* Under ``-n`` (xdist's ``load`` distribution) the tests of one engine form one unit of
  work (:func:`engine_scope`, a scheduler of xdist's load-scope family): each engine is
  built by one worker, once.  (xdist's ``loadgroup`` marks would do it, but xdist 3.8
  renames node ids to group them, which pytest 9 no longer reads: checked here.)
* ``--rebuild-engines`` rebuilds an entry once per session: the controller's start time
  travels to every worker, and an entry written after it was rebuilt by this session.
"""

from __future__ import annotations

import re
import time

import pytest

SESSION_START_KEY = "fidelity_session_start"
# The parameter of a test on one engine: "[model/backend/precision]", or with the benchmarks' shape in front.
_ENGINE_PARAM = re.compile(r"\[(?:b\d+s\d+-)?([^\[\]/]+/[^\[\]/]+/[^\[\]]+)\]$")
_START_KEY = pytest.StashKey[float]()


def worker_id(config) -> str | None:
    """``gw0``, ``gw1``... on a pytest-xdist worker; None on the controller or without xdist."""
    return getattr(config, "workerinput", {}).get("workerid")


def session_start(config) -> float:
    """When this session began: the controller's clock, also on its workers."""
    started = getattr(config, "workerinput", {}).get(SESSION_START_KEY)
    if started is None:
        started = config.stash.setdefault(_START_KEY, time.time())
    return float(started)


def parse_gpus(value: str | None, count: int) -> list[int]:
    """``--gpus 0,2`` as indices, each checked against the ``count`` GPUs visible; None: all of them."""
    if not value:
        return list(range(count))
    try:
        gpus = [int(item) for item in value.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--gpus expects comma-separated GPU indices such as 0,1, got {value!r}") from None
    bad = [g for g in gpus if not 0 <= g < count]
    if not gpus or bad or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {value}: {count} GPU(s) are visible (indices 0-{count - 1}), each index once")
    return gpus


def pinned_device(device: str, worker: str | None, gpus: list[int]) -> str:
    """The device of a worker: ``cuda`` becomes ``cuda:G`` for its GPU; anything else stays as given."""
    if worker is None or device != "cuda" or not gpus:
        return device
    return f"cuda:{gpus[int(worker.removeprefix('gw')) % len(gpus)]}"


def engine_scope(nodeid: str) -> str:
    """The unit of work a test belongs to: its engine's id, or (not an engine test) the test itself."""
    match = _ENGINE_PARAM.search(nodeid)
    return match.group(1) if match else nodeid


def engine_scheduler(config, log):
    """xdist's load-scope scheduling with one scope per engine."""
    from xdist.scheduler import LoadScopeScheduling

    class EngineScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return engine_scope(nodeid)

    return EngineScheduling(config, log)
