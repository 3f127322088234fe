#!/usr/bin/env bash
# H100, issue 11: a smoke run of the sweep's CUDA path (not the characterization): bert-base, gpt2 x fp16, hybrid
# x torch-cudagraph over the small grid, then a rerun (resume: nothing to measure) and the report.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
D=.devcache/sweep-smoke
timeout -s INT 240 python -m perf.sweep --out "$D" --engine-cache=.devcache/engines --device cuda \
  --models bert-base,gpt2 --precisions fp16,hybrid --backends torch-cudagraph --sweep-grid small --cpu-rounds 1 \
  2>&1 | tail -4 | tee "$OUT/smoke.log"
python -m perf.sweep --out "$D" --device cuda --models bert-base,gpt2 --precisions fp16,hybrid \
  --backends torch-cudagraph --sweep-grid small 2>&1 | tail -2 | tee -a "$OUT/smoke.log"
python -m perf.sweep report "$D" -o "$OUT" | tee -a "$OUT/smoke.log"
cp "$D"/results.jsonl "$D"/runs.jsonl "$OUT/"
