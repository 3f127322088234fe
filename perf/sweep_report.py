"""The sweep's report: CSV and JSON of every configuration, a Markdown report, PNG plots.

    python -m perf.sweep report DIR [-o OUTDIR]

The report's first table puts each published claim beside this project's measured number for the same
quantity, computed here from ``DIR/results.jsonl`` (never typed): the largest speedup over the CPU baseline and
where, the best batch-1 latency and which batch-1 shapes stay under 10 ms, the memory reduction of FP16 and
hybrid against FP32, the FP16/FP32 speedup range, and hybrid's minimum cosine and NaN/Inf count.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from engines.files import atomic_write_bytes, atomic_write_text
from engines.tables import render_table
from perf.sweep import RESULTS_FILE, SWEEP_SCHEMA_VERSION, ResultStore


class Claim(NamedTuple):
    text: str  # the claim, as the report's first column states it
    published: str  # the published number, as the report's second column states it
    target: Any  # what a measured number is checked against


# The published pipeline's claims (arXiv 2603.28708, abstract; its per-configuration tables are not public).
PUBLISHED = {
    "speedup": Claim("up to 64.4x over a CPU baseline", "64.4x", 64.4),
    "batch1": Claim("sub-10 ms latency at batch 1", "< 10 ms", 10.0),
    "memory": Claim("63% less memory", "63%", 0.63),
    "fp16": Claim("FP16/FP32 speedup 1.84-2.00x (A100)", "1.84-2.00x", (1.84, 2.00)),
    "hybrid": Claim("hybrid cosine >= 0.9998 against FP32, zero NaN", ">= 0.9998, 0 NaN", 0.9998),
}
CSV_COLUMNS = (
    "key", "engine", "model", "backend", "precision", "batch", "sequence", "status", "reason", "median_ms", "p90_ms",
    "p99_ms", "spread", "rounds", "sequences_per_s", "tokens_per_s", "peak_device_bytes", "first_call_s",
    "cpu_fp32_median_ms", "cpu_fp32_rounds", "speedup_over_cpu_fp32", "fidelity_source", "min_cosine", "mean_cosine",
    "nan", "inf", "device", "numerics", "measured_at",
)


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    fidelity = record.get("fidelity") or {}
    row = {k: record.get(k) for k in CSV_COLUMNS}
    row.update(fidelity_source=fidelity.get("source"), min_cosine=fidelity.get("min_cosine"),
               mean_cosine=fidelity.get("mean_cosine"), nan=fidelity.get("nan"), inf=fidelity.get("inf"))
    return row


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a written ``sweep.csv``, numbers as numbers (what the claims are computed from)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                if value == "":
                    parsed[key] = None
                elif key in ("batch", "sequence", "rounds", "cpu_fp32_rounds", "nan", "inf", "peak_device_bytes"):
                    parsed[key] = int(float(value))
                elif key in ("median_ms", "p90_ms", "p99_ms", "spread", "sequences_per_s", "tokens_per_s",
                             "first_call_s", "cpu_fp32_median_ms", "speedup_over_cpu_fp32", "min_cosine", "mean_cosine"):
                    parsed[key] = float(value)
                else:
                    parsed[key] = value
            rows.append(parsed)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    return buffer.getvalue()


# --- the claims -----------------------------------------------------------------------------------


def _measured(rows):
    return [r for r in rows if r["status"] == "measured"]


def fp32_twins(rows) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """The FP32 row of a row's model, backend and shape (None where there is none), as a lookup."""
    fp32 = {(r["model"], r["backend"], r["batch"], r["sequence"]): r for r in rows if r["precision"] == "fp32"}
    return lambda r: fp32.get((r["model"], r["backend"], r["batch"], r["sequence"]))


