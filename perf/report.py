"""A readable report of one saved perf run: every engine with its hardware floor, and the targets.

    python -m perf.report baselines/<machine id>/<os-python>/0002_baseline.json -o results.md

Reads pytest-benchmark's own JSON (as saved with ``--benchmark-save``) and
writes Markdown: the targets of the latency gate with the best measured value
and its distance to the floor, then one row per engine and shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engines.backends.base import split_engine_name
from engines.files import write_or_print
from engines.models import get_spec
from engines.tables import render_table
from perf.roofline import GPU_PEAKS, GpuPeaks, forward_cost


@dataclasses.dataclass(frozen=True)
class Target:
    """A published or agreed latency target, checked against the best engine of a precision."""

    model: str
    precision: str
    shape: tuple[int, int]
    max_ms: float | None = None
    min_speedup_over_cpu: float | None = None
    relative_to: str | None = None  # "GPT-2 within 1.5x of BERT-base": the other model
    max_ratio: float | None = None

    def describe(self) -> str:
        b, s = self.shape
        if self.max_ms is not None:
            return f"{self.model} {self.precision} b{b} s{s} <= {self.max_ms:g} ms"
        if self.min_speedup_over_cpu is not None:
            return f"{self.model} {self.precision} b{b} s{s} >= {self.min_speedup_over_cpu:g}x over host CPU FP32"
        return f"{self.model} {self.precision} b{b} s{s} within {self.max_ratio:g}x of {self.relative_to}"


# The latency gate's targets for the best hybrid engine on an H100 (issue 4).
TARGETS = (
    Target("bert-base", "hybrid", (1, 128), max_ms=0.30),
    Target("bert-base", "hybrid", (32, 128), max_ms=1.2),
    Target("bert-base", "hybrid", (32, 512), max_ms=5.0),
    Target("gpt2", "hybrid", (1, 128), relative_to="bert-base", max_ratio=1.5),
    Target("gpt2", "hybrid", (32, 128), relative_to="bert-base", max_ratio=1.5),
    Target("gpt2", "hybrid", (32, 512), relative_to="bert-base", max_ratio=1.5),
    Target("bert-base", "hybrid", (1, 128), min_speedup_over_cpu=150.0),
)


@dataclasses.dataclass(frozen=True)
class Row:
    engine: str
    model: str
    backend: str
    precision: str
    shape: tuple[int, int]
    info: dict[str, Any]

    @property
    def median_ms(self) -> float:
        return float(self.info["median_ms"])


def load_rows(data: dict[str, Any]) -> list[Row]:
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if "engine" not in info:
            continue
        model, backend, precision = split_engine_name(info["engine"])
        rows.append(Row(info["engine"], model, backend, precision, (int(info["batch"]), int(info["sequence"])), info))
    return sorted(rows, key=lambda r: (r.model, r.backend, r.precision, r.shape))


def floor_ms(row: Row, peaks: GpuPeaks | None) -> float | None:
    if peaks is None:
        return None
    try:
        spec = get_spec(row.model)
    except ValueError:
        return None
    cost = forward_cost(spec.family, spec.config_kwargs, row.precision, *row.shape)
    return cost.floor_s(peaks, row.precision) * 1e3


def _best(rows: Iterable[Row], model: str, precision: str, shape: tuple[int, int]) -> Row | None:
    candidates = [r for r in rows if r.model == model and r.precision == precision and r.shape == shape]
    return min(candidates, key=lambda r: r.median_ms, default=None)


def _fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def target_lines(rows: list[Row], peaks: GpuPeaks | None) -> list[str]:
    headers = ("target", "best engine", "measured", "met", "floor", "measured / floor")
    lines: list[tuple[str, ...]] = []
    for target in TARGETS:
        best = _best(rows, target.model, target.precision, target.shape)
        if best is None:
            lines.append((target.describe(), "not measured", "-", "-", "-", "-"))
            continue
        floor = floor_ms(best, peaks)
        ratio = None if floor is None else best.median_ms / floor
        if target.max_ms is not None:
            measured, met = f"{best.median_ms:.3f} ms", best.median_ms <= target.max_ms
        elif target.min_speedup_over_cpu is not None:
            speedup = best.info.get("speedup_over_cpu_fp32")
            measured = _fmt(speedup, ".1f", "x")
            met = speedup is not None and speedup >= target.min_speedup_over_cpu
        else:
            other = _best(rows, target.relative_to or "", target.precision, target.shape)
            if other is None:
                lines.append((target.describe(), f"{target.relative_to} not measured", "-", "-", "-", "-"))
                continue
            relative = best.median_ms / other.median_ms
            measured = f"{relative:.2f}x ({best.median_ms:.3f} vs {other.median_ms:.3f} ms)"
            met = relative <= (target.max_ratio or 0)
        lines.append(
            (target.describe(), best.backend, measured, "yes" if met else "**no**", _fmt(floor, ".3f", " ms"),
             _fmt(ratio, ".1f", "x"))
        )
    return [render_table(headers, lines, markdown=True)]


def engine_lines(rows: list[Row], peaks: GpuPeaks | None) -> list[str]:
    headers = (
        "engine", "batch", "seq", "median ms", "p99 ms", "tokens/s", "peak MiB (allocator)", "device MiB (NVML)",
        "first call s", "CPU FP32 ms", "speedup vs CPU", "floor ms", "median / floor",
    )
    lines: list[tuple[str, ...]] = []
    for row in rows:
        info = row.info
        floor = floor_ms(row, peaks)
        peak = info.get("peak_device_bytes")
        nvml = info.get("device_used_bytes_nvml")
        lines.append((
            row.engine, str(row.shape[0]), str(row.shape[1]), f"{row.median_ms:.3f}", _fmt(info.get("p99_ms")),
            f"{info['tokens_per_s']:,.0f}", _fmt(peak and peak / 2**20, ".0f"), _fmt(nvml and nvml / 2**20, ".0f"),
            _fmt(info.get("first_call_s"), ".1f"), _fmt(info.get("cpu_fp32_median_ms"), ".1f"),
            _fmt(info.get("speedup_over_cpu_fp32"), ".1f", "x"), _fmt(floor),
            _fmt(None if floor is None else row.median_ms / floor, ".1f", "x"),
        ))
    return [render_table(headers, lines, markdown=True)]


def precision_lines(rows: list[Row]) -> list[str]:
    """FP16 and hybrid against FP32 on the same backend and shape: speed and peak memory."""
    headers = (
        "model", "backend", "batch", "seq", "fp32 ms", "fp16 speedup", "hybrid speedup", "fp16 memory vs fp32",
        "hybrid memory vs fp32",
    )
    lines: list[tuple[str, ...]] = []
    by_key = {(r.model, r.backend, r.precision, r.shape): r for r in rows}
    for (model, backend, precision, shape), fp32 in sorted(by_key.items()):
        if precision != "fp32":
            continue
        cells = []
        for other in ("fp16", "hybrid"):
            row = by_key.get((model, backend, other, shape))
            cells.append("-" if row is None else f"{fp32.median_ms / row.median_ms:.2f}x")
        for other in ("fp16", "hybrid"):
            row = by_key.get((model, backend, other, shape))
            base, mine = fp32.info.get("peak_device_bytes"), row and row.info.get("peak_device_bytes")
            cells.append("-" if not (base and mine) else f"{(mine - base) / base:+.0%}")
        lines.append((model, backend, str(shape[0]), str(shape[1]), f"{fp32.median_ms:.3f}", *cells))
    return [render_table(headers, lines, markdown=True)]


def render(data: dict[str, Any], *, source: str) -> str:
    facts = (data.get("machine_info") or {}).get("fidelity_suite") or {}
    gpu = facts.get("gpu")
    peaks = GPU_PEAKS.get(gpu) if gpu else None
    rows = load_rows(data)
    out = [
        f"# Latency and memory: {facts.get('machine_id', 'unknown machine')}",
        "",
        f"Source: `{source}` ({data.get('datetime', 'no date')}); "
        + ", ".join(f"{k} {facts[k]}" for k in ("gpu", "driver", "cuda", "torch", "transformers", "tensorrt") if facts.get(k)),
        "",
        "Medians of the benchmark rounds (synchronized wall clock, after warm-up). *Floor*: the larger of "
        "(GEMM weights + FP32 output) / memory bandwidth and (GEMM + attention FLOPs) / dense matrix peak "
        "(FP32 without TF32 for fp32), see perf/roofline.py"
        + (f"; peaks from {peaks.source}." if peaks else "; no peak figures for this device, so no floors."),
        "",
        "## Targets",
        "",
        *target_lines(rows, peaks),
        "",
        "## Every engine",
        "",
        *engine_lines(rows, peaks),
        "",
        "## Precision: speedup and peak memory against FP32 (same backend, same shape)",
        "",
        *precision_lines(rows),
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.report", description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_json", type=Path, help="a pytest-benchmark JSON saved by `pytest -m perf --benchmark-save`")
    parser.add_argument("-o", "--output", type=Path, help="write Markdown here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.benchmark_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"cannot read {args.benchmark_json}: {exc}")
    if not load_rows(data):
        parser.error(f"{args.benchmark_json} holds no perf results of this suite (no benchmark with extra_info.engine)")
    text = render(data, source=str(args.benchmark_json))
    write_or_print(text, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
