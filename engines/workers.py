"""pytest-xdist on GPU hosts: one worker per GPU, each pinned to its own device, one engine per worker.

* ``-n auto`` with ``--device cuda`` starts one worker per GPU of ``--gpus`` (default:
  every visible GPU) instead of one per CPU core (``pytest_xdist_auto_num_workers``).
* Each worker ``gwN`` runs on ``cuda:G`` with ``G`` the N-th of those GPUs (modulo their
  number): pinned by device index, so the controller's ``CUDA_VISIBLE_DEVICES`` holds for
  every worker and each row of the reports names the GPU it ran on.  ``--device cuda:K``
  (one GPU named) pins nothing: every worker runs there.
* Under ``-n`` (xdist's ``load`` distribution) the tests of one engine form one unit of
  work (:func:`engine_scope`, a scheduler of xdist's load-scope family): each engine is
  built by one worker, once, and handed out in :func:`work_order`: the engines whose
  build exports or compiles first, so no worker is left exporting at the end while the
  other idles, each group in turn by model, so two workers export two models at once;
  a worker then keeps to the models it holds while it has work (:func:`next_unit`), so
  each model is loaded, and its export awaited, by as few workers as the balance
  allows.  What each order did on two GPUs: docs/results/xdist-h100x2/README.md.
  (xdist's ``loadgroup`` marks would group them, but xdist 3.8 renames node ids to do
  it, which pytest 9 no longer reads: checked here.)
* With the engines on GPUs, each worker gets its share of the CPU: torch's intra-op threads (and
  onnxruntime's, through :func:`onnxruntime_session_options`) are cut to ``threads // workers``
  (:func:`share_cpu_threads`; ``OMP_NUM_THREADS``, when set, is taken as the share instead).  Workers
  that each start one thread per core spin against each other while they build and export on the CPU
  (on the 2-core CPU machine, ``pytest -n 2 -m fidelity fidelity --models tiny-bert,tiny-gpt2 --backends
  torch --precisions fp32,hybrid,fp16,bf16`` took 28.1 s with two threads a worker, 14.3 s with
  ``OMP_NUM_THREADS=1``).  Engines that compute on the CPU keep the machine's threads: the thread count
  changes how a CPU reduction is split, and with it the last bits of their outputs (a test saw
  tiny-bert/onnxrt/fp32's mean cosine move in the 15th digit), and a run under ``-n`` must give one
  process's numbers.  The CPU FP32 baseline (perf, under the CPU's lock) is such an engine: it is built
  and timed with the machine's threads (:func:`all_cpu_threads`), as in one process.
* ``--rebuild-engines`` rebuilds an entry once per session: the controller's start time
  travels to every worker, and an entry written after it was rebuilt by this session.
* The benchmarks (``-m perf``) build on this: each worker times its engines on its own GPU,
  never two engines at once on one device (a lock per device), and the controller merges
  their results and decides the suite aggregate; perf/workers.py says how.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator

import pytest

from engines.backends.base import split_engine_name

SESSION_START_KEY = "fidelity_session_start"
# The parameter of a test on one engine: "[model/backend/precision]", or with the benchmarks' shape in front.
_ENGINE_PARAM = re.compile(r"\[(?:b\d+s\d+-)?([^\[\]/]+/[^\[\]/]+/[^\[\]]+)\]$")
_START_KEY = pytest.StashKey[float]()
# torch's intra-op thread count before this worker took its share (None: no share taken, one process).
_threads_before_share: int | None = None


def worker_id(config) -> str | None:
    """``gw0``, ``gw1``... on a pytest-xdist worker; None on the controller or without xdist."""
    return getattr(config, "workerinput", {}).get("workerid")


def session_start(config) -> float:
    """When this session began: the controller's clock, also on its workers."""
    started = getattr(config, "workerinput", {}).get(SESSION_START_KEY)
    if started is None:
        started = config.stash.setdefault(_START_KEY, time.time())
    return float(started)