def claims(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """``(claim, published, measured here, holds?)`` rows, computed from the sweep's rows."""
    rows = _measured(rows)
    out = []
    claim = PUBLISHED["speedup"]
    speed = [r for r in rows if r.get("speedup_over_cpu_fp32")]
    if speed:
        best = max(speed, key=lambda r: r["speedup_over_cpu_fp32"])
        value = best["speedup_over_cpu_fp32"]
        out.append((claim.text, claim.published, f"{value:.1f}x ({best['engine']} b{best['batch']} s{best['sequence']})",
                    "holds" if value >= claim.target else "not reached"))
    else:
        out.append((claim.text, claim.published, "no CPU baseline measured", "not measured"))

    ones = [r for r in rows if r["batch"] == 1]
    if ones:
        best_per = {}
        for r in ones:
            key = (r["model"], r["sequence"])
            if key not in best_per or r["median_ms"] < best_per[key]["median_ms"]:
                best_per[key] = r
        claim = PUBLISHED["batch1"]
        under = [r for r in best_per.values() if r["median_ms"] < claim.target]
        fastest = min(ones, key=lambda r: r["median_ms"])
        slowest = max(best_per.values(), key=lambda r: r["median_ms"])
        verdict = "holds" if len(under) == len(best_per) else ("partly" if under else "does not hold")
        out.append((claim.text, claim.published,
                    f"best {fastest['median_ms']:.3f} ms ({fastest['engine']} s{fastest['sequence']}); "
                    f"{len(under)} of {len(best_per)} batch-1 (model, sequence) shapes under 10 ms with their best engine; "
                    f"slowest {slowest['median_ms']:.2f} ms ({slowest['engine']} s{slowest['sequence']})", verdict))

    fp32_of = fp32_twins(rows)
    reductions = {"fp16": [], "hybrid": []}
    ratios = []
    for r in rows:
        base = fp32_of(r)
        if base is None or r["precision"] not in reductions:
            continue
        if r.get("peak_device_bytes") and base.get("peak_device_bytes"):
            reductions[r["precision"]].append(1 - r["peak_device_bytes"] / base["peak_device_bytes"])
        if r["precision"] == "fp16":
            ratios.append(base["median_ms"] / r["median_ms"])
    claim = PUBLISHED["memory"]
    if any(reductions.values()):
        parts = [f"{p}: up to {max(v):.0%}, median {statistics.median(v):.0%}" for p, v in reductions.items() if v]
        best = max(max(v) for v in reductions.values() if v)
        out.append((claim.text, claim.published, "; ".join(parts), "holds" if best >= claim.target else "not reached"))
    else:
        why = ("no FP32 configuration to compare with" if any(r.get("peak_device_bytes") for r in rows)
               else "no device memory measured (CPU run)")
        out.append((claim.text, claim.published, why, "not measured"))
    if ratios:
        claim = PUBLISHED["fp16"]
        low, high = claim.target
        inside = sum(1 for x in ratios if low <= x <= high)
        out.append((claim.text, claim.published,
                    f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} shapes (median "
                    f"{statistics.median(ratios):.2f}x); {inside} inside {low:.2f}-{high:.2f}",
                    "holds" if inside == len(ratios) else ("partly" if inside else "outside the range")))
    hybrid = [r for r in rows if r["precision"] == "hybrid" and r.get("min_cosine") is not None]
    if hybrid:
        claim = PUBLISHED["hybrid"]
        worst = min(hybrid, key=lambda r: r["min_cosine"])
        nonfinite = sum((r.get("nan") or 0) + (r.get("inf") or 0) for r in hybrid)
        ok = worst["min_cosine"] >= claim.target and nonfinite == 0
        out.append((claim.text, claim.published,
                    f"min {worst['min_cosine']:.7f} ({worst['engine']} b{worst['batch']} s{worst['sequence']}); "
                    f"{nonfinite} NaN/Inf over {len(hybrid)} configurations", "holds" if ok else "does not hold"))
    return out


def comparability(runs: list[dict[str, Any]]) -> str:
    """Why the comparison is not like for like, from what the runs recorded."""
    env = runs[-1]["environment"] if runs else {}
    host = runs[-1].get("host", {}) if runs else {}
    gpu = env.get("gpu_name") or "no GPU (CPU run)"
    backends = sorted({b for r in runs for b in r["selection"]["backends"]})
    modes = sorted({r["selection"].get("compile_mode", "default") for r in runs})
    return (
        f"Not like for like: measured on {gpu} with PyTorch engines (backends {', '.join(backends)}"
        + (f"; torch.compile mode {', '.join(modes)}" if "torch-compile" in backends else "")
        + "), CPU baseline on "
        f"{host.get('cpu_model', '?')} with {host.get('cpu_threads', '?')} threads; the published numbers come from "
        "TensorRT engines on an RTX 3090 (main GPU, per the first author's profile) and an A100 (the abstract's "
        "cross-check) against a CPU baseline whose hardware is not published. bert-base and gpt2 carry random-init "
        "weights here unless a run says otherwise."
        + (" The FP32 engines ran with TF32 off (IEEE FP32 on the CUDA cores, as the FP32 reference), so FP16/FP32 "
           "and hybrid/FP32 ratios set tensor-core half precision against non-tensor-core FP32; with TF32 (an "
           "Ampere-or-later default in some stacks) the FP32 side would be faster and the ratios smaller."
           if any(r.get("numerics", {}).get("tf32") is False for r in runs) and gpu != "no GPU (CPU run)" else "")
    )


# --- plots ------------------------------------------------------------------------------------------


def plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _measured(rows)
    written = []

    def save(fig, name):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buffer.getvalue())
        written.append(name)

    models = sorted({r["model"] for r in rows})
    sequences = sorted({r["sequence"] for r in rows})
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        fig, axes = plt.subplots(1, len(sequences), figsize=(4 * len(sequences), 3.4), sharey=True, squeeze=False)
        for ax, seq in zip(axes[0], sequences):
            for engine in sorted({r["engine"] for r in mine}):
                points = sorted((r["batch"], r["median_ms"]) for r in mine if r["engine"] == engine and r["sequence"] == seq)
                if points:
                    ax.plot(*zip(*points), marker="o", label=engine.split("/", 1)[1])
            ax.set(title=f"seq {seq}", yscale="log", xlabel="batch")
            ax.set_xscale("log", base=2)
            ax.axhline(10, color="grey", lw=0.8, ls=":")
        axes[0][0].set_ylabel("median latency, ms")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{model}: latency vs batch (dotted: 10 ms)")
        save(fig, f"latency_vs_batch_{model}.png")

    speed = [r for r in rows if r.get("speedup_over_cpu_fp32")]
    if speed:
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
        for ax, model in zip(axes[0], models):
            for engine in sorted({r["engine"] for r in speed if r["model"] == model}):
                points = sorted((r["batch"] * r["sequence"], r["speedup_over_cpu_fp32"]) for r in speed if r["engine"] == engine)
                ax.plot(*zip(*points), marker=".", ls="", label=engine.split("/", 1)[1])
            ax.set(title=model, xscale="log", yscale="log", xlabel="tokens per batch", ylabel="speedup over CPU FP32")
            ax.legend(fontsize=7)
        save(fig, "speedup_over_cpu.png")

    memory = [r for r in rows if r.get("peak_device_bytes")]
    if memory:
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
        for ax, model in zip(axes[0], models):
            for engine in sorted({r["engine"] for r in memory if r["model"] == model}):
                points = sorted((r["batch"] * r["sequence"], r["peak_device_bytes"] / 2**20) for r in memory if r["engine"] == engine)
                ax.plot(*zip(*points), marker=".", label=engine.split("/", 1)[1])
            ax.set(title=model, xscale="log", yscale="log", xlabel="tokens per batch", ylabel="peak device memory, MiB")
            ax.legend(fontsize=7)
        save(fig, "memory_per_precision.png")

    fp32_of = fp32_twins(rows)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for precision in ("fp16", "hybrid"):
            points = sorted(
                (r["batch"] * r["sequence"], r["median_ms"] / fp32_of(r)["median_ms"])
                for r in rows
                if r["model"] == model and r["precision"] == precision and fp32_of(r) is not None
            )
            if points:
                ax.plot(*zip(*points), marker=".", ls="", label=f"{precision} / fp32")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set(title=model, xscale="log", xlabel="tokens per batch", ylabel="latency ratio (lower is faster)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no FP32 configuration to compare with", ha="center", transform=ax.transAxes)
    save(fig, "precision_latency_ratios.png")

    fidelity = [r for r in rows if r.get("min_cosine") is not None]
    if fidelity:
        engines = sorted({r["engine"] for r in fidelity})
        shapes = sorted({(r["batch"], r["sequence"]) for r in fidelity})
        grid = [[math.nan] * len(engines) for _ in shapes]
        for r in fidelity:
            grid[shapes.index((r["batch"], r["sequence"]))][engines.index(r["engine"])] = 1 - r["min_cosine"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(engines), 1.2 + 0.28 * len(shapes)))
        image = ax.imshow([[max(v, 1e-12) for v in row] for row in grid], aspect="auto", cmap="viridis",
                          norm=matplotlib.colors.LogNorm())
        ax.set_xticks(range(len(engines)), [e.replace("/", "\n", 1) for e in engines], fontsize=6)
        ax.set_yticks(range(len(shapes)), [f"b{b} s{s}" for b, s in shapes], fontsize=6)
        fig.colorbar(image, label="1 - min cosine (log)")
        ax.set_title("fidelity per shape and engine")
        save(fig, "fidelity_heatmap.png")
    return written


