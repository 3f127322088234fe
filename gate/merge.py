"""Across hosts: result sets that each hold a share of one night's work, merged into one result set per architecture.

The nightly workflow runs one job per GPU architecture and share of the engines (a CI
matrix); each uploads its result folder.  :func:`merge` groups the sets by machine id and
combines each group into one set that ``fidelity-gate compare`` and ``save`` take like any
other: the fidelity rows, engines, skips and cache events of every share, and every share's
benchmarks.  Refused (:class:`ResultSetError`, naming both sources): a row or benchmark that
two sets both hold (each share must be its own), sets of one machine id that ran different
stacks (driver, CUDA, TensorRT, numerics, commit, ...) or other inputs, and mixed report
schemas.  Each merged file records where its parts came from (``merged_from``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.files import atomic_write_json
from gate.drift import CHECKED_OPTIONS, row_key
from gate.results import FIDELITY_FILE, PERF_FILE, STACK_KEYS, ResultSet, ResultSetError, fidelity_stack, perf_stack

# Options that choose the share (which engines): they may differ between the parts; every other option must not.
SHARE_OPTIONS = ("models", "backends", "precisions", "policies", "gpus", "device")
SHARE_LISTS = ("models", "backends", "precisions")  # the share options a merged set holds the union of


def _same(parts: Sequence[tuple[str, dict]], what: str, keys: Sequence[str]) -> None:
    (first_label, first), *rest = parts
    for label, facts in rest:
        for key in keys:
            if facts.get(key) != first.get(key):
                raise ResultSetError(f"merge: {first_label} and {label} differ in {what} {key} ({first.get(key)!r} vs "
                                     f"{facts.get(key)!r}): one architecture's shares must run one stack on one input "
                                     "set; merge only the result folders of one nightly run")


def _unique(items, key, what: str) -> None:
    """No key in two of the sets, ``items`` being (item, index of its set, label) (within one set, repeats are its own
    business: an xdist run may hold one engine's rows from two GPUs, which the gate merges)."""
    seen: dict[Any, tuple[int, str]] = {}
    for item, index, label in items:
        k = key(item)
        first = seen.setdefault(k, (index, label))
        if first[0] != index:
            raise ResultSetError(f"merge: {what} {k} is in both {first[1]} and {label}: give each host its own share "
                                 "of the engines (NIGHTLY_MODELS / NIGHTLY_BACKENDS per matrix job)")


def _union(records: Sequence[dict], keys: Sequence[str]) -> dict[str, list]:
    """Each of ``keys``: the lists the records hold under it, joined in order without repeats (the shares' models...)."""
    return {key: list(dict.fromkeys(v for record in records for v in record.get(key) or [])) for key in keys}


def _merge_fidelity(sets: Sequence[ResultSet]) -> dict[str, Any]:
    reports = [(str(s.fidelity_path), s.fidelity) for s in sets]
    _same([(label, {"schema_version": r.get("schema_version")}) for label, r in reports], "report", ["schema_version"])
    _same([(label, fidelity_stack(r)) for label, r in reports], "stack fact", [k for k in STACK_KEYS])
    options = [(label, r.get("options") or {}) for label, r in reports]
    _same(options, "option", sorted({k for _, o in options for k in o} - set(SHARE_OPTIONS) | set(CHECKED_OPTIONS)))
    rows = [(row, i, label) for i, (label, r) in enumerate(reports) for row in r.get("rows") or []]
    _unique(rows, row_key, "fidelity row")
    merged = dict(reports[0][1])
    merged["rows"] = [row for row, _, _ in rows]
    merged["engines"] = {name: e for _, r in reports for name, e in (r.get("engines") or {}).items()}
    merged["skipped"] = [s for _, r in reports for s in r.get("skipped") or []]
    merged["notes"] = list(dict.fromkeys(n for _, r in reports for n in r.get("notes") or []))
    merged["interrupted"] = any(r.get("interrupted") for _, r in reports)
    merged["started"] = min(r.get("started") or "" for _, r in reports) or None
    merged["written"] = max(r.get("written") or "" for _, r in reports) or None
    merged["options"] = {**(merged.get("options") or {}), **_union([o for _, o in options], SHARE_LISTS)}
    merged["options"]["policies"] = {k: v for _, o in options for k, v in (o.get("policies") or {}).items()}
    from engines.cache import describe_events

    events = [e for _, r in reports for e in (r.get("engine_cache") or {}).get("events") or []]
    merged["engine_cache"] = {"root": "one per host", "events": events,
                              "summary": describe_events("one per host", [(e["outcome"], e["seconds"]) for e in events]),
                              "hosts": {label: (r.get("engine_cache") or {}).get("summary") for label, r in reports}}
    merged["merged_from"] = [{"path": label, "command": r.get("command"), "started": r.get("started"),
                              "written": r.get("written"), "rows": len(r.get("rows") or [])} for label, r in reports]
    return merged


def _merge_perf(sets: Sequence[ResultSet]) -> dict[str, Any]:
    runs = [(str(s.perf_path), s.perf) for s in sets]
    _same([(label, perf_stack(r)) for label, r in runs], "stack fact", [k for k in STACK_KEYS])

    def options(run: dict) -> dict:  # the run's options without the ones that choose its share
        found = dict(run.get("fidelity_suite_options") or {})
        found["engines"] = {k: v for k, v in (found.get("engines") or {}).items() if k not in SHARE_OPTIONS}
        return found

    _same([(label, options(r)) for label, r in runs], "perf option", sorted({k for _, r in runs for k in options(r)}))
    benchmarks = [(b, i, label) for i, (label, r) in enumerate(runs) for b in r.get("benchmarks") or []]
    _unique(benchmarks, lambda b: b.get("fullname") or b.get("name"), "benchmark")
    merged = dict(runs[0][1])
    merged["benchmarks"] = [b for b, _, _ in benchmarks]
    engines = [(r.get("fidelity_suite_options") or {}).get("engines") or {} for _, r in runs]
    merged["fidelity_suite_options"] = {**(merged.get("fidelity_suite_options") or {}),
                                        "engines": {**engines[0], **_union(engines, SHARE_LISTS)}}
    records = [r.get("fidelity_suite_run") for _, r in runs]
    if all(records):
        merged["fidelity_suite_run"] = {
            **records[0],
            "selected": sum(int(x.get("selected") or 0) for x in records),
            "finished": sum(int(x.get("finished") or 0) for x in records),
            "complete": all(x.get("complete", True) for x in records),
            "interrupted": any(x.get("interrupted") for x in records),
        }
    merged["merged_from"] = [{"path": label, "datetime": r.get("datetime"), "benchmarks": len(r.get("benchmarks") or [])}
                             for label, r in runs]
    return merged


def merge(sets: Sequence[ResultSet]) -> dict[str, dict[str, Any]]:
    """{machine id: {"fidelity": report or None, "perf": run or None, "parts": labels}} over every set given."""
    groups: dict[str, list[ResultSet]] = {}
    for result in sets:
        groups.setdefault(result.machine_id, []).append(result)
    out = {}
    for machine, members in groups.items():
        with_fidelity = [m for m in members if m.fidelity is not None]
        with_perf = [m for m in members if m.perf is not None]
        out[machine] = {
            "fidelity": _merge_fidelity(with_fidelity) if with_fidelity else None,
            "perf": _merge_perf(with_perf) if with_perf else None,
            "parts": [m.label for m in members],
        }
    return out


def check_out(folder: Path) -> None:
    """``--out`` must be a folder (it is created): a file there is a usage error, named before any merging."""
    if folder.exists() and not folder.is_dir():
        raise ResultSetError(f"--out {folder} is a file: give a folder (DIR/<machine id>/ result folders go there)")


def write(merged: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """One result folder per machine id under ``folder``: ``<machine id>/fidelity.json`` and ``perf.json`` (a file of
    an earlier merge that this one has no data for is removed, so the folder is this merge alone)."""
    check_out(folder)
    written = []
    for machine, parts in merged.items():
        target = folder / machine
        target.mkdir(parents=True, exist_ok=True)
        for name, data in ((FIDELITY_FILE, parts["fidelity"]), (PERF_FILE, parts["perf"])):
            if data is not None:
                atomic_write_json(target / name, data, default=str)
                written.append(target / name)
            else:
                (target / name).unlink(missing_ok=True)
    return written
