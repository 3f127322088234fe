"""One summary of a folder of ``python -m fidelity.instability`` results, generated from their JSON.

``python -m fidelity.instability summary DIR`` reads, for every ``DIR/<model>-<weights>/``, what the
subcommands wrote there (``activations.json``, ``nan_rates.json``, ``downstream.json``,
``trace.json``, ``search/search.json`` and a ``fidelity-*.json`` report of the found policy) and
writes ``DIR/summary.md``: six tables, each a projection of those files, nothing typed.  A test
regenerates the committed summary from the committed JSON and compares.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from engines.tables import render_table

TEXT, RANDOM = "text", "random"


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _runs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and "-" in p.name and (p / "nan_rates.json").is_file())


def _nan_rows(run: Path) -> list[tuple]:
    """Per engine: text and random counts, the worst stress source, and the text/random ratio of samples below the
    bar, recomputed from the counts (fidelity.nan_rates.ratio), so the statistic is the code's, not the file's."""
    from fidelity.nan_rates import Rate, ratio

    rates = _load(run / "nan_rates.json") or []
    by = {(r["engine"], r["source"]): r for r in rates if "source" in r}
    rows = []
    for engine in dict.fromkeys(r["engine"] for r in rates if "source" in r):
        text, rnd = by.get((engine, TEXT)), by.get((engine, RANDOM))
        stress = [r for (e, s), r in by.items() if e == engine and s.startswith("stress")]
        worst = max(stress, key=lambda r: (r.get("below_bar") or 0) / r["samples"], default=None)

        def cell(r, k):
            return "-" if r is None or r.get(k) is None else f"{r[k]}/{r['samples']}"

        verdict = "-"
        if text and rnd and text.get("below_bar") is not None and rnd.get("below_bar") is not None:
            found = ratio(*(Rate(r["source"], r["samples"], r["nonfinite_output"], None, 0, r["below_bar"])
                            for r in (text, rnd)), of="below_bar")
            verdict = f"{_fmt(found.ratio, 3)} [{_fmt(found.low, 3)}, {_fmt(found.high, 3)}] {found.verdict}"
        rows.append((run.name, engine.split("/")[-1], cell(text, "nonfinite_output"), cell(rnd, "nonfinite_output"),
                     cell(text, "below_bar"), cell(rnd, "below_bar"),
                     "-" if not worst or not worst.get("below_bar") else
                     f"{worst['source']} {worst['below_bar']}/{worst['samples']}", verdict))
    return rows


def _downstream_rows(run: Path) -> list[tuple]:
    found = _load(run / "downstream.json")
    if not found:
        return []
    return [(run.name, a["engine"].split("/")[-1], _fmt(a["label_agreement"]), _fmt(a["nearest_neighbour_agreement"]),
             _fmt(a["similarity_spearman"], 6), _fmt(a["next_token_agreement"]), _fmt(a["mean_kl"], 3),
             _fmt(a.get("accuracy")), _fmt(a.get("perplexity")))
            for a in found["agreement"]]


def _trace_rows(run: Path) -> list[tuple]:
    traces = _load(run / "trace.json") or []
    rows = []
    for engine in dict.fromkeys(t["engine"] for t in traces):
        mine = [t for t in traces if t["engine"] == engine]
        failing = [t for t in mine if t["first_below_bar"] or t["first_nonfinite"]]
        firsts = sorted({t["first_below_bar"] for t in failing if t["first_below_bar"]})
        worst = min((b["min_cosine"] for t in mine for b in t["blocks"] if b["min_cosine"] == b["min_cosine"]),
                    default=math.nan)
        rows.append((run.name, engine.split("/")[-1], f"{len(failing)}/{len(mine)}",
                     ", ".join(firsts) or "-", sum(1 for t in failing if t["first_nonfinite"]), _fmt(worst, 7)))
    return rows


def _search_rows(run: Path) -> list[tuple]:
    found = _load(run / "search" / "search.json")
    if not found:
        return []
    path = found["path"]
    start = path[0]
    final = next((c for c in reversed(path) if c["stage"] != "published hybrid"
                  and sorted(c["keeps"]) == sorted(found["keeps"])), None)
    hybrid = next((c for c in path if c["stage"] == "published hybrid"), None)
    ms = lambda c: "-" if c is None or c["latency_ms"] is None else f"{c['latency_ms']:.2f}"  # noqa: E731
    return [(run.name, found["start"], ", ".join(found["keeps"]) or "nothing", len(path) - (hybrid is not None),
             _fmt(start["min_cosine"], 7), "-" if final is None else _fmt(final["min_cosine"], 7),
             "-" if hybrid is None else _fmt(hybrid["min_cosine"], 7), ms(start), ms(final), ms(hybrid))]


def _pytest_rows(run: Path) -> list[tuple]:
    rows = []
    for report in sorted(run.glob("fidelity-*.json")):
        data = _load(report)
        for r in data["rows"]:
            rows.append((run.name, r["backend"], r["precision"], r["input_source"], r["samples"],
                         _fmt(r["min_cosine"], 7), f"{r['nan_count']}/{r['inf_count']}", r["verdict"]))
    return rows


def _activation_rows(run: Path) -> list[tuple]:
    found = _load(run / "activations.json")
    if not found:
        return []
    blocks = found["inputs"][0]["blocks"]
    peak = max(blocks, key=lambda b: b["top"][0]["value"])
    top = peak["top"][0]
    rows = [(run.name, found["inputs"][0]["input"], f"{top['value']:.4g} (dim {top['dim']} @ {top['position']}, "
             f"block {peak['layer']})", _fmt(peak["median"], 3), _fmt(max(b["ffn_top1"] for b in blocks), 4),
             "; ".join(f"{c['quantity']} b{c['layer']}: {_fmt(c['planted'], 4)} vs {_fmt(c['published'], 4)} "
                       f"({c['status']})" for c in found.get("published", [])) or "-")]
    return rows


def summarize(folder: Path) -> str:
    runs = _runs(folder)
    if not runs:
        raise FileNotFoundError(f"{folder} has no <model>-<weights>/nan_rates.json: run the instability commands first")
    collect = lambda make: [row for run in runs for row in make(run)]  # noqa: E731
    sections = [
        ("Planted and measured outliers (activations)",
         "The largest |residual| of the FP32 model on natural text, its median, the largest FFN output, and each "
         "published statistic of the stress recipe beside this model's (status: paper, secondary, assumed).",
         ("run", "input", "largest |residual|", "median", "FFN top-1", "published vs this model"), collect(_activation_rows)),
        ("Non-finite and below-the-bar samples by input source (nan-rates)",
         "Samples with any NaN/Inf output, and samples below the cosine bar, on natural text and on random ids; the "
         "stress source with the most samples below the bar; the text/random ratio of samples below the bar "
         "(95% interval, Katz) and the verdict on 'random inputs underestimate the failure rate'.",
         ("run", "precision", "text NaN/Inf", "random NaN/Inf", "text below bar", "random below bar", "worst stress",
          "text/random below bar"), collect(_nan_rows)),
        ("First divergence (trace)",
         "Per engine: input batches with a block below the bar or non-finite, the first such blocks, how many went "
         "non-finite, and the lowest block cosine seen.",
         ("run", "precision", "failing batches", "first block below the bar", "non-finite", "lowest block cosine"),
         collect(_trace_rows)),
        ("The smallest FP32-keep policy (search), beside the published hybrid",
         "Delta debugging from the start policy; candidates tried; min cosine over the search's inputs and latency "
         "(ms, median, the first input batch) of the start, the found and the published hybrid policy.",
         ("run", "start", "kept in FP32", "candidates", "start min cos", "found min cos", "hybrid min cos",
          "start ms", "found ms", "hybrid ms"), collect(_search_rows)),
        ("The found policy under `pytest -m fidelity`",
         "The fidelity tests' own report of the found policy file and the published hybrid, per backend and input.",
         ("run", "backend", "precision", "input", "samples", "min cos", "NaN/Inf", "verdict"), collect(_pytest_rows)),
        ("Downstream agreement with FP32",
         "SST-2 sentences: seeded-head label agreement, nearest-neighbour agreement and similarity Spearman (BERT "
         "family), next-token agreement and mean KL (GPT-2); accuracy (a fine-tuned classifier's head) and perplexity "
         "(checkpoint weights) where the run had them.",
         ("run", "precision", "label", "nearest neighbour", "Spearman", "next token", "mean KL", "accuracy",
          "perplexity"),
         collect(_downstream_rows)),
    ]
    lines = [f"# Numerical instability: summary of {folder.name}", "",
             "Generated by `python -m fidelity.instability summary` from the JSON in this folder; weights per run: "
             + "; ".join(f"{run.name}: {(_load(run / 'nan_rates.json') or [{}])[0].get('weights', '?')}" for run in runs),
             ""]
    for title, text, headers, rows in sections:
        lines += [f"## {title}", "", text, "", render_table(headers, rows, markdown=True) if rows else "(none)", ""]
    return "\n".join(lines)
