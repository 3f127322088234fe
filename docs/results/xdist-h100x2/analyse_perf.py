"""The benchmarks on one 2-GPU host, in one process and with -n 2 (perf.sh): what the two runs' results say.

    python docs/results/xdist-h100x2/analyse_perf.py docs/results/xdist-h100x2/perf > docs/results/xdist-h100x2/perf/analysis.txt
    python docs/results/xdist-h100x2/analyse_perf.py docs/results/xdist-h100x2/perf/before-shared-cpu > docs/results/xdist-h100x2/perf/before-shared-cpu/analysis.txt
    python docs/results/xdist-h100x2/analyse_perf.py docs/results/xdist-h100x2/perf/no-cpu-baseline > docs/results/xdist-h100x2/perf/no-cpu-baseline/analysis.txt

Reads FOLDER/{times.txt, serial.json, xdist.json} (pytest-benchmark's --benchmark-json of each run) and, when
there, compare.log (the -n 2 run gated against the serial run's saved baseline). Prints the wall times; each
benchmark's GPU median in both runs and their ratio, with the worker and GPU that timed it under -n 2; the CPU
FP32 medians each run set its results against, per (model, shape) and worker; the GPU locks' holds (each
GPU's timed spans apart, and how long the two GPUs timed at once) and, where recorded, the CPU lock's waits; the compare run's verdicts.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import re
from pathlib import Path


def benchmarks(path: Path) -> dict[str, dict]:
    return {b["fullname"]: b["extra_info"] for b in json.loads(path.read_text())["benchmarks"]}


def shape_of(info: dict) -> str:
    return f"b{info['batch']} s{info['sequence']}"


def overlap_s(a: dict, b: dict) -> float:
    return max(0.0, min(a["released"], b["released"]) - max(a["acquired"], b["acquired"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    out = [line for line in (folder / "times.txt").read_text().splitlines() if line.strip()]
    serial, xdist = benchmarks(folder / "serial.json"), benchmarks(folder / "xdist.json")
    out.append(f"benchmarks: {len(serial)} in one process, {len(xdist)} under -n 2, the same names: {set(serial) == set(xdist)}")

    out.append("GPU median (ms): one process, -n 2 (worker, GPU), ratio -n 2 / one process")
    ratios = []
    for name, one in serial.items():
        two = xdist[name]
        ratio = two["median_ms"] / one["median_ms"]
        ratios.append(ratio)
        out.append(f"  {one['engine']:34} {shape_of(one):9} {one['median_ms']:9.3f} {two['median_ms']:9.3f} "
                   f"({two['worker']} cuda:{two['gpu_index']})  {ratio:.3f}")
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    out.append(f"  ratio: geometric mean {geomean:.3f}, lowest {min(ratios):.3f}, highest {max(ratios):.3f}")
    per_gpu = collections.Counter((info["worker"], info["gpu_index"]) for info in xdist.values())
    out.append("  timed under -n 2 by: " + ", ".join(f"{w} cuda:{g} {n}" for (w, g), n in sorted(per_gpu.items())))

    out.append("CPU FP32 medians (ms) per model and shape: one process | -n 2, per worker that used it "
               "(measured by, where the run records it)")
    cpu: dict[str, dict[str, set]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for run, results in (("one process", serial), ("-n 2", xdist)):
        for info in results.values():
            if info.get("cpu_fp32_median_ms") is None:
                continue
            key = f"{info['engine'].split('/')[0]} {shape_of(info)}"
            who = "" if run == "one process" else f" {info['worker']}"
            by = info.get("cpu_fp32_measured_by")
            cpu[key][run].add(f"{info['cpu_fp32_median_ms']:.1f}{who}" + (f" (by {by})" if by else ""))
    inconsistent = 0
    for key, runs in cpu.items():
        medians = {value.split()[0] for value in runs["-n 2"]}
        inconsistent += len(medians) > 1
        out.append(f"  {key:16} {', '.join(sorted(runs['one process']))} | {', '.join(sorted(runs['-n 2']))}")
    out.append(f"  (model, shape)s with more than one CPU median under -n 2: {inconsistent} of {len(cpu)}")

    holds = collections.defaultdict(list)
    for info in xdist.values():
        holds[info["device_lock"]["key"]].append(info["device_lock"])
    same = sum(overlap_s(a, b) > 0 for spans in holds.values() for a, b in itertools.combinations(spans, 2))
    both = sum(overlap_s(a, b) for a, b in itertools.product(*holds.values())) if len(holds) == 2 else 0.0
    waits = max(hold["waited_s"] for spans in holds.values() for hold in spans)
    out.append(f"GPU locks under -n 2: {len(holds)} GPUs; overlapping timed spans on one GPU: {same}; "
               f"seconds the two GPUs timed at once: {both:.1f}; longest wait for a GPU's lock: {waits:.3f} s")
    for run, results in (("one process", serial), ("-n 2", xdist)):
        spans = [info["device_lock"] for info in results.values()]
        timed = sum(hold["released"] - hold["acquired"] for hold in spans)
        first_to_last = max(hold["released"] for hold in spans) - min(hold["acquired"] for hold in spans)
        out.append(f"  {run}: {timed:.1f} s timed, from the first timing's start to the last's end {first_to_last:.1f} s")
    cpu_holds = [(info["worker"], info["cpu_fp32_lock"]) for info in xdist.values() if info.get("cpu_fp32_lock")]
    if not any("cpu_fp32_lock" in info for info in xdist.values()):
        out.append("CPU lock under -n 2: not recorded by this run (cpu_fp32_lock came later)")
    elif not cpu_holds:
        out.append("CPU lock under -n 2: no CPU FP32 baseline in this run")
    else:
        waited = collections.defaultdict(float)
        for worker, hold in cpu_holds:
            waited[worker] += hold["waited_s"]
        out.append(f"CPU lock under -n 2: {len(cpu_holds)} holds; seconds waited for it: "
                   + ", ".join(f"{w} {s:.1f}" for w, s in sorted(waited.items())))

    compare = folder / "compare.log"
    if compare.exists():
        text = compare.read_text()
        verdicts = collections.Counter(re.findall(r"^gw\d cuda:\d .*?  (\S+(?:, \S+)*)\s*$", text, re.M))
        out.append("compare under -n 2 against the one-process run's baseline: verdicts "
                   + ", ".join(f"{v}: {n}" for v, n in sorted(verdicts.items())))
        aggregate = re.search(r"^suite aggregate .*$", text, re.M)
        out.append(f"  {aggregate.group(0) if aggregate else 'no suite aggregate line'}")
        out.append(f"  {text.strip().splitlines()[-1].strip('= ')}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
