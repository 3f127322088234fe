"""A result set: the fidelity report and the pytest-benchmark JSON of one run, and the stack they ran on.

A result set is a folder holding ``fidelity.json`` (``pytest -m fidelity --fidelity-report``)
and/or ``perf.json`` (``pytest -m perf --benchmark-json``), as the nightly job writes
them, or the two files named one by one.  Everything the gate refuses about a set
(no machine id, two machine ids, an interrupted run, injected faults where a baseline is
wanted) is a :class:`ResultSetError` naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from engines.env import gpu_machine_id

FIDELITY_FILE = "fidelity.json"
PERF_FILE = "perf.json"
# The facts of a stack, in the order the stack diff shows them.  machine_id must match for any comparison;
# the rest is what an upgrade changes and the report shows.
STACK_KEYS = ("machine_id", "gpu", "driver", "cuda", "torch", "transformers", "onnxruntime", "tensorrt",
              "tensorrt_rtx", "numerics", "python", "stack", "commit")


class ResultSetError(ValueError):
    """A result set the gate cannot use as asked; the message names the file, the reason and the fix."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultSetError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ResultSetError(f"{path} is not JSON ({type(exc).__name__}: {exc}); a truncated or damaged file?") from None
    if not isinstance(data, dict):
        raise ResultSetError(f"{path} is not a fidelity report or a pytest-benchmark run (not a JSON object)")
    return data


def _kind(data: dict[str, Any]) -> str | None:
    if "rows" in data and "schema_version" in data:
        return "fidelity"
    if "benchmarks" in data and "machine_info" in data:
        return "perf"
    return None


def fidelity_stack(report: dict[str, Any]) -> dict[str, Any]:
    """Stack facts of a fidelity report (schema 4 records machine_id; older GPU reports derive it)."""
    env = report.get("environment") or {}
    machine = env.get("machine_id")
    if machine is None and env.get("gpu_name") and env.get("compute_capability"):
        machine = gpu_machine_id(env["gpu_name"], env["compute_capability"])
    runtimes = env.get("runtimes") or {}
    return {
        "machine_id": machine, "gpu": env.get("gpu_name"), "driver": env.get("driver"), "cuda": env.get("cuda_runtime"),
        "torch": env.get("torch"), "transformers": env.get("transformers"), "onnxruntime": runtimes.get("onnxruntime"),
        "tensorrt": runtimes.get("tensorrt"), "tensorrt_rtx": runtimes.get("tensorrt_rtx"),
        "numerics": (env.get("numerics") or {}).get("name"), "python": env.get("python"), "stack": env.get("stack"),
        "commit": env.get("commit"),
    }


def perf_stack(run: dict[str, Any]) -> dict[str, Any]:
    info = run.get("machine_info") or {}
    facts = info.get("fidelity_suite") or {}
    commit = facts.get("commit")
    if commit is None and run.get("commit_info", {}).get("id"):
        commit_info = run["commit_info"]
        commit = commit_info["id"] + ("+dirty" if commit_info.get("dirty") else "")
    return {
        "machine_id": facts.get("machine_id"), "gpu": facts.get("gpu"), "driver": facts.get("driver"),
        "cuda": facts.get("cuda"), "torch": facts.get("torch"), "transformers": facts.get("transformers"),
        "onnxruntime": facts.get("onnxruntime"), "tensorrt": facts.get("tensorrt"),
        "tensorrt_rtx": facts.get("tensorrt_rtx"), "numerics": facts.get("numerics") or "deterministic",
        "python": info.get("python_version"), "stack": facts.get("stack"), "commit": commit,
    }


def perf_platform_folder(run: dict[str, Any]) -> str:
    """pytest-benchmark's storage subfolder for a run (``Linux-CPython-3.12-64bit``)."""
    info = run.get("machine_info") or {}
    major_minor = ".".join(str(info.get("python_version", "0.0")).split(".")[:2])
    bits = (info.get("cpu") or {}).get("bits", 64)
    return f"{info.get('system', 'unknown')}-{info.get('python_implementation', 'unknown')}-{major_minor}-{bits}bit"


