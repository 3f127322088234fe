"""The one timer: runners never time themselves.

GPU work is asynchronous, so every timed call ends with a device synchronize
before the clock is read, and the device is idle when the clock starts (the
untimed setup synchronizes).  Inputs rotate among several pre-staged batches so
a result is never a cache artifact of one buffer.  Warm-up rounds run first.

Never two engines timed on one device at once: whatever is timed runs under the
device's lock (:func:`device_lock`), a file lock per physical device of this host
(the CPU, or a GPU by its UUID), shared by every process of this user: pytest-xdist
workers that share a device (``-n 2`` on the CPU, ``--device cuda:0 -n 2``) take
turns, workers on different GPUs never wait on each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from engines.backends.base import Runner
from engines.batch import TokenBatch
from engines.files import atomic_write_json
from engines.workers import all_cpu_threads
from perf.stats import median

INPUT_COPIES = 4
# Where the device locks live: $FIDELITY_DEVICE_LOCKS, else a folder of this user's in the system's temp folder.
DEVICE_LOCKS_ENV = "FIDELITY_DEVICE_LOCKS"
LOCK_NOTE_AFTER_S = 10.0  # a wait for a device's lock longer than this is said on stderr


def device_locks_folder() -> Path:
    configured = os.environ.get(DEVICE_LOCKS_ENV)
    if configured:
        return Path(configured).expanduser()
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"fidelity-device-locks-{user}"


def check_device_locks_folder() -> Path:
    """The lock folder, created: a usage error naming $FIDELITY_DEVICE_LOCKS when it cannot be (before any timing)."""
    from engines.options import OptionError

    folder = device_locks_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe."):
            pass
    except OSError as exc:
        raise OptionError(
            f"the device locks' folder {folder} cannot be written ({exc.strerror or exc}): set {DEVICE_LOCKS_ENV} "
            "to a writable folder on this host"
        ) from None
    return folder


def gpu_index(device: torch.device) -> int | None:
    """The CUDA index ``device`` runs on (``cuda`` means the current one); None off CUDA."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def device_key(device: torch.device) -> str:
    """One physical device of this host: ``<host>-cpu``, or ``<host>-gpu-<UUID>`` whatever index CUDA gives it."""
    host = socket.gethostname()
    if device.type == "cuda":
        index = gpu_index(device)
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        where = f"gpu-{uuid}" if uuid else f"cuda{index}-of-{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}"
    else:
        where = device.type
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{host}-{where}")


@dataclasses.dataclass
class DeviceHold:
    """One hold of a device's lock: when it was asked for, got and given back (``time.time()``, one clock per host)."""

    key: str
    requested: float
    acquired: float | None = None
    released: float | None = None

    def record(self) -> dict[str, Any]:
        waited = None if self.acquired is None else self.acquired - self.requested
        return {"key": self.key, "requested": self.requested, "acquired": self.acquired, "released": self.released,
                "waited_s": waited}


_LOCKS: dict[str, Any] = {}  # one FileLock per lock file and process (a FileLock counts its own re-entries)


