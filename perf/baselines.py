"""Per-GPU-architecture baselines under ``baselines/<machine id>/``.

The machine id is the GPU's compute capability and name (``sm90-NVIDIA_H100_80GB_HBM3``)
or, without a GPU, the CPU's model (``cpu-x86_64-Intel_Xeon_...``).  pytest-benchmark
writes its JSON into that folder (inside its own OS/Python subfolder) and reads it
with ``--benchmark-compare``; this module finds the newest file for a machine and
checks that what must match does: the machine id and the major versions of the
runtimes that produced the numbers.  A mismatch refuses the comparison.
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

BASELINES_DIR = Path(__file__).resolve().parents[1] / "baselines"
# Version history of the "fidelity_suite" block inside pytest-benchmark's machine_info:
#   1: machine_id, gpu, compute_capability, driver, cuda, torch, transformers, onnxruntime, tensorrt
BASELINE_SCHEMA_VERSION = 1
# Facts that must match between a baseline and the candidate (major versions only
# for runtimes: an upgrade within a major is exactly what the gate is for).
CHECKED_FACTS = ("machine_id",)
CHECKED_MAJOR_VERSIONS = ("tensorrt",)


class BaselineMismatchError(RuntimeError):
    """A baseline recorded on another architecture or engine major version."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_id(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        return f"sm{props.major}{props.minor}-{_slug(props.name)}"
    return f"cpu-{platform.machine()}-{_slug(_cpu_model())}"


def machine_facts(device: str) -> dict[str, Any]:
    """What pytest-benchmark's machine_info gets under "fidelity_suite"."""
    from engines.env import environment_info

    env = environment_info(device)
    facts: dict[str, Any] = {
        "schema": BASELINE_SCHEMA_VERSION,
        "machine_id": machine_id(device),
        "gpu": env.get("gpu_name"),
        "compute_capability": env.get("compute_capability"),
        "driver": env.get("driver"),
        "cuda": env.get("cuda_runtime"),
        "torch": env.get("torch"),
        "transformers": env.get("transformers"),
        "cpu": _cpu_model(),
    }
    for name in ("onnxruntime", "tensorrt"):
        try:
            facts[name] = __import__(name).__version__
        except ImportError:
            facts[name] = None
    return facts


def machine_dir(device: str, root: Path = BASELINES_DIR) -> Path:
    return root / machine_id(device)


def latest_baseline(folder: Path) -> Path | None:
    """The newest pytest-benchmark JSON under ``folder`` (its 0001_, 0002_... counter decides)."""
    if not folder.is_dir():
        return None
    files = sorted(folder.rglob("*.json"), key=lambda p: (p.name.split("_", 1)[0], p.stat().st_mtime))
    return files[-1] if files else None


def _major(version: str | None) -> str | None:
    return None if not version else version.split(".", 1)[0]


def check_compatible(baseline_facts: dict[str, Any], current: dict[str, Any], *, source: Path) -> None:
    problems = []
    for key in CHECKED_FACTS:
        if baseline_facts.get(key) != current.get(key):
            problems.append(f"{key} {baseline_facts.get(key)!r} (here {current.get(key)!r})")
    for key in CHECKED_MAJOR_VERSIONS:
        if _major(baseline_facts.get(key)) != _major(current.get(key)):
            problems.append(f"{key} major version {baseline_facts.get(key)!r} (here {current.get(key)!r})")
    if problems:
        raise BaselineMismatchError(
            f"baseline {source} was recorded for " + ", ".join(problems) + "; it is not compared. "
            "Save a baseline on this machine with --benchmark-save=NAME."
        )


class Baseline:
    """One stored pytest-benchmark run, indexed by benchmark full name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = json.loads(path.read_text())
        self.facts: dict[str, Any] = data.get("machine_info", {}).get("fidelity_suite", {})
        if not self.facts:
            raise BaselineMismatchError(
                f"{path} has no fidelity_suite machine facts (not saved by this suite); it is not compared"
            )
        self.benchmarks = {b["fullname"]: b for b in data.get("benchmarks", [])}

    def samples(self, fullname: str) -> list[float] | None:
        entry = self.benchmarks.get(fullname)
        if entry is None:
            return None
        data = entry.get("stats", {}).get("data")
        return list(data) if data else None

    def extra(self, fullname: str) -> dict[str, Any]:
        return self.benchmarks.get(fullname, {}).get("extra_info", {})
