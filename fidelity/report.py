"""Fidelity results: one row per model x backend x precision x input source.

The same rows feed the terminal table and the JSON report.  The JSON is
rewritten atomically as results arrive, so an interrupted run keeps everything
measured up to that point; a run stopped by Ctrl-C says so (``interrupted``), and
the rows the test in progress was adding to carry the verdict ``PARTIAL``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any

from engines.files import atomic_write_json, write_or_print
from engines.tables import render_table
from fidelity.metrics import FidelityResult

# Version history of the JSON report:
#   1: first version (rows, environment, options, notes, audits).
#   2: rows carry the backend's runtime; "engines" (backend, runtime, provider,
#      graph dtypes, build seconds) and "engine_cache" (hits, builds) sections.
#   3: "interrupted"; rows carry "partial"; each "engines" entry carries its policy
#      (file and sha256 for policy files) and its audit (the "audits" section is gone);
#      "environment.numerics" (the numerics the engines ran under); "options.numerics".
#   4: "environment" carries the stack: machine_id (the baselines' folder), runtimes (onnxruntime, tensorrt,
#      tensorrt_rtx versions), commit (the suite's), stack ($FIDELITY_STACK); "options.perturbations".
#      Optional, added later within 4: "environment.cpu_threads" (torch's intra-op threads) and, under
#      pytest-xdist, "environment.workers" (each worker's device and CPU threads: its share of the machine's).
REPORT_SCHEMA_VERSION = 4
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
WRITE_INTERVAL_S = 2.0


@dataclasses.dataclass
class ResultRow:
    model: str
    backend: str
    precision: str
    device: str
    input_kind: str  # "hypothesis" or "natural-text"
    input_source: str
    weights: str
    tokenizer: str
    runtime: str
    gated: bool
    cosine_bar: float
    batches: int = 0
    samples: int = 0
    samples_below_bar: int = 0
    nonfinite_samples: int = 0
    nan_count: int = 0
    inf_count: int = 0
    padded_nonfinite: int = 0
    reference_failures: int = 0
    min_cosine: float = math.inf
    cosine_sum: float = 0.0
    finite_samples: int = 0
    max_abs_err: float = 0.0
    p99_abs_err: float = 0.0
    max_rel_err: float = 0.0
    shapes: list[list[int]] = dataclasses.field(default_factory=list)
    worst_failure: str | None = None
    partial: bool = False  # the run was interrupted while a test was adding to this row

    def add(self, result: FidelityResult) -> None:
        self.batches += 1
        self.samples += len(result.cosines)
        self.samples_below_bar += len(result.failing_samples)
        self.nonfinite_samples += result.nonfinite_samples
        self.nan_count += result.nan_count
        self.inf_count += result.inf_count
        self.padded_nonfinite += result.padded_nonfinite
        self.reference_failures += int(result.reference_failed)
        finite = [c for c in result.cosines if not math.isnan(c)]
        self.finite_samples += len(finite)
        self.cosine_sum += sum(finite)
        if finite:
            self.min_cosine = min(self.min_cosine, min(finite))
        self.max_abs_err = max(self.max_abs_err, result.max_abs_err)
        self.p99_abs_err = max(self.p99_abs_err, result.p99_abs_err)
        self.max_rel_err = max(self.max_rel_err, result.max_rel_err)
        shape = list(result.batch_shape)
        if shape not in self.shapes and len(self.shapes) < 64:
            self.shapes.append(shape)
        if not result.passed and self.worst_failure is None:
            self.worst_failure = result.failure_message()

    @property
    def mean_cosine(self) -> float:
        return self.cosine_sum / self.finite_samples if self.finite_samples else math.nan

    @property
    def nonfinite_rate(self) -> float:
        return self.nonfinite_samples / self.samples if self.samples else 0.0

    @property
    def meets_bar(self) -> bool:
        return self.samples_below_bar == 0 and self.nan_count + self.inf_count == 0 and not self.reference_failures

    @property
    def verdict(self) -> str:
        if self.partial:
            return "PARTIAL (interrupted)"
        if self.reference_failures:
            return "REF-ERROR"
        if self.gated:
            return "PASS" if self.meets_bar else "FAIL"
        return "measured" if self.meets_bar else "measured (below bar)"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResultRow":
        """A row read back from a report (or a worker's shard): the inverse of :meth:`as_dict`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        row = cls(**{k: v for k, v in data.items() if k in fields and k != "cosine_sum"})
        row.min_cosine = math.inf if data.get("min_cosine") is None else float(data["min_cosine"])
        mean = data.get("mean_cosine")
        row.cosine_sum = 0.0 if mean is None else float(mean) * row.finite_samples
        for name in ("max_abs_err", "p99_abs_err", "max_rel_err"):
            setattr(row, name, _as_float(data.get(name)))
        return row

    def merge(self, other: "ResultRow") -> None:
        """Fold in the same engine and input's results measured elsewhere (another pytest-xdist worker)."""
        for name in ("batches", "samples", "samples_below_bar", "nonfinite_samples", "nan_count", "inf_count",
                     "padded_nonfinite", "reference_failures", "finite_samples"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cosine_sum += other.cosine_sum
        self.min_cosine = min(self.min_cosine, other.min_cosine)
        for name in ("max_abs_err", "p99_abs_err", "max_rel_err"):
            setattr(self, name, max(getattr(self, name), getattr(other, name)))
        self.shapes += [s for s in other.shapes if s not in self.shapes][: max(0, 64 - len(self.shapes))]
        self.worst_failure = self.worst_failure or other.worst_failure
        self.partial = self.partial or other.partial

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("cosine_sum")
        data.update(
            min_cosine=None if math.isinf(self.min_cosine) else self.min_cosine,
            mean_cosine=None if math.isnan(self.mean_cosine) else self.mean_cosine,
            nonfinite_rate=self.nonfinite_rate,
            verdict=self.verdict,
        )
        return data


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, infinities the strings "inf"/"-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


class FidelityReport:
    def __init__(
        self,
        *,
        command: str,
        environment: dict[str, Any],
        options: dict[str, Any],
        path: Path | None,
        engines: dict[str, Any] | None = None,
        skipped: dict[str, str] | None = None,
    ) -> None:
        self.command = command
        self.environment = environment
        self.options = options
        self.path = path
        self.rows: dict[tuple[str, ...], ResultRow] = {}
        self.notes: list[str] = []
        # Shared with the engine factory: what was built (with its audit) and what was skipped.
        self.engines = engines if engines is not None else {}
        self.skipped = skipped if skipped is not None else {}
        self.cache: dict[str, Any] = {}
        self.interrupted = False
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self._last_write = 0.0
        self._open: set[tuple[str, ...]] = set()  # rows the test in progress has added to
        self._shard_data: dict[str, dict[str, Any]] = {}  # pytest-xdist: each worker's latest shard

    # -- pytest-xdist: each worker writes a shard, the controller merges them -----------------------
    def shard_path(self, worker: str) -> Path | None:
        return None if self.path is None else self.path.with_name(f"{self.path.name}.{worker}.part")

    @staticmethod
    def shard_worker(shard_name: str) -> str:
        """The worker (``gw3``) that wrote a shard named as :meth:`shard_path` names it."""
        return shard_name.rsplit(".", 2)[-2]

    def shards(self) -> list[Path]:
        return [] if self.path is None else sorted(self.path.parent.glob(f"{self.path.name}.*.part"))

    def absorb_shards(self, *, remove: bool = False) -> int:
        """Read every worker's shard (its latest snapshot) into this report; ``remove`` them once final.

        A worker rewrites its shard as results arrive (throttled, atomically), so an
        interrupted run still merges what each worker measured, and a worker's
        interruption marks the whole report.  Snapshots replace each other: reading
        twice never counts a row twice.
        """
        paths = self.shards()
        for path in paths:
            try:
                self._shard_data[path.name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # being replaced this instant: the previous snapshot stands
        for data in self._shard_data.values():
            self.engines.update(data.get("engines") or {})
            self.skipped.update(data.get("skipped") or {})
            for note in data.get("notes") or []:
                self.add_note(note)
            self.interrupted = self.interrupted or bool(data.get("interrupted"))
        if remove:
            for path in paths:
                path.unlink(missing_ok=True)
        return len(self._shard_data)

    def all_rows(self) -> list[ResultRow]:
        """This process's rows merged with the workers' (one row per engine, device and input source)."""
        if not self._shard_data:
            return list(self.rows.values())
        merged = {key: ResultRow.from_dict(row.as_dict()) for key, row in self.rows.items()}
        for data in self._shard_data.values():
            for row_data in data.get("rows", []):
                row = ResultRow.from_dict(row_data)
                key = (row.model, row.backend, row.precision, row.device, row.input_source)
                if key in merged:
                    merged[key].merge(row)
                else:
                    merged[key] = row
        return list(merged.values())

    def _environment_record(self) -> dict[str, Any]:
        """This process's environment; under pytest-xdist with each worker's device and CPU threads."""
        if not self._shard_data:
            return self.environment
        workers = {}
        for name, data in self._shard_data.items():
            env = data.get("environment") or {}
            workers[self.shard_worker(name)] = {"device": env.get("device"), "cpu_threads": env.get("cpu_threads")}
        return {**self.environment, "workers": dict(sorted(workers.items(), key=lambda kv: (len(kv[0]), kv[0])))}  # gw2 < gw10

    def _cache_record(self) -> dict[str, Any]:
        """The engine cache's events: this process's and each worker's."""
        record = dict(self.cache)
        workers = {name: data.get("engine_cache") or {} for name, data in self._shard_data.items()}
        if workers:
            record["events"] = list(record.get("events", [])) + [e for c in workers.values() for e in c.get("events", [])]
            record["workers"] = {name: c.get("summary") for name, c in workers.items()}
            record.setdefault("root", next((c.get("root") for c in workers.values() if c.get("root")), None))
            from engines.cache import describe_events

            record["summary"] = describe_events(record["root"], [(e["outcome"], e["seconds"]) for e in record["events"]],
                                                workers=len(workers))
        return record

    def cache_summary(self) -> str | None:
        """The engine cache line of the workers together (pytest-xdist), None without workers."""
        return self._cache_record().get("summary") if self._shard_data else None

    def add_note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def set_cache_events(self, cache) -> None:
        self.cache = {
            "root": str(cache.root),
            "summary": cache.summary(),
            "events": [dataclasses.asdict(e) for e in cache.events],
        }

    # -- progress of the test items ----------------------------------------------------
    def begin_item(self) -> None:
        self._open.clear()

    def end_item(self) -> None:
        self._open.clear()

    def mark_interrupted(self) -> None:
        """Ctrl-C: the rows of the unfinished test are partial; the report says it was interrupted."""
        self.interrupted = True
        for key in self._open:
            self.rows[key].partial = True
        self.write()

    def record(self, result: FidelityResult, *, input_kind: str, gated: bool) -> None:
        ctx = result.context
        key = (ctx.model, ctx.backend, ctx.precision, ctx.device, ctx.input_source)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = ResultRow(
                model=ctx.model,
                backend=ctx.backend,
                precision=ctx.precision,
                device=ctx.device,
                input_kind=input_kind,
                input_source=ctx.input_source,
                weights=ctx.weights,
                tokenizer=ctx.tokenizer,
                runtime=ctx.runtime,
                gated=gated,
                cosine_bar=result.tolerance.cosine_min,
            )
        self._open.add(key)
        row.add(result)
        self.write(throttle=True)

    # -- output --------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "started": self.started.isoformat(timespec="seconds"),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "interrupted": self.interrupted,
            "command": self.command,
            "environment": self._environment_record(),
            "options": self.options,
            "notes": self.notes,
            "rows": [row.as_dict() for row in self.all_rows()],
            "skipped": self.skipped,
            "engines": self.engines,
            "engine_cache": self._cache_record(),
        }

    def write(self, *, throttle: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if throttle and now - self._last_write < WRITE_INTERVAL_S:
            return
        self._last_write = now
        atomic_write_json(self.path, _json_safe(self.as_dict()), allow_nan=False, default=str)

    def table(self) -> str:
        rows = self.all_rows()
        if not rows:
            return "no fidelity results recorded"
        headers = (
            "model", "backend", "precision", "device", "input", "weights", "n",
            "min cos", "mean cos", "max|err|", "NaN/Inf", "verdict",
        )
        lines = []
        for row in rows:
            min_cos = "-" if math.isinf(row.min_cosine) else f"{row.min_cosine:.7f}"
            mean_cos = "-" if math.isnan(row.mean_cosine) else f"{row.mean_cosine:.7f}"
            weights = "random-init" if row.weights.startswith("random-init") else _short(row.weights.split("/")[-1], 22)
            nonfinite = f"{row.nan_count}/{row.inf_count}"
            if row.nonfinite_samples:
                nonfinite += f" ({100 * row.nonfinite_rate:.0f}% samples)"
            lines.append(
                (
                    row.model, row.backend, row.precision, row.device, _short(row.input_source, 40), weights,
                    str(row.samples), min_cos, mean_cos, f"{row.max_abs_err:.2e}", nonfinite, row.verdict,
                )
            )
        out = [render_table(headers, lines)]
        tokenizers = sorted({f"{r.model}: {r.tokenizer}" for r in rows})
        out.append("")
        out.append("tokenizers: " + "; ".join(tokenizers))
        out.extend(f"note: {n}" for n in self.notes)
        built_only = {e for e, info in self.engines.items() if info.get("runnable") is False}
        out.extend(f"built, not runnable here: {e} ({self.engines[e].get('mode')})" for e in sorted(built_only))
        out.extend(f"skipped {engine}: {reason}" for engine, reason in self.skipped.items() if engine not in built_only)
        if self.interrupted:
            out.append("INTERRUPTED: the run was stopped; rows marked PARTIAL hold what was measured before it")
        return "\n".join(out)


# -- Markdown from a stored report -------------------------------------------------------


def _as_float(value: Any) -> float:
    """Undo :func:`_json_safe` for numbers read back from a report."""
    return math.nan if value is None else float(value)


def _engine_summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold a report's rows (one per input source) into one line per engine."""
    engines: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["model"], row["backend"], row["precision"], row["device"])
        entry = engines.setdefault(
            key,
            {
                "model": row["model"],
                "backend": row["backend"],
                "precision": row["precision"],
                "device": row["device"],
                "weights": row["weights"],
                "runtime": row.get("runtime", ""),
                "samples": {"hypothesis": 0, "natural-text": 0},
                "min_cosine": {"hypothesis": None, "natural-text": None},
                "nan": 0,
                "inf": 0,
                "nonfinite_samples": 0,
                "max_abs_err": 0.0,
                "verdicts": set(),
                "gated": row["gated"],
            },
        )
        kind = row["input_kind"]
        entry["samples"][kind] += row["samples"]
        if row["min_cosine"] is not None:
            current = entry["min_cosine"][kind]
            entry["min_cosine"][kind] = row["min_cosine"] if current is None else min(current, row["min_cosine"])
        entry["nan"] += row["nan_count"]
        entry["inf"] += row["inf_count"]
        entry["nonfinite_samples"] += row["nonfinite_samples"]
        entry["max_abs_err"] = max(entry["max_abs_err"], _as_float(row["max_abs_err"]))
        entry["verdicts"].add(row["verdict"])
    for entry in engines.values():
        order = ("REF-ERROR", "FAIL", "PARTIAL (interrupted)", "measured (below bar)", "PASS", "measured")
        entry["verdict"] = next(v for v in order if v in entry["verdicts"])
    return list(engines.values())


def render_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    hardware = env.get("gpu_name") or env.get("cpu") or "cpu"
    if env.get("compute_capability"):
        hardware += f" (sm {env['compute_capability']}, driver {env.get('driver')}, CUDA {env.get('cuda_runtime')})"
    numerics = env.get("numerics", {}).get("name", "deterministic (recorded before numerics were recorded)")
    lines = [
        f"# Fidelity report ({data['options']['profile']} profile)",
        "",
        f"- command: `{data['command']}`",
        f"- hardware: {hardware}",
        f"- software: torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}",
        f"- numerics of the engines under test: {numerics}; the FP32 reference: deterministic kernels, TF32 off",
        f"- run: {data['started']} to {data['written']} (UTC), report schema {data['schema_version']}"
        + (" **(interrupted: rows marked PARTIAL are incomplete)**" if data.get("interrupted") else ""),
        f"- gated precisions: {', '.join(data['options']['gate_precisions'])}",
        "",
        "One line per engine; cosine is per sample against the FP32 reference (TF32 off), over valid positions.",
        "",
    ]

    def cos(value: float | None) -> str:
        return "-" if value is None else f"{value:.7f}"

    headers = (
        "model", "backend", "runtime", "precision", "weights", "samples (hyp/text)", "min cos hypothesis",
        "min cos text", "max abs err", "NaN/Inf", "verdict",
    )
    rows = []
    for e in _engine_summaries(data["rows"]):
        weights = "random-init" if e["weights"].startswith("random-init") else e["weights"]
        rows.append((
            e["model"], e["backend"], e["runtime"], e["precision"], weights,
            f"{e['samples']['hypothesis']}/{e['samples']['natural-text']}", cos(e["min_cosine"]["hypothesis"]),
            cos(e["min_cosine"]["natural-text"]), f"{e['max_abs_err']:.2e}", f"{e['nan']}/{e['inf']}", e["verdict"],
        ))
    lines.append(render_table(headers, rows, markdown=True))
    sources = sorted({r["input_source"] for r in data["rows"]})
    tokenizers = sorted({f"{r['model']}: {r['tokenizer']}" for r in data["rows"]})
    lines += ["", "Input sources: " + ", ".join(f"`{s}`" for s in sources), "", "Tokenizers:", ""]
    lines += [f"- {t}" for t in tokenizers]
    policies = data["options"].get("policies") or {}
    if policies:
        lines += ["", "Policy files:", ""]
        lines += [f"- `{name}`: {p['source']} (sha256 {p['sha256']})" for name, p in policies.items()]
    built_only = {e: info for e, info in (data.get("engines") or {}).items() if info.get("runnable") is False}
    if built_only:
        lines += ["", "Built, checked and cached, not runnable here:", ""]
        lines.append(render_table(
            ("engine", "runtime", "target", "build s", "parsed network (op class: dtype x layers)", "kernels",
             "problems", "blind spots"),
            [
                (
                    e, info.get("runtime", ""), info.get("target", ""), f"{info.get('build_seconds', 0):.1f}",
                    "; ".join(f"{c}: " + ", ".join(f"{d} x{n}" for d, n in per.items())
                              for c, per in (info.get("audit", {}).get("details", {}).get("network") or {}).items()),
                    ", ".join(f"{k} {n}" for k, n in (info.get("audit", {}).get("details", {}).get("kernels") or {}).items()),
                    str(len(info.get("audit", {}).get("problems", []))),
                    str(len(info.get("audit", {}).get("blind_spots", []))),
                )
                for e, info in built_only.items()
            ],
            markdown=True,
        ))
        reasons = sorted({info.get("not_runnable_because", "").split("not runnable here: ", 1)[-1] for info in built_only.values()})
        lines += ["", "Why not runnable here: " + " / ".join(f"`{r}`" for r in reasons)]
        blind = sorted({b for info in built_only.values() for b in info.get("audit", {}).get("blind_spots", [])})
        if blind:
            lines += ["", "What the checks could not see (blind spots, deduplicated; first 5):", ""]
            lines += [f"- {b}" for b in blind[:5]]
    if data.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in data["notes"]]
    skipped = {k: v for k, v in (data.get("skipped") or {}).items() if k not in built_only}
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {k}: {v}" for k, v in skipped.items()]
    return "\n".join(lines) + "\n"


def load_report(path: Path) -> dict[str, Any]:
    """A stored report, or ValueError naming what is wrong with the file."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist (or is not a file); pass the path a run's --fidelity-report wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not a JSON fidelity report ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise ValueError(
            f"{path}: schema_version {version!r} is not one of {READABLE_SCHEMA_VERSIONS}: not a fidelity report "
            "this version reads"
        )
    return data


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fidelity.report", description="Render a fidelity report JSON as Markdown")
    parser.add_argument("report", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        data = load_report(args.report)
    except ValueError as exc:
        parser.error(str(exc))
    write_or_print(render_markdown(data), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