@contextlib.contextmanager
def device_lock(device: torch.device | str) -> Iterator[DeviceHold]:
    """Hold ``device`` for timing: waits while another process of this user times on the same device."""
    from filelock import FileLock, Timeout

    key = device_key(torch.device(device))
    folder = device_locks_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / f"{key}.lock")
    lock = _LOCKS.setdefault(path, FileLock(path))
    hold = DeviceHold(key, time.time())
    try:
        lock.acquire(timeout=LOCK_NOTE_AFTER_S)
    except Timeout:  # another process times on this device (a sweep, another session): say so, then wait
        print(f"note: waiting for {key}: another process holds its timing lock ({path})", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        hold.acquired = time.time()
        try:
            yield hold
        finally:
            hold.released = time.time()
    finally:
        lock.release()


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def staged_inputs(runner: Runner, batch: int, seq: int, *, copies: int = INPUT_COPIES) -> list[Any]:
    """``copies`` different all-valid batches of token ids, already on the engine's device."""
    generator = torch.Generator().manual_seed(batch * 10_007 + seq)
    staged = []
    for _ in range(copies):
        ids = torch.randint(0, runner.model.vocab_size, (batch, seq), generator=generator)
        staged.append(runner.prepare(TokenBatch(ids, torch.ones_like(ids), source=f"perf b{batch}s{seq}")))
    return staged


@dataclasses.dataclass
class TimedEngine:
    """A runner, its staged inputs and an optional injected slowdown, as one timed call."""

    runner: Runner
    inputs: list[Any]  # what runner.prepare() staged
    injected_delay_s: float = 0.0  # test-only: a deliberately slowed engine (seconds added)
    injected_factor: float = 1.0  # test-only: each call stretched this many times

    def __post_init__(self) -> None:
        self._sync = synchronizer(self.runner.device)
        self._next = 0

    def setup(self):
        """pytest-benchmark's untimed setup: pick the next input, drain the device."""
        prepared = self.inputs[self._next % len(self.inputs)]
        self._next += 1
        self._sync()
        return (prepared,), {}

    def __call__(self, prepared: Any) -> None:
        start = time.perf_counter()
        self.runner.run(prepared)
        self._sync()
        # After the sync (a host wait must not hide behind GPU work), and spinning, not
        # sleeping: a sleep of tens of microseconds overshoots by as much again.
        extra = self.injected_delay_s + (self.injected_factor - 1.0) * (time.perf_counter() - start)
        if extra > 0:
            deadline = time.perf_counter() + extra
            while time.perf_counter() < deadline:
                pass


def sample_seconds(call: TimedEngine, *, warmup: int, rounds: int) -> list[float]:
    """Per-round seconds of ``call`` after ``warmup`` untimed rounds, outside pytest-benchmark (CPU baseline, sweep).

    The same call, setup and synchronization as the benchmarks' rounds.
    """
    for _ in range(warmup):
        args, _ = call.setup()
        call(*args)
    samples = []
    for _ in range(rounds):
        args, _ = call.setup()
        start = time.perf_counter()
        call(*args)
        samples.append(time.perf_counter() - start)
    return samples


def peak_device_bytes(call: TimedEngine) -> int | None:
    """Peak allocator bytes of this engine during one call, weights included; None off CUDA.

    What other objects held when the engine was built is not this engine's and is
    subtracted (engines.memory releases shared caches first, so the figure does not
    depend on what ran before); what the runtime holds outside the allocator, by its
    own report (``Runner.memory()``), is added.
    """
    device = call.runner.device
    if device.type != "cuda":
        return None
    args, _ = call.setup()
    torch.cuda.reset_peak_memory_stats(device)
    call(*args)
    allocator_peak = max(0, int(torch.cuda.max_memory_allocated(device)) - call.runner.foreign_device_bytes)
    return allocator_peak + call.runner.memory().outside_allocator_bytes


def first_call_seconds(call: TimedEngine) -> float:
    """Wall time of one call before any warm-up: compilation and graph capture for lazy engines."""
    args, _ = call.setup()
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def device_used_bytes(device: torch.device) -> int | None:
    """Device memory in use as NVML sees it (all allocators, the CUDA context); None without NVML or CUDA."""
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.device_memory_used(device))
    except Exception:  # noqa: BLE001 - pynvml missing or NVML unavailable: the field stays empty
        return None


def cap_device_memory(device: str, gib: float) -> None:
    """Limit the torch allocator on ``device`` to ``gib`` GiB (beyond it: torch.cuda.OutOfMemoryError)."""
    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    if not 0 < gib * 2**30 < total:
        raise ValueError(f"--perf-memory-cap-gib must be above 0 and below this GPU's {total / 2**30:.1f} GiB, got {gib}")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, index)


CPU_BASELINE_ROUNDS = 3  # the CPU FP32 forward is slow at large shapes: few rounds, recorded with each result
CPU_BASELINE_SCHEMA_VERSION = 1  # of the file the workers of one pytest-xdist run share (CpuBaseline.shared)


