"""Baselines of the upgrade gate, beside the latency gate's, under ``baselines/<machine id>/``.

::

    baselines/<machine id>/<OS-Python folder>/NNNN_NAME.json   pytest-benchmark's runs (the latency gate reads them)
    baselines/<machine id>/fidelity/NNNN_NAME.json             fidelity reports
    baselines/<machine id>/history.jsonl                       the history (gate.history)

One counter numbers both kinds, so ``0008_nightly`` names one result set.  A baseline
is written only by ``fidelity-gate save`` (an explicit command, recorded in the
history): a nightly run never refreshes it, so a regression is never absorbed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from gate.results import ResultSet, ResultSetError, perf_platform_folder
from perf.baselines import FIDELITY_FOLDER, default_storage, select_baseline

HISTORY_FILE = "history.jsonl"
_COUNTER = re.compile(r"^(\d{4})_")


def machine_folder(root: Path, machine_id: str) -> Path:
    return Path(root) / machine_id


def default_root() -> Path:
    """$FIDELITY_BASELINES, else ``baselines/`` of the current folder (the checkout)."""
    return default_storage(Path.cwd())


def fidelity_baselines(folder: Path) -> list[Path]:
    return sorted((folder / FIDELITY_FOLDER).glob("*.json"), key=lambda p: p.name) if folder.is_dir() else []


def stored(root: Path, machine_id: str, *, want_fidelity: bool, want_perf: bool) -> ResultSet:
    """The newest complete stored baseline of each kind for ``machine_id``."""
    folder = machine_folder(root, machine_id)
    paths: list[Path] = []
    notes = []
    if want_fidelity:
        complete = [p for p in fidelity_baselines(folder) if not ResultSet.load(p).incomplete()]
        if not complete:
            raise ResultSetError(f"no complete fidelity baseline for {machine_id} under {folder / FIDELITY_FOLDER}: "
                                 "save one with: fidelity-gate save RESULTS --name NAME")
        paths.append(complete[-1])
    if want_perf:
        path, notes = select_baseline(folder, True)
        if path is None:
            raise ResultSetError(f"no complete latency baseline for {machine_id} under {folder}"
                                 + (f" ({'; '.join(notes)})" if notes else "")
                                 + ": save one with: fidelity-gate save RESULTS --name NAME")
        paths.append(path)
    return ResultSet.load(*paths, label=" + ".join(str(p) for p in paths))


def next_counter(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.rglob("*.json") if (m := _COUNTER.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=0) + 1


def save(results: ResultSet, root: Path, name: str) -> list[Path]:
    """Store ``results`` as the newest baseline of its machine; refused when incomplete or fault-injected."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ResultSetError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    results.require_complete("not saved")
    results.require_no_faults("not saved")
    folder = machine_folder(root, results.machine_id)
    counter = f"{next_counter(folder):04d}_{name}.json"
    written = []
    if results.fidelity_path is not None:
        target = folder / FIDELITY_FOLDER / counter
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results.fidelity_path, target)
        written.append(target)
    if results.perf_path is not None:
        target = folder / perf_platform_folder(results.perf) / counter
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results.perf_path, target)
        written.append(target)
    return written

