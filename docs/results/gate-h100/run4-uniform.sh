#!/usr/bin/env bash
# H100, issue 9, call 4: the uniform 8% slowdown again, the injected wait now a spin (a sleep overshot by
# ~50-100 us at b1/b8, so call 3's "8%" was up to 15% on sub-millisecond items).
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout -s INT 150 python -m pytest -p no:cacheprovider -m perf perf --device cuda --models bert-base,gpt2 \
  --engine-cache=.devcache/engines --no-cpu-baseline --backends torch-cudagraph --precisions fp16,hybrid \
  --benchmark-compare=0005 --perf-slow-engine '*=x1.08' --junitxml="$OUT/uniform-spin.junit.xml" 2>&1 \
  | tee "$OUT/uniform-spin.log" | grep -E "FAILED|passed|failed|aggregate|x slower" | tail -25