def thread_share(threads: int, workers: int) -> int:
    """A worker's share of ``threads`` CPU threads among ``workers`` workers (at least one)."""
    return max(1, threads // max(1, workers))


def share_cpu_threads(config, device: str) -> int | None:
    """On a pytest-xdist worker whose engines run on ``device`` (a GPU), cut torch's intra-op threads to its share.

    Returns the share (``OMP_NUM_THREADS``, when set: the user's choice, left as it is); None on the
    controller, in one process, and when the engines compute on the CPU (the thread count is part of
    their numerics).
    """
    global _threads_before_share
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or not device.startswith("cuda"):
        return None
    import torch

    if _threads_before_share is None:
        _threads_before_share = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(thread_share(_threads_before_share, int(workerinput.get("workercount") or 1)))
    return torch.get_num_threads()


def onnxruntime_session_options(ort, *, cpu_engine: bool = False):
    """An onnxruntime ``SessionOptions``, quiet; on a worker that took its share, with that many threads.

    ``cpu_engine``: the session is an engine computing on the CPU (its threads are part of its numerics),
    which keeps onnxruntime's default (every core), as in one process.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if _threads_before_share is not None and not cpu_engine:
        import torch

        options.intra_op_num_threads = torch.get_num_threads()
    return options


@contextlib.contextmanager
def all_cpu_threads() -> Iterator[None]:
    """torch with the threads it had before the worker's share, for the duration (as in one process)."""
    if _threads_before_share is None:
        yield
        return
    import torch

    share = torch.get_num_threads()
    torch.set_num_threads(_threads_before_share)
    try:
        yield
    finally:
        torch.set_num_threads(share)


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


def interleave_by_model(engines: list[str]) -> list[str]:
    """Engine ids in turn by model (``a/x/1, b/x/1, c/x/1, a/x/2, ...``), each model's own order kept."""
    by_model: dict[str, list[str]] = {}
    for engine in engines:
        by_model.setdefault(_model(engine), []).append(engine)
    queues = list(by_model.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


def _is_engine(scope: str) -> bool:
    """Whether a unit of work is an engine's (:func:`engine_scope`: its id); any other test's is its node id."""
    return "::" not in scope


def _model(engine: str) -> str:
    return split_engine_name(engine)[0]


def _slow_build(engine: str) -> bool:
    from engines.backends.registry import BACKENDS

    info = BACKENDS.get(split_engine_name(engine)[1])
    return bool(info and info.slow_build)


def work_order(scopes: list[str]) -> list[str]:
    """The order workers take units of work in: slow builds first, each group in turn by model, then other tests.

    Workers take scopes from the front.  In collection order (each model's torch engines, then its ONNX ones)
    both would start on one model and, at its first ONNX engine, one would wait on the other's FP32 export;
    in turn by model they export two models at once; with the exports last, the run ended on them, one
    worker waiting on the other's.  Engines whose backend builds slowly (``BackendInfo.slow_build``:
    exports, compiles) therefore go first.  Each model's engines keep the queue's order: collection order
    (xdist's ``--loadscope-reorder`` sorts by tests per unit, equal for every engine today), which puts a
    model's FP32 engine, the one that makes its export, first.  Scopes that are not an engine's come last.
    """
    engines = [scope for scope in scopes if _is_engine(scope)]
    others = [scope for scope in scopes if not _is_engine(scope)]
    slow = [engine for engine in engines if _slow_build(engine)]
    quick = [engine for engine in engines if not _slow_build(engine)]
    return interleave_by_model(slow) + interleave_by_model(quick) + others


def next_unit(queue: list[str], held: set[str], held_elsewhere: set[str]) -> str:
    """The unit of work a worker takes next from ``queue`` (in :func:`work_order`).

    The first, unless its model is already held by another worker and not by this one (``held``: the models
    of the engines it was given): then the first unit of the same kind (a slow build or not, as the first)
    of a model this worker holds, if any.  A model held by no worker yet goes to whoever asks, so the
    exports start at once; after that each worker keeps to its models while it has work of the kind at
    hand, and takes another's only when its own run out.  Each model is then loaded, its FP32 reference
    built and its export awaited by as few workers as the balance allows.
    """
    head = queue[0]
    if not _is_engine(head) or _model(head) in held or _model(head) not in held_elsewhere:
        return head
    slow = _slow_build(head)
    return next((scope for scope in queue
                 if _is_engine(scope) and _model(scope) in held and _slow_build(scope) == slow), head)


def engine_scheduler(config, log):
    """xdist's load-scope scheduling with one scope per engine, in :func:`work_order`, picked by :func:`next_unit`."""
    from xdist.scheduler import LoadScopeScheduling

    class EngineScheduling(LoadScopeScheduling):
        _ordered = False

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._held: dict[object, set[str]] = {}  # worker -> the models of the engines it was given

        def _split_scope(self, nodeid: str) -> str:
            return engine_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self._ordered:  # the work queue is complete before the first unit is handed out
                self._ordered = True
                order = work_order(list(self.workqueue))
                units = dict(self.workqueue)
                self.workqueue.clear()
                self.workqueue.update((scope, units[scope]) for scope in order)
            held = self._held.setdefault(node, set())
            elsewhere = set().union(*(models for other, models in self._held.items()
                                      if other is not node and other in self.nodes))
            scope = next_unit(list(self.workqueue), held, elsewhere)
            self.workqueue.move_to_end(scope, last=False)  # the parent hands out the first
            if _is_engine(scope):
                held.add(_model(scope))
            super()._assign_work_unit(node)

    return EngineScheduling(config, log)
