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
cpu = {(r["model"], r["batch"], r["sequence"]): r["cpu_fp32_median_ms"] for r in warm.values()}
cpu_cold = {(r["model"], r["batch"], r["sequence"]): r["cpu_fp32_median_ms"] for r in cold.values()}
for model in ("bert-base", "gpt2"):
    print(f"CPU FP32 baseline, this run / ../full, {model}: {spread([cpu[k] / cpu_cold[k] for k in cpu if k[0] == model])}")
print("peak device memory, this run / ../full, per engine (first 8 shapes, in measuring order):")
for engine in dict.fromkeys(r["engine"] for r in warm.values()):
    keys = [k for k in warm if warm[k]["engine"] == engine][:8]
    ratios = [warm[k]["peak_device_bytes"] / cold[k]["peak_device_bytes"] for k in keys]
    print(f"  {engine}: " + " ".join(f"{r:.2f}" for r in ratios))