# --- writing -----------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], runs: list[dict[str, Any]], pictures: list[str], source: str) -> str:
    counts = Counter(r["status"] for r in rows)
    last = runs[-1] if runs else {}
    env = last.get("environment", {})
    lines = [
        "# Characterization sweep",
        "",
        f"Source: `{source}` ({len(rows)} configurations: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ").",
        f"Device: {env.get('gpu_name') or env.get('device', '?')}; torch {env.get('torch')}, numerics "
        f"{last.get('numerics', {}).get('name')}; commit {last.get('commit')}; runs: "
        + "; ".join(f"{r['started']} {r['status']} ({r['measured']} measured, {r['seconds']} s)" for r in runs) + ".",
        "",
        "## Published claims beside this project's numbers",
        "",
        render_table(("claim", "published", "measured here", "verdict"), claims(rows), markdown=True),
        "",
        comparability(runs),
        "",
    ]
    if pictures:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pictures] + [""]
    skipped = [r for r in rows if r["status"] != "measured"]
    if skipped:
        lines += ["## Not measured", ""]
        lines.append(render_table(("configuration", "status", "reason"),
                                  [(r["key"], r["status"], (r.get("reason") or "")[:160]) for r in skipped], markdown=True))
        lines.append("")
    lines += ["## Every configuration", ""]
    lines.append(render_table(
        ("engine", "b", "s", "median ms", "p99 ms", "spread", "tokens/s", "peak MiB", "first call s", "CPU FP32 ms",
         "speedup", "min cos", "NaN/Inf"),
        [
            (r["engine"], str(r["batch"]), str(r["sequence"]), f"{r['median_ms']:.3f}", f"{r['p99_ms']:.3f}",
             f"{r['spread']:.1%}", f"{r['tokens_per_s']:,.0f}",
             "-" if not r.get("peak_device_bytes") else f"{r['peak_device_bytes'] / 2**20:.0f}",
             f"{r['first_call_s']:.2f}", "-" if r.get("cpu_fp32_median_ms") is None else f"{r['cpu_fp32_median_ms']:.1f}",
             "-" if r.get("speedup_over_cpu_fp32") is None else f"{r['speedup_over_cpu_fp32']:.1f}x",
             "-" if r.get("min_cosine") is None else f"{r['min_cosine']:.7f}",
             "-" if r.get("nan") is None else f"{r['nan']}/{r['inf']}")
            for r in _measured(rows)
        ],
        markdown=True,
    ))
    return "\n".join(lines) + "\n"


def write_report(folder: Path, out: Path | None = None) -> list[Path]:
    out = out or folder
    store = ResultStore(folder)
    records = store.records()
    if not records:
        raise ValueError(f"{folder / RESULTS_FILE} holds no sweep results: run `python -m perf.sweep --out {folder}` first")
    runs = store.runs()
    rows = [flatten(r) for r in records]
    written = [
        atomic_write_text(out / "sweep.csv", to_csv(rows)),
        atomic_write_text(out / "sweep.json", json.dumps({"schema": SWEEP_SCHEMA_VERSION, "runs": runs, "results": records},
                                                        indent=1, default=str) + "\n"),
    ]
    csv_rows = read_csv(out / "sweep.csv")  # the report is made from the CSV, as a reader of the CSV would make it
    pictures = plots(csv_rows, out)
    written.append(atomic_write_text(out / "report.md", markdown(csv_rows, runs, pictures, str(folder / RESULTS_FILE))))
    return written + [out / p for p in pictures]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.sweep report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the --out folder of a sweep")
    parser.add_argument("-o", "--output", type=Path, help="write the report here (default: the sweep's folder)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folder, args.output)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    for path in written:
        print(path)
    return 0
