"""Fidelity results: one row per model x backend x precision x input source.

The same rows feed the terminal table and the JSON report.  The JSON is
rewritten atomically as results arrive, so an interrupted run keeps everything
measured up to that point.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fidelity.metrics import FidelityResult

# Version history of the JSON report:
#   1: first version (rows, environment, options, notes, audits).
#   2: rows carry the backend's runtime; "engines" (backend, runtime, provider,
#      graph dtypes, build seconds) and "engine_cache" (hits, builds) sections.
REPORT_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
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
        if self.reference_failures:
            return "REF-ERROR"
        if self.gated:
            return "PASS" if self.meets_bar else "FAIL"
        return "measured" if self.meets_bar else "measured (below bar)"

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
    def __init__(self, *, command: str, environment: dict[str, Any], options: dict[str, Any], path: Path | None) -> None:
        self.command = command
        self.environment = environment
        self.options = options
        self.path = path
        self.rows: dict[tuple[str, ...], ResultRow] = {}
        self.notes: list[str] = []
        self.audits: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.engines: dict[str, Any] = {}
        self.cache: dict[str, Any] = {}
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self._last_write = 0.0

    def add_note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def add_audit(self, engine: str, audit: dict[str, Any] | None) -> None:
        self.audits[engine] = audit

    def add_engine(self, engine: str, description: dict[str, Any]) -> None:
        self.engines[engine] = description

    def set_cache_events(self, cache) -> None:
        self.cache = {
            "root": str(cache.root),
            "summary": cache.summary(),
            "events": [dataclasses.asdict(e) for e in cache.events],
        }

    def add_skip(self, engine: str, reason: str) -> None:
        self.skipped[engine] = reason
        self.write(throttle=True)

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
        row.add(result)
        self.write(throttle=True)

    # -- output --------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "started": self.started.isoformat(timespec="seconds"),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
            "environment": self.environment,
            "options": self.options,
            "notes": self.notes,
            "rows": [row.as_dict() for row in self.rows.values()],
            "skipped": self.skipped,
            "engines": self.engines,
            "engine_cache": self.cache,
            "audits": self.audits,
        }

    def write(self, *, throttle: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if throttle and now - self._last_write < WRITE_INTERVAL_S:
            return
        self._last_write = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a crash mid-write leaves the previous report intact.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(_json_safe(self.as_dict()), handle, indent=2, allow_nan=False, default=str)
                handle.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def table(self) -> str:
        if not self.rows:
            return "no fidelity results recorded"
        headers = (
            "model", "backend", "precision", "device", "input", "weights", "n",
            "min cos", "mean cos", "max|err|", "NaN/Inf", "verdict",
        )
        lines = []
        for row in self.rows.values():
            min_cos = "-" if math.isinf(row.min_cosine) else f"{row.min_cosine:.7f}"
            mean_cos = "-" if math.isnan(row.mean_cosine) else f"{row.mean_cosine:.7f}"
            weights = "random-init" if row.weights.startswith("random-init") else _short(row.weights.split("/")[-1], 22)
            nonfinite = f"{row.nan_count}/{row.inf_count}"
            if row.nonfinite_samples:
                nonfinite += f" ({100 * row.nonfinite_rate:.0f}% samples)"
            lines.append(
                (
                    row.model,
                    row.backend,
                    row.precision,
                    row.device,
                    _short(row.input_source, 40),
                    weights,
                    str(row.samples),
                    min_cos,
                    mean_cos,
                    f"{row.max_abs_err:.2e}",
                    nonfinite,
                    row.verdict,
                )
            )
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
        out.extend(fmt.format(*line) for line in lines)
        tokenizers = sorted({f"{r.model}: {r.tokenizer}" for r in self.rows.values()})
        out.append("")
        out.append("tokenizers: " + "; ".join(tokenizers))
        out.extend(f"note: {n}" for n in self.notes)
        out.extend(f"skipped {engine}: {reason}" for engine, reason in self.skipped.items())
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
        order = ("REF-ERROR", "FAIL", "measured (below bar)", "PASS", "measured")
        entry["verdict"] = next(v for v in order if v in entry["verdicts"])
    return list(engines.values())


def render_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    hardware = env.get("gpu_name") or env.get("cpu") or "cpu"
    if env.get("compute_capability"):
        hardware += f" (sm {env['compute_capability']}, driver {env.get('driver')}, CUDA {env.get('cuda_runtime')})"
    lines = [
        f"# Fidelity report ({data['options']['profile']} profile)",
        "",
        f"- command: `{data['command']}`",
        f"- hardware: {hardware}",
        f"- software: torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}",
        f"- run: {data['started']} to {data['written']} (UTC), report schema {data['schema_version']}",
        f"- gated precisions: {', '.join(data['options']['gate_precisions'])}",
        "",
        "One line per engine; cosine is per sample against the FP32 reference (TF32 off), over valid positions.",
        "",
        "| model | backend | runtime | precision | weights | samples (hyp/text) | min cos hypothesis | min cos text | max abs err | NaN/Inf | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cos(value: float | None) -> str:
        return "-" if value is None else f"{value:.7f}"

    for e in _engine_summaries(data["rows"]):
        weights = "random-init" if e["weights"].startswith("random-init") else e["weights"]
        lines.append(
            f"| {e['model']} | {e['backend']} | {e['runtime']} | {e['precision']} | {weights} | "
            f"{e['samples']['hypothesis']}/{e['samples']['natural-text']} | {cos(e['min_cosine']['hypothesis'])} | "
            f"{cos(e['min_cosine']['natural-text'])} | {e['max_abs_err']:.2e} | {e['nan']}/{e['inf']} | {e['verdict']} |"
        )
    sources = sorted({r["input_source"] for r in data["rows"]})
    tokenizers = sorted({f"{r['model']}: {r['tokenizer']}" for r in data["rows"]})
    lines += ["", "Input sources: " + ", ".join(f"`{s}`" for s in sources), "", "Tokenizers:", ""]
    lines += [f"- {t}" for t in tokenizers]
    if data.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in data["notes"]]
    if data.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- {k}: {v}" for k, v in data["skipped"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Render a fidelity report JSON as Markdown")
    parser.add_argument("report", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    data = json.loads(args.report.read_text())
    if data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        parser.error(f"{args.report}: schema_version {data.get('schema_version')} is not one of {READABLE_SCHEMA_VERSIONS}")
    text = render_markdown(data)
    if args.output:
        args.output.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
