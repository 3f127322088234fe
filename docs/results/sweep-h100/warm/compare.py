"""The warm one-call sweep (this folder, --compile-mode regional) beside the cold sweep (../full, mode default).

    python docs/results/sweep-h100/warm/compare.py > docs/results/sweep-h100/warm/compare.txt
"""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measured(path):
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines()) if r["status"] == "measured"}


def spread(values, fmt="{:.2f}"):
    return f"median {fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


warm, cold, prime = measured(HERE / "results.jsonl"), measured(HERE.parent / "full" / "results.jsonl"), measured(HERE / "prime" / "results.jsonl")
run = json.loads((HERE / "runs.jsonl").read_text().splitlines()[-1])
print(f"warm run: {run['measured']} configurations in {run['seconds']} s, of which the CPU FP32 baseline "
      f"{run['cpu_baseline_seconds']} s ({run['options']['cpu_rounds']} rounds + 1 warm-up per shape)")
print(f"torch-compile first call per shape, s: cold regional (prime/) {spread([r['first_call_s'] for r in prime.values()])}, "
      f"sum {sum(r['first_call_s'] for r in prime.values()):.0f}; warm regional "
      f"{spread([r['first_call_s'] for r in warm.values() if r['backend'] == 'torch-compile'])}, sum "
      f"{sum(r['first_call_s'] for r in warm.values() if r['backend'] == 'torch-compile'):.0f}; cold default (../full) "
      f"{spread([r['first_call_s'] for r in cold.values() if r['backend'] == 'torch-compile'])}, sum "
      f"{sum(r['first_call_s'] for r in cold.values() if r['backend'] == 'torch-compile'):.0f}")
print("median latency, this run / ../full, per engine over its 30 shapes:")
for engine in dict.fromkeys(r["engine"] for r in warm.values()):
    keys = [k for k in warm if warm[k]["engine"] == engine]
    print(f"  {engine}: {spread([warm[k]['median_ms'] / cold[k]['median_ms'] for k in keys])}")
# ../full measured the CPU baseline again in each of its five calls: a shape's rows there can carry different
# medians, so each row is compared with its own (speedup over CPU = CPU median / engine median).
print("CPU FP32 baseline, the same row's median in ../full / this run's (above 1: ../full's speedups over CPU inflated), per engine:")
for engine in dict.fromkeys(r["engine"] for r in warm.values()):
    keys = [k for k in warm if warm[k]["engine"] == engine]
    print(f"  {engine}: {spread([cold[k]['cpu_fp32_median_ms'] / warm[k]['cpu_fp32_median_ms'] for k in keys])}")
for model in ("bert-base", "gpt2"):
    keys = [k for k in warm if warm[k]["model"] == model]
    print(f"  all {model} rows: {spread([cold[k]['cpu_fp32_median_ms'] / warm[k]['cpu_fp32_median_ms'] for k in keys])}")
second = json.loads((HERE / "second-attempt" / "runs.jsonl").read_text().splitlines()[-1])["cpu_fp32_median_ms"]
print("CPU FP32 baseline, second-attempt/'s median / this run's (both measured first, alone; two hosts of one kind):")
for model in ("bert-base", "gpt2"):
    print(f"  {model}: {spread([second[k] / ms for k, ms in run['cpu_fp32_median_ms'].items() if k.startswith(model + ' ')])}")
print("peak device memory, this run / ../full, per engine over its 30 shapes; then the 30 ratios in measuring order:")
for engine in dict.fromkeys(r["engine"] for r in warm.values()):
    keys = [k for k in warm if warm[k]["engine"] == engine]
    ratios = [warm[k]["peak_device_bytes"] / cold[k]["peak_device_bytes"] for k in keys]
    print(f"  {engine}: {spread(ratios)}")
    print("    " + " ".join(f"{r:.2f}" for r in ratios))
# An engine's peak memory grows with the shape: a bigger batch or sequence needing clearly less (over 3% + 8 MiB)
# than a smaller one is a measuring error (the cycles and the collection engines/memory.py describes).
print("peak memory below that of a smaller shape of the same engine (2x batch or 2x sequence; > 3% + 8 MiB less):")
for name, rows in (("../full", cold), ("second-attempt/", measured(HERE / "second-attempt" / "results.jsonl")),
                   ("this run", warm)):
    bad = []
    for engine in dict.fromkeys(r["engine"] for r in rows.values()):
        mib = {(r["batch"], r["sequence"]): r["peak_device_bytes"] / 2**20 for r in rows.values() if r["engine"] == engine}
        bad += [f"{engine} b{b}s{s} {v:.0f} -> b{b2}s{s2} {mib[b2, s2]:.0f} MiB" for (b, s), v in mib.items()
                for b2, s2 in ((2 * b, s), (b, 2 * s)) if (b2, s2) in mib and mib[b2, s2] < 0.97 * v - 8]
    print(f"  {name}: {len(bad)} such pairs over {len(rows)} configurations" + "".join(f"\n    {line}" for line in bad))
