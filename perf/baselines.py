"""Per-GPU-architecture baselines under ``baselines/<machine id>/``.

The machine id is the GPU's compute capability and name (``sm90-NVIDIA_H100_80GB_HBM3``)
or, without a GPU, the CPU's model (``cpu-x86_64-Intel_Xeon_...``).  pytest-benchmark
writes its JSON into that folder (inside its own OS/Python subfolder) and reads it
with ``--benchmark-compare``; this module chooses the stored run to compare with and
checks that what must match does: the machine id and the major versions of the
runtimes that produced the numbers, and the numerics the engines ran under.  A
mismatch refuses the comparison.

Where baselines live: ``$FIDELITY_BASELINES`` if set, else ``baselines/`` under
pytest's rootdir (the checkout), never inside the installed package.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engines.env import machine_id, runtime_versions

BASELINES_ENV = "FIDELITY_BASELINES"
# Version history of the "fidelity_suite" block inside pytest-benchmark's machine_info:
#   1: machine_id, gpu, compute_capability, driver, cuda, torch, transformers, onnxruntime, tensorrt
#   2: numerics (the settings the engines ran under: engines.numerics), numerics_detail
BASELINE_SCHEMA_VERSION = 2
# Baselines saved before numerics were recorded (schema 1: H100 0001-0004) were all
# measured under the then fidelity session's deterministic kernels.
NUMERICS_BEFORE_SCHEMA_2 = "deterministic"
# A top-level block of each run this suite saves (pytest-benchmark keeps unknown keys):
#   {"schema": 1, "selected": N, "finished": M, "interrupted": bool, "complete": bool}
# Runs saved before it existed (baselines 0001-0003 of the H100) have none and count as complete.
RUN_RECORD_KEY = "fidelity_suite_run"
RUN_RECORD_SCHEMA_VERSION = 1
# A top-level block of each saved run: how it was measured and gated (perf.options.PerfOptions.record) and
# which engines it selected (engines.options.EngineSelection.record: policy files with their sha256).
OPTIONS_KEY = "fidelity_suite_options"
# Facts that must match between a baseline and the candidate.  Runtimes are
# checked by major version only (an upgrade within a major is exactly what the
# gate is for), and only the runtimes the baseline's engines ran on
# (engines.backends.registry: BackendInfo.runtime): installing TensorRT does not void a
# baseline of PyTorch engines.
CHECKED_FACTS = ("machine_id", "numerics")


class BaselineMismatchError(RuntimeError):
    """A baseline recorded on another architecture or engine major version."""


def default_storage(rootdir: Path) -> Path:
    """The baselines folder: $FIDELITY_BASELINES, else ``baselines/`` under pytest's rootdir."""
    configured = os.environ.get(BASELINES_ENV)
    return Path(configured).expanduser() if configured else Path(rootdir) / "baselines"


def machine_facts(device: str, env: dict[str, Any], numerics: dict[str, Any]) -> dict[str, Any]:
    """What pytest-benchmark's machine_info gets under "fidelity_suite".

    ``env`` is the session's environment (``EngineFactory.environment``, read once: it runs nvidia-smi),
    ``numerics`` the setting in force (``engines.numerics.record``).
    """
    facts: dict[str, Any] = {
        "schema": BASELINE_SCHEMA_VERSION,
        "machine_id": machine_id(device),
        "numerics": numerics["name"],
        "numerics_detail": numerics,
        "gpu": env.get("gpu_name"),
        "compute_capability": env.get("compute_capability"),
        "driver": env.get("driver"),
        "cuda": env.get("cuda_runtime"),
        "torch": env.get("torch"),
        "transformers": env.get("transformers"),
        "cpu": env.get("cpu"),
    }
    facts.update(env.get("runtimes") or runtime_versions())
    facts.update(commit=env.get("commit"), stack=env.get("stack"))
    return facts


# The upgrade gate's fidelity baselines live beside pytest-benchmark's runs, in this subfolder (gate/store.py).
FIDELITY_FOLDER = "fidelity"


def baseline_files(folder: Path) -> list[Path]:
    """Stored runs under ``folder``, oldest first (pytest-benchmark's 0001_, 0002_... counter decides)."""
    if not folder.is_dir():
        return []
    runs = [p for p in folder.rglob("*.json") if p.parent.name != FIDELITY_FOLDER]
    return sorted(runs, key=lambda p: (p.name.split("_", 1)[0], p.stat().st_mtime))


class BaselineSelectionError(ValueError):
    """``--benchmark-compare=SPEC`` names no stored run, or more than one."""