class CpuBaseline:
    """The same model's FP32 engine on the CPU (``factory.cpu_baseline_spec``), timed per shape in this run.

    One CPU engine per model, one median per (model, shape), both kept for the run: what the
    benchmarks' and the sweep's speedups are computed against.  Each median is measured under the CPU's lock,
    its engine's build too, so no other process of this user times (or builds a baseline) on the CPU meanwhile.

    ``shared``: a JSON file the workers of one pytest-xdist run share (perf.workers makes it beside their
    shards): the first worker to need a (model, shape) measures it and writes it there, the others read it, so
    a merged run has one CPU median per (model, shape), as one process does, and measures each once (without
    it, two workers timing one model's engines each timed its CPU baseline, and one run carried two medians
    for one shape: docs/results/xdist-h100x2/perf/before-shared-cpu).  A median already in the file is read
    without waiting for the lock (the file is replaced whole); only a missing one waits, then looks again.
    """

    def __init__(self, factory, *, rounds: int = CPU_BASELINE_ROUNDS, shared: Path | None = None,
                 worker: str | None = None) -> None:
        self.factory = factory
        self.rounds = rounds
        self.shared = None if shared is None else Path(shared)
        self.worker = worker  # who measured a median, as the shared file records it
        self._runners: dict[str, Runner] = {}
        self._medians: dict[tuple[str, int, int], float] = {}
        self._measured_by: dict[tuple[str, int, int], str | None] = {}
        self._holds: dict[tuple[str, int, int], DeviceHold] = {}  # this process's hold of the CPU lock, per median

    @staticmethod
    def label(model: str, shape: tuple[int, int]) -> str:
        return f"{model} b{shape[0]} s{shape[1]}"

    def median_seconds(self, model: str, shape: tuple[int, int]) -> float:
        key = (model, *shape)
        if key in self._medians or self._found_shared(key):
            return self._medians[key]
        with device_lock("cpu") as hold:  # the build, the timing and the write: one process at a time
            self._holds[key] = hold  # device_lock fills in its release
            if self._found_shared(key):  # measured by another worker while this one waited
                return self._medians[key]
            with all_cpu_threads():  # a CPU engine: built and timed with the machine's threads, not a worker's share
                if model not in self._runners:
                    self._runners[model] = self.factory.build(self.factory.cpu_baseline_spec(model), device="cpu")
                runner = self._runners[model]
                call = TimedEngine(runner, staged_inputs(runner, *shape, copies=2))
                self._medians[key] = median(sample_seconds(call, warmup=1, rounds=self.rounds))
            self._measured_by[key] = self.worker
            self._write_shared(model, shape)
        return self._medians[key]

    def _found_shared(self, key: tuple[str, int, int]) -> bool:
        found = self._read_shared().get(self.label(key[0], key[1:]))
        if found is not None:
            self._medians[key], self._measured_by[key] = found["median_s"], found.get("worker")
        return found is not None

    def lock_hold(self, model: str, shape: tuple[int, int]) -> dict[str, Any] | None:
        """The hold of the CPU lock (asked, got, given back, waited) taken for this median, given once: to the item
        whose ask took it; None for every other item, and where no lock was taken (the median in the shared file)."""
        hold = self._holds.pop((model, *shape), None)
        return None if hold is None else hold.record()

    def measured_by(self, model: str, shape: tuple[int, int]) -> str | None:
        """The pytest-xdist worker that measured this median (None in one process)."""
        return self._measured_by.get((model, *shape))

    def _read_shared(self) -> dict[str, dict[str, Any]]:
        if self.shared is None or not self.shared.exists():
            return {}
        data = json.loads(self.shared.read_text())
        if data.get("schema") != CPU_BASELINE_SCHEMA_VERSION or data.get("rounds") != self.rounds:
            raise ValueError(f"{self.shared}: CPU baseline medians of schema {data.get('schema')} and "
                             f"{data.get('rounds')} rounds, this run wants schema {CPU_BASELINE_SCHEMA_VERSION} "
                             f"and {self.rounds} rounds: the workers of one run disagree")
        return data["medians"]

    def _write_shared(self, model: str, shape: tuple[int, int]) -> None:
        if self.shared is None:
            return
        medians = self._read_shared()
        key = (model, *shape)
        medians[self.label(model, shape)] = {"median_s": self._medians[key], "worker": self._measured_by[key]}
        data = {"schema": CPU_BASELINE_SCHEMA_VERSION, "rounds": self.rounds, "medians": medians}
        atomic_write_json(self.shared, data, sort_keys=True)  # whole or not at all: a reader never sees half a file

    def medians(self) -> dict[str, float]:
        """Every median measured so far, in ms, keyed ``"<model> b<batch> s<sequence>"`` (for a run's record)."""
        return {self.label(model, (batch, seq)): seconds * 1e3 for (model, batch, seq), seconds in self._medians.items()}

    def close(self) -> None:
        """Drop the CPU engines (the medians stay: a later shape builds its engine again)."""
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()
