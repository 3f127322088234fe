"""Environment: flags, device resolution, and the facts a report must carry."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceUnavailableError(RuntimeError):
    pass


def env_flag(name: str, default: bool = False) -> bool:
    """Parse a boolean environment variable; anything unrecognised is an error."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def resolve_device(choice: str) -> str:
    """Map --device auto|cpu|cuda[:N] to a concrete torch device string."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = torch.__version__
            raise DeviceUnavailableError(
                f"--device {choice} was requested, but torch {build} sees no CUDA GPU "
                f"(torch.version.cuda={torch.version.cuda}). Use --device cpu (or auto), "
                "or run on a machine with an NVIDIA GPU and a CUDA build of torch."
            )
        return choice
    raise DeviceUnavailableError(f"--device must be one of {DEVICE_CHOICES} or cuda:N, got {choice!r}")


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The label of the stack under test (a container tag, "trt-10.13 + driver 580", ...): set by the nightly job,
# recorded by every report, shown in the upgrade gate's stack diff.
STACK_ENV = "FIDELITY_STACK"
# Inference runtimes whose versions every report records (import name -> version), beside torch.
RUNTIME_MODULES = ("onnxruntime", "tensorrt", "tensorrt_rtx")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def gpu_machine_id(name: str, compute_capability: str) -> str:
    """The machine id of a GPU from its name and compute capability ("9.0"): ``sm90-NVIDIA_H100_80GB_HBM3``."""
    return f"sm{compute_capability.replace('.', '')}-{_slug(name)}"


def machine_id(device: str) -> str:
    """Where baselines of this machine live: ``sm90-NVIDIA_H100_80GB_HBM3``, or ``cpu-x86_64-<CPU model>``."""
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        return gpu_machine_id(props.name, f"{props.major}.{props.minor}")
    return f"cpu-{platform.machine()}-{_slug(cpu_model())}"


def runtime_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in RUNTIME_MODULES:
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def suite_commit() -> str | None:
    """The suite's git commit (with ``+dirty`` when the checkout has changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=root,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=root, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + "+dirty" if dirty else head) or None


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def environment_info(device: str) -> dict[str, Any]:
    """Versions and hardware facts for reports (GPU name, capability, driver, CUDA)."""
    import torch

    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover - a hard dependency
        transformers_version = None
    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),  # torch's intra-op threads (a pytest-xdist worker's share)
        "torch": torch.__version__,
        "transformers": transformers_version,
        "cuda_runtime": torch.version.cuda,
        "gpu_name": None,
        "compute_capability": None,
        "driver": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info["gpu_name"] = props.name
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["driver"] = _nvidia_smi("driver_version")
    info["machine_id"] = machine_id(device)
    info["runtimes"] = runtime_versions()
    info["commit"] = suite_commit()
    info["stack"] = os.environ.get(STACK_ENV) or None
    return info
