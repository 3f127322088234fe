#!/usr/bin/env bash
# H100, issue 9, call 3: the gate against 0005 with a deliberately slowed engine (+2 ms per call: its items fail)
# and with every call 8% longer (no item fails at 10%; the suite aggregate fails at 5%); then the full selection
# under deterministic numerics, saved (0007) to measure what those settings cost each engine.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEL=(--device cuda --models bert-base,gpt2 --engine-cache=.devcache/engines --no-cpu-baseline)
GATE=(-m perf perf "${SEL[@]}" --backends torch-cudagraph --precisions fp16,hybrid --benchmark-compare=0005)
timeout -s INT 110 python -m pytest -p no:cacheprovider "${GATE[@]}" --perf-slow-engine 'bert-base/torch-cudagraph/hybrid=2' \
  --junitxml="$OUT/slowed.junit.xml" 2>&1 | tee "$OUT/slowed.log" | grep -E "FAILED|passed|failed|aggregate" | tail -12
timeout -s INT 110 python -m pytest -p no:cacheprovider "${GATE[@]}" --perf-slow-engine '*=x1.08' \
  --junitxml="$OUT/uniform.junit.xml" 2>&1 | tee "$OUT/uniform.log" | grep -E "FAILED|passed|failed|aggregate" | tail -12
timeout -s INT 330 python -m pytest -p no:cacheprovider -m perf perf "${SEL[@]}" --numerics deterministic \
  --backends torch-cudagraph,torch-compile --precisions fp32,fp16,hybrid --benchmark-save=deterministic \
  2>&1 | tee "$OUT/deterministic.log" | tail -4
cp baselines/sm90-*/*/0007_deterministic.json "$OUT/" 2>/dev/null
