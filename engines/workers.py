"""pytest-xdist on GPU hosts: one worker per GPU, each pinned to its own device, one engine per worker.

* ``-n auto`` with ``--device cuda`` starts one worker per GPU of ``--gpus`` (default:
  every visible GPU) instead of one per CPU core (``pytest_xdist_auto_num_workers``).
* Each worker ``gwN`` runs on ``cuda:G`` with ``G`` the N-th of those GPUs (modulo their
  number): pinned by device index, so the controller's ``CUDA_VISIBLE_DEVICES`` holds for
  every worker and each row of the reports names the GPU it ran on.  ``--device cuda:K``
  (one GPU named) pins nothing: every worker runs there.
* Under ``-n`` (xdist's ``load`` distribution) the tests of one engine form one unit of
  work (:func:`engine_scope`, a scheduler of xdist's load-scope family): each engine is
  built by one worker, once, and the engines are handed out in turn by model
  (:func:`interleave_by_model`), so two workers export two models at once rather than
  one waiting on the other.  (xdist's ``loadgroup`` marks would group them, but xdist 3.8
  renames node ids to do it, which pytest 9 no longer reads: checked here.)
* ``--rebuild-engines`` rebuilds an entry once per session: the controller's start time
  travels to every worker, and an entry written after it was rebuilt by this session.
* The benchmarks (``-m perf``) build on this: each worker times its engines on its own GPU,
  never two engines at once on one device (a lock per device), and the controller merges
  their results and decides the suite aggregate; perf/workers.py says how.
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


def interleave_by_model(scopes: list[str]) -> list[str]:
    """The engines in turn by model (``a/x/1, b/x/1, c/x/1, a/x/2, ...``), each model's own order kept.

    Workers take scopes from the front: in collection order both would start on the same model and,
    at its first ONNX engine, one would wait on the lock of the other's FP32 export of that model (on
    two H200s, 22 s of a 187 s nightly run); in turn by model they export different models at once.
    Scopes that are not an engine's keep their place after the engines.
    """
    by_model: dict[str, list[str]] = {}
    others = []
    for scope in scopes:
        if "::" not in scope:  # an engine's id (engine_scope); any other test's scope is its node id
            by_model.setdefault(scope.split("/", 1)[0], []).append(scope)
        else:
            others.append(scope)
    queues = list(by_model.values())
    ordered = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
    return ordered + others


def engine_scheduler(config, log):
    """xdist's load-scope scheduling with one scope per engine, the engines in turn by model."""
    from xdist.scheduler import LoadScopeScheduling

    class EngineScheduling(LoadScopeScheduling):
        _interleaved = False

        def _split_scope(self, nodeid: str) -> str:
            return engine_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self._interleaved:  # the work queue is complete before the first unit is handed out
                self._interleaved = True
                order = interleave_by_model(list(self.workqueue))
                units = dict(self.workqueue)
                self.workqueue.clear()
                self.workqueue.update((scope, units[scope]) for scope in order)
            super()._assign_work_unit(node)

    return EngineScheduling(config, log)
