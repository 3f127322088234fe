"""Compare two saved perf runs item by item, outside pytest: latency ratio with significance, memory ratio.

    python -m perf.compare BASELINE.json CANDIDATE.json [-o table.md]

What the gate does inside a run, for two runs already on disk: two settings of one
stack (``--numerics deterministic`` against ``production``, say), or two sessions.
Unlike the gate it refuses nothing: the facts that differ between the two runs
(machine, numerics, versions) are printed above the table instead, because showing
what a difference in them costs is what this command is for.  Items present in
only one run are listed, not compared.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engines.files import write_or_print
from engines.tables import render_table
from perf.baselines import read_run
from perf.stats import (
    DEFAULT_ALPHA,
    DEFAULT_MEMORY_THRESHOLD,
    DEFAULT_THRESHOLD,
    Comparison,
    compare_memory,
    compare_samples,
    suite_aggregate,
)

FACT_KEYS = ("machine_id", "numerics", "gpu", "driver", "cuda", "torch", "transformers", "onnxruntime", "tensorrt")


def load_run(path: Path) -> dict[str, Any]:
    data = read_run(path)
    if not data.get("benchmarks"):
        raise ValueError(f"{path} holds no benchmarks: not a run saved with pytest --benchmark-save")
    return data


def compare_runs(
    baseline: dict[str, Any],
    candidate: dict[str, Any],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    memory_threshold: float = DEFAULT_MEMORY_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
) -> tuple[list[tuple[str, Comparison, Comparison | None]], list[str]]:
    """``[(engine and shape, latency, memory or None)]`` for items in both runs, and the names in only one."""
    base = {b["fullname"]: b for b in baseline["benchmarks"]}
    cand = {b["fullname"]: b for b in candidate["benchmarks"]}
    compared = []
    for name in sorted(set(base) & set(cand)):
        b, c = base[name], cand[name]
        info = c.get("extra_info", {})
        label = f"{info.get('engine', name)} b{info.get('batch')} s{info.get('sequence')}"
        latency = compare_samples(label, c["stats"]["data"], b["stats"]["data"], threshold=threshold, alpha=alpha)
        b_mem, c_mem = b.get("extra_info", {}).get("peak_device_bytes"), info.get("peak_device_bytes")
        memory = compare_memory(label, c_mem, b_mem, threshold=memory_threshold) if b_mem and c_mem else None
        compared.append((label, latency, memory))
    only = sorted(set(base) ^ set(cand))
    return compared, only


def render(baseline_path: Path, candidate_path: Path, baseline: dict, candidate: dict, **kwargs: Any) -> str:
    compared, only = compare_runs(baseline, candidate, **kwargs)
    facts = [(k, (baseline.get("machine_info") or {}).get("fidelity_suite", {}).get(k),
              (candidate.get("machine_info") or {}).get("fidelity_suite", {}).get(k)) for k in FACT_KEYS]
    lines = [
        f"Baseline `{baseline_path.name}` ({baseline.get('datetime')}), candidate `{candidate_path.name}` "
        f"({candidate.get('datetime')}).",
        "",
        render_table(("fact", "baseline", "candidate"), [(k, str(a), str(b) + (" **(differs)**" if a != b else ""))
                                                       for k, a, b in facts], markdown=True),
        "",
        "Per item: candidate / baseline median latency, two-sided Mann-Whitney U p-value, the larger IQR/median "
        "of the two runs, the gate's verdict at the given threshold; peak device memory likewise.",
        "",
    ]
    rows = [
        (
            label,
            f"{lat.baseline_median * 1e3:.3f}",
            f"{lat.candidate_median * 1e3:.3f}",
            f"{lat.ratio:.3f}",
            f"{lat.p_value:.2g}",
            f"{lat.spread:.1%}",
            lat.verdict,
            "-" if mem is None else f"{mem.baseline_median / 2**20:.1f}",
            "-" if mem is None else f"{mem.candidate_median / 2**20:.1f}",
            "-" if mem is None else f"{mem.ratio:.3f} {mem.verdict}",
        )
        for label, lat, mem in compared
    ]
    lines.append(render_table(
        ("item", "baseline ms", "candidate ms", "ratio", "p", "spread", "latency verdict", "baseline MiB",
         "candidate MiB", "memory ratio"),
        rows,
        markdown=True,
    ))
    aggregate = suite_aggregate([lat for _, lat, _ in compared])
    lines += ["", aggregate.message() + "."]
    if only:
        lines += ["", f"In one run only ({len(only)}): " + ", ".join(f"`{n}`" for n in only)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.compare", description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="latency effect that a verdict needs")
    parser.add_argument("--memory-threshold", type=float, default=DEFAULT_MEMORY_THRESHOLD, help="memory growth that fails")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level")
    parser.add_argument("-o", "--output", type=Path, help="write Markdown here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        baseline, candidate = load_run(args.baseline), load_run(args.candidate)
    except ValueError as exc:
        parser.error(str(exc))
    text = render(args.baseline, args.candidate, baseline, candidate, threshold=args.threshold,
                  memory_threshold=args.memory_threshold, alpha=args.alpha)
    write_or_print(text, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