@dataclasses.dataclass
class ResultSet:
    label: str
    fidelity: dict[str, Any] | None = None
    fidelity_path: Path | None = None
    perf: dict[str, Any] | None = None
    perf_path: Path | None = None

    @classmethod
    def load(cls, *paths: Path, label: str | None = None) -> "ResultSet":
        """A folder with fidelity.json and/or perf.json, or the files themselves (their kind read from the JSON)."""
        files: list[Path] = []
        for path in paths:
            path = Path(path)
            if path.is_dir():
                inside = [path / name for name in (FIDELITY_FILE, PERF_FILE) if (path / name).is_file()]
                if not inside:
                    raise ResultSetError(
                        f"{path} holds neither {FIDELITY_FILE} nor {PERF_FILE}: pass the folder the nightly job "
                        "wrote (.ci/nightly), or the fidelity report and the pytest-benchmark JSON themselves"
                    )
                files += inside
            elif path.is_file():
                files.append(path)
            else:
                raise ResultSetError(f"{path} does not exist: pass a result folder, a fidelity report or a "
                                     "pytest-benchmark JSON")
        result = cls(label=label or " + ".join(str(p) for p in paths))
        for path in files:
            data = _read_json(path)
            kind = _kind(data)
            if kind is None:
                raise ResultSetError(f"{path} is neither a fidelity report (--fidelity-report) nor a pytest-benchmark "
                                     "run (--benchmark-json / --benchmark-save)")
            if getattr(result, kind) is not None:
                raise ResultSetError(f"{path}: a second {kind} file in one result set "
                                     f"(the first: {getattr(result, kind + '_path')})")
            setattr(result, kind, data)
            setattr(result, kind + "_path", path)
        return result

    # -- facts ------------------------------------------------------------------------------------
    def stack(self) -> dict[str, Any]:
        """The stack's facts; where both files record one, they must agree on the machine."""
        parts = [s for s in (self.fidelity and fidelity_stack(self.fidelity), self.perf and perf_stack(self.perf)) if s]
        if len(parts) == 2 and parts[0]["machine_id"] and parts[1]["machine_id"] and \
                parts[0]["machine_id"] != parts[1]["machine_id"]:
            raise ResultSetError(
                f"{self.label}: the fidelity report ran on {parts[0]['machine_id']} and the benchmarks on "
                f"{parts[1]['machine_id']}: one result set is one machine"
            )
        merged: dict[str, Any] = {}
        for key in STACK_KEYS:
            merged[key] = next((p[key] for p in parts if p.get(key) is not None), None)
        return merged

    @property
    def machine_id(self) -> str:
        machine = self.stack()["machine_id"]
        if not machine:
            raise ResultSetError(
                f"{self.label} records no machine id (a fidelity report of schema < 4 from a CPU run): rerun with "
                "this version of the suite"
            )
        return machine

    def incomplete(self) -> list[str]:
        """Why this set is not a whole run: interrupted, partial rows, reference errors, a perf run stopped early."""
        reasons = []
        if self.fidelity is not None:
            rows = self.fidelity.get("rows") or []
            if self.fidelity.get("interrupted"):
                reasons.append(f"{self.fidelity_path}: the fidelity run was interrupted")
            partial = [r for r in rows if r.get("partial")]
            if partial:
                reasons.append(f"{self.fidelity_path}: {len(partial)} row(s) PARTIAL (a test stopped mid-way)")
            if not rows:
                reasons.append(f"{self.fidelity_path}: no fidelity rows")
        if self.perf is not None:
            record = self.perf.get("fidelity_suite_run")
            if record is not None and not record.get("complete", True):
                how = "interrupted" if record.get("interrupted") else "stopped early"
                reasons.append(f"{self.perf_path}: {how} after {record.get('finished')} of {record.get('selected')} "
                               "configurations")
            if not self.perf.get("benchmarks"):
                reasons.append(f"{self.perf_path}: no benchmarks")
        return reasons

    def injected_faults(self) -> list[str]:
        """Test-of-the-gate settings this set was run with (slowed engines, perturbed weights)."""
        faults = []
        if self.fidelity is not None:
            faults += [f"--perturb-weight {p}" for p in (self.fidelity.get("options") or {}).get("perturbations") or []]
        if self.perf is not None:
            options = self.perf.get("fidelity_suite_options") or {}
            faults += [f"--perf-slow-engine {s}" for s in options.get("slowdowns") or []]
            faults += [f"--perturb-weight {p}" for p in (options.get("engines") or {}).get("perturbations") or []]
        return faults

    def require_complete(self, action: str) -> None:
        reasons = self.incomplete()
        if reasons:
            raise ResultSetError(f"{action}: {self.label} is not a complete run: " + "; ".join(reasons) + "; rerun it")

    def require_no_faults(self, action: str) -> None:
        faults = self.injected_faults()
        if faults:
            raise ResultSetError(f"{action}: {self.label} was run with injected faults ({', '.join(faults)}): a test "
                                 "of the gate is never a baseline")

    def files(self) -> list[Path]:
        return [p for p in (self.fidelity_path, self.perf_path) if p is not None]
