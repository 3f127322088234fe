#!/usr/bin/env bash
# H100, issue 9, call 2 (warm machine: Inductor cache in .devcache): the subset of issue 9 compared with the
# full-selection baseline 0005 (and saved, 0006), then the reverse: the full selection compared with 0006.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEL=(--device cuda --models bert-base,gpt2 --engine-cache=.devcache/engines --no-cpu-baseline)
timeout -s INT 250 python -m pytest -p no:cacheprovider -m perf perf "${SEL[@]}" \
  --backends torch-cudagraph,torch-compile --precisions fp16,hybrid --benchmark-compare=0005 \
  --benchmark-save=subset --junitxml="$OUT/subset-vs-0005.junit.xml" 2>&1 | tee "$OUT/subset-vs-0005.log" | tail -45
timeout -s INT 300 python -m pytest -p no:cacheprovider -m perf perf "${SEL[@]}" \
  --backends torch-cudagraph,torch-compile --precisions fp32,fp16,hybrid --benchmark-compare=0006 \
  --junitxml="$OUT/full-vs-0006.junit.xml" 2>&1 | tee "$OUT/full-vs-0006.log" | tail -60
cp baselines/sm90-*/*/0006_subset.json "$OUT/" 2>/dev/null
