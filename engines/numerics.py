"""Numerics settings: an explicit, recorded choice, not a side effect of building a reference.

Two settings, one table:

* ``production`` (the default for engines under test): the framework's own defaults,
  as an inference service runs them: non-deterministic kernels allowed, cuDNN's
  autotuner off (torch's default), the cuBLAS workspace as torch sizes it.
* ``deterministic``: ``torch.use_deterministic_algorithms``, deterministic cuDNN, and
  a fixed cuBLAS workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which must be set
  before the process's first cuBLAS call, so it is applied at session start).

TF32 is off in both: a policy's FP32 means IEEE FP32, and the precision audit fails
an FP32 engine that runs with TF32.

The FP32 reference always runs under deterministic kernels (:func:`applied` around
each of its calls), whatever the engines under test use.  It does so on one CUDA
stream, where cuBLAS GEMMs are bitwise reproducible without a fixed workspace (cuBLAS
documentation, "Results reproducibility": the guarantee holds when a single stream
is active), so the reference does not force ``CUBLAS_WORKSPACE_CONFIG`` onto the
engines; PyTorch's warning that the variable is unset is silenced inside the
reference's calls only.  The fidelity report and pytest-benchmark's ``machine_info``
record the setting in force (:func:`record`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Any

CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"


@dataclasses.dataclass(frozen=True)
class Numerics:
    name: str
    description: str
    deterministic_algorithms: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    cublas_workspace_config: str | None  # None: leave the process's setting alone


NUMERICS: dict[str, Numerics] = {
    n.name: n
    for n in (
        Numerics(
            "production",
            "framework defaults: non-deterministic kernels allowed, cuBLAS workspace as torch sizes it, TF32 off",
            deterministic_algorithms=False,
            cudnn_deterministic=False,
            cudnn_benchmark=False,
            cublas_workspace_config=None,
        ),
        Numerics(
            "deterministic",
            "torch.use_deterministic_algorithms, deterministic cuDNN, CUBLAS_WORKSPACE_CONFIG=:4096:8, TF32 off",
            deterministic_algorithms=True,
            cudnn_deterministic=True,
            cudnn_benchmark=False,
            cublas_workspace_config=":4096:8",
        ),
    )
}
DEFAULT_NUMERICS = "production"
REFERENCE_NUMERICS = NUMERICS["deterministic"]


def get_numerics(name: str) -> Numerics:
    try:
        return NUMERICS[name]
    except KeyError:
        raise ValueError(f"unknown numerics {name!r}; choose one of {', '.join(NUMERICS)}") from None


def _tf32_off() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _set(numerics: Numerics) -> None:
    import torch

    torch.use_deterministic_algorithms(numerics.deterministic_algorithms, warn_only=True)
    torch.backends.cudnn.deterministic = numerics.cudnn_deterministic
    torch.backends.cudnn.benchmark = numerics.cudnn_benchmark


def configure_process(numerics: Numerics) -> None:
    """Apply ``numerics`` for the whole session; call before any engine (or cuBLAS handle) exists."""
    if numerics.cublas_workspace_config is not None:
        os.environ.setdefault(CUBLAS_WORKSPACE_ENV, numerics.cublas_workspace_config)
    _tf32_off()
    _set(numerics)


@contextlib.contextmanager
def applied(numerics: Numerics) -> Iterator[None]:
    """``numerics`` inside the block, the previous settings restored after it (the reference's calls)."""
    import torch

    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    _set(numerics)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUBLAS_WORKSPACE_CONFIG.*")
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic = saved[2]
        torch.backends.cudnn.benchmark = saved[3]


def tf32_enabled() -> bool:
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32) or (
        torch.get_float32_matmul_precision() != "highest"
    )


def record(numerics: Numerics) -> dict[str, Any]:
    """What reports and baselines carry: the setting chosen and the state torch is actually in."""
    import torch

    return {
        "name": numerics.name,
        "description": numerics.description,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get(CUBLAS_WORKSPACE_ENV),
        "tf32": tf32_enabled(),
        "reference": REFERENCE_NUMERICS.name,
    }
