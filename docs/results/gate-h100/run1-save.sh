#!/usr/bin/env bash
# H100, issue 9, call 1: a CUDA fidelity check of the refactored engines (Hypothesis inputs; no tokenizer for
# bert-base/gpt2 on that machine), then the full-selection latency baseline under production numerics.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEL=(--device cuda --models bert-base,gpt2 --engine-cache=.devcache/engines)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
git log -1 --format=%H 2>/dev/null | tee -a "$OUT/gpu.txt"
timeout -s INT 100 python -m pytest -p no:cacheprovider -m fidelity fidelity -k hypothesis "${SEL[@]}" \
  --backends torch,torch-cudagraph --precisions fp32,hybrid,fp16 --input-profile ci \
  --fidelity-report="$OUT/fidelity-ci.json" 2>&1 | tail -40 | tee "$OUT/fidelity-ci.log"
timeout -s INT 470 python -m pytest -p no:cacheprovider -m perf perf "${SEL[@]}" \
  --backends torch-cudagraph,torch-compile --precisions fp32,fp16,hybrid \
  --benchmark-save=production 2>&1 | tee "$OUT/save-production.log" | tail -70
cp baselines/sm90-*/*/*_production.json "$OUT/" 2>/dev/null
ls -la "$OUT"