def read_run(path: Path) -> dict[str, Any]:
    """A stored run's JSON; ValueError naming the file when it is unreadable (truncated, binary, not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable saved run ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a saved run (its JSON is not an object)")
    return data


_UNREADABLE = {"unreadable": True}


def run_record(path: Path) -> dict[str, Any] | None:
    """The "fidelity_suite_run" block of a stored run: None for runs saved before it existed."""
    try:
        return read_run(path).get(RUN_RECORD_KEY)
    except ValueError:
        return _UNREADABLE


def _incomplete_reason(record: dict[str, Any] | None) -> str | None:
    if record is _UNREADABLE:
        return "its JSON does not read (a truncated or damaged file)"
    if record is None or record.get("complete", True):
        return None
    how = "interrupted" if record.get("interrupted") else "stopped early"
    return f"{how} after {record.get('finished')} of {record.get('selected')} configurations"


def select_baseline(folder: Path, spec: bool | str) -> tuple[Path | None, list[str]]:
    """The stored run to compare with, and notes on newer runs passed over.

    ``spec`` is pytest-benchmark's ``--benchmark-compare`` value: ``True`` (no
    argument) takes the newest *complete* run, so that a save interrupted half-way
    does not become a baseline that silently gates only what it measured; a
    string (``0004``, ``0004_nightly``, ``Linux-CPython-3.12-64bit/0004`` or a
    path) names one run, complete or not, as pytest-benchmark matches it.
    """
    files = baseline_files(folder)
    if spec is True:
        notes = []
        for path in reversed(files):
            reason = _incomplete_reason(run_record(path))
            if reason is None:
                return path, notes
            counter = path.name.split("_", 1)[0]
            notes.append(f"passed over {path.name}: {reason}; to compare with it anyway: --benchmark-compare={counter}")
        return None, notes
    candidate = Path(spec)
    if candidate.is_file():
        return candidate, []
    platform_glob, _, name = spec.rpartition("/")
    name_glob = name.rstrip("*") + "*.json"
    matches = [
        p for p in files
        if fnmatch.fnmatch(p.name, name_glob) and (not platform_glob or fnmatch.fnmatch(p.parent.name, platform_glob))
    ]
    if len(matches) != 1:
        stored = ", ".join(str(p.relative_to(folder)) for p in files) or "none"
        what = "matches no stored run" if not matches else f"matches {len(matches)} stored runs"
        raise BaselineSelectionError(
            f"--benchmark-compare={spec} {what} under {folder} (stored: {stored}); name one, for example "
            f"--benchmark-compare={files[-1].name.split('_', 1)[0] if files else '0001'}"
        )
    return matches[0], []


def _major(version: str | None) -> str | None:
    return None if not version else version.split(".", 1)[0]


def check_compatible(
    baseline_facts: dict[str, Any], current: dict[str, Any], *, source: Path, backends: Iterable[str]
) -> None:
    """Refuse a baseline of another machine id, or of another major version of a runtime its ``backends`` ran on."""
    from engines.backends.registry import BACKENDS

    problems = []
    baseline_facts = dict(baseline_facts)
    if baseline_facts.get("schema", 1) < 2:
        baseline_facts.setdefault("numerics", NUMERICS_BEFORE_SCHEMA_2)
    for key in CHECKED_FACTS:
        if baseline_facts.get(key) != current.get(key):
            problems.append(f"{key} {baseline_facts.get(key)!r} (here {current.get(key)!r})")
    runtimes = sorted({BACKENDS[b].runtime for b in backends if b in BACKENDS})
    for key in runtimes:
        if _major(baseline_facts.get(key)) != _major(current.get(key)):
            problems.append(f"{key} major version {baseline_facts.get(key)!r} (here {current.get(key)!r})")
    if problems:
        raise BaselineMismatchError(
            f"baseline {source} was recorded for " + ", ".join(problems) + "; it is not compared. "
            "Save a baseline on this machine with these settings (pytest -m perf --benchmark-save=NAME), "
            "or compare with one that has them (--benchmark-compare=NNNN)."
        )


class Baseline:
    """One stored pytest-benchmark run, indexed by benchmark full name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            data = read_run(path)
        except ValueError as exc:
            raise BaselineMismatchError(f"{exc}; it is not compared") from None
        self.facts: dict[str, Any] = data.get("machine_info", {}).get("fidelity_suite", {})
        if not self.facts:
            raise BaselineMismatchError(
                f"{path} has no fidelity_suite machine facts (not saved by this suite); it is not compared"
            )
        self.options: dict[str, Any] = data.get(OPTIONS_KEY) or {}
        if self.options.get("slowdowns"):
            raise BaselineMismatchError(
                f"{path} was saved with an injected slowdown (--perf-slow-engine {self.options['slowdowns']}): a "
                "test of the gate, not a baseline; it is not compared"
            )
        perturbations = (self.options.get("engines") or {}).get("perturbations")
        if perturbations:
            raise BaselineMismatchError(
                f"{path} was saved with injected weight faults (--perturb-weight {', '.join(perturbations)}): a test "
                "of the gates, not a baseline; it is not compared"
            )
        self.benchmarks = {b["fullname"]: b for b in data.get("benchmarks", [])}

    def check_policies(self, current: dict[str, dict[str, Any]]) -> None:
        """Refuse the baseline where a policy file of the same name now has other contents (sha256)."""
        recorded = (self.options.get("engines") or {}).get("policies") or {}
        changed = [
            f"{name} ({recorded[name].get('sha256', '')[:12]} then, {policy.get('sha256', '')[:12]} now)"
            for name, policy in current.items()
            if name in recorded and recorded[name].get("sha256") != policy.get("sha256")
        ]
        if changed:
            raise BaselineMismatchError(
                f"baseline {self.path}: the policy file(s) {', '.join(changed)} changed since it was saved, so its "
                "engines are not these; it is not compared. Save a new baseline, or rename the changed policy."
            )

    @property
    def backends(self) -> set[str]:
        """The backends whose results this run holds (from each result's model/backend/precision)."""
        from engines.backends.base import split_engine_name

        engines = (b.get("extra_info", {}).get("engine") for b in self.benchmarks.values())
        return {split_engine_name(engine)[1] for engine in engines if engine and engine.count("/") == 2}

    def samples(self, fullname: str) -> list[float] | None:
        entry = self.benchmarks.get(fullname)
        if entry is None:
            return None
        data = entry.get("stats", {}).get("data")
        return list(data) if data else None

    def extra(self, fullname: str) -> dict[str, Any]:
        return self.benchmarks.get(fullname, {}).get("extra_info", {})
