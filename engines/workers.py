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
  each model is loaded, and its export awaited, by as few workers as the balance allows.  (xdist's ``loadgroup`` marks would group them, but xdist 3.8
  renames node ids to do it, which pytest 9 no longer reads: checked here.)
* With the engines on GPUs, each worker gets its share of the CPU: torch's intra-op threads (and
  onnxruntime's, through :func:`onnxruntime_session_options`) are cut to ``threads // workers``
  (:func:`share_cpu_threads`), unless ``OMP_NUM_THREADS`` says otherwise.  Workers that each start one
  thread per core spin against each other (their builds and exports run on the CPU): on the 2-core CPU
  machine a tiny-bert/tiny-gpt2 run under ``-n 2`` took 28.1 s with them, 14.3 s with one thread each; on
  two H200s the nightly run's PyTorch engine builds took 0.6-1.3 s on the workers, 0.04-0.3 s in one
  process.  Engines that compute on the CPU keep the machine's threads: the thread count changes how a CPU
  reduction is split, and with it the last bits of their outputs (tiny-bert/onnxrt/fp32's mean cosine
  0.999999999999997 with two threads, ...969 with one), and a run under ``-n`` must give one process's
  numbers.  The CPU FP32 baseline (perf, under the CPU's lock) runs with the machine's threads again
  (:func:`machine_threads`), as in one process.
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

SESSION_START_KEY = "fidelity_session_start"
# The parameter of a test on one engine: "[model/backend/precision]", or with the benchmarks' shape in front.
_ENGINE_PARAM = re.compile(r"\[(?:b\d+s\d+-)?([^\[\]/]+/[^\[\]/]+/[^\[\]]+)\]$")
_START_KEY = pytest.StashKey[float]()
# torch's intra-op thread count before this worker took its share (None: no share taken, one process).
_machine_threads: int | None = None


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

    Returns the share; nothing happens on the controller, in one process, when the engines compute on the
    CPU (the thread count is part of their numerics), or when ``OMP_NUM_THREADS`` is set (the user's choice).
    """
    global _machine_threads
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or not device.startswith("cuda") or "OMP_NUM_THREADS" in os.environ:
        return None
    import torch

    if _machine_threads is None:
        _machine_threads = torch.get_num_threads()
    share = thread_share(_machine_threads, int(workerinput.get("workercount") or 1))
    torch.set_num_threads(share)
    return share


def onnxruntime_session_options(ort):
    """An onnxruntime ``SessionOptions``, quiet, with a worker's share of the CPU threads (else onnxruntime's default)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if _machine_threads is not None:
        import torch

        options.intra_op_num_threads = torch.get_num_threads()
    return options


@contextlib.contextmanager
def machine_threads() -> Iterator[None]:
    """torch with the whole machine's threads for the duration (a worker's CPU FP32 baseline, as in one process)."""
    if _machine_threads is None:
        yield
        return
    import torch

    share = torch.get_num_threads()
    torch.set_num_threads(_machine_threads)
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
        by_model.setdefault(engine.split("/", 1)[0], []).append(engine)
    queues = list(by_model.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


def _slow_build(engine: str) -> bool:
    from engines.backends.registry import BACKENDS

    info = BACKENDS.get(engine.split("/")[1])
    return bool(info and info.slow_build)


def work_order(scopes: list[str]) -> list[str]:
    """The order workers take units of work in: slow builds first, each group in turn by model, then other tests.

    Workers take scopes from the front.  In collection order (each model's torch engines, then its ONNX ones)
    both would start on one model and, at its first ONNX engine, one would wait on the other's FP32 export
    (on two H200s, 22 s of a 187 s nightly run); in turn by model they export two models at once.  With the
    exports last, the run ended on them: on two H100s (torch engines first, in turn by model) a worker's
    gpt2/onnx-torch/hybrid waited 20 s for the other's gpt2 export near the end, 216 s against 348 s in one
    process.  Engines whose backend builds slowly (``BackendInfo.slow_build``: exports, compiles) go first,
    their model's FP32 export (collected first) leading; scopes that are not an engine's keep their place last.
    """
    engines = [scope for scope in scopes if "::" not in scope]  # an engine's id; any other test's is its node id
    others = [scope for scope in scopes if "::" in scope]
    slow = [engine for engine in engines if _slow_build(engine)]
    quick = [engine for engine in engines if not _slow_build(engine)]
    return interleave_by_model(slow) + interleave_by_model(quick) + others


def next_unit(queue: list[str], held: set[str], held_elsewhere: set[str]) -> str:
    """The unit of work a worker takes next from ``queue`` (in :func:`work_order`).

    The first, unless its model is already held by another worker and not by this one (``held``: the models
    of the engines it was given): then the first unit of the same kind (slow build or not) of a model this
    worker holds, if any.  A model held by no worker yet goes to whoever asks, so the exports start at once;
    after that each worker keeps to its models while it has work of the kind at hand, and takes another's
    only when its own run out.  Each model is then loaded, its FP32 reference built and its export awaited by
    as few workers as the balance allows (on two H100s each of two workers loaded all three models, and one
    waited 11.8 s for the other's gpt2 export).
    """
    head = queue[0]
    if "::" in head:  # not an engine's
        return head
    model = head.split("/", 1)[0]
    if model in held or model not in held_elsewhere:
        return head
    kind = _slow_build(head)
    return next((scope for scope in queue
                 if "::" not in scope and scope.split("/", 1)[0] in held and _slow_build(scope) == kind), head)


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
            if "::" not in scope:
                held.add(scope.split("/", 1)[0])
            super()._assign_work_unit(node)

    return EngineScheduling(config, log)
