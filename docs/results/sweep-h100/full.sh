#!/usr/bin/env bash
# H100, issue 11: the full characterization sweep (the CUDA defaults: bert-base, gpt2 x fp32, fp16, hybrid x
# torch-compile, torch-cudagraph x batch 1-32 x sequence 32-512 = 360 configurations).
# One device call runs at most LIMIT seconds and is then interrupted (SIGINT, as Ctrl-C): what it measured is
# kept in $SWEEP_DIR/results.jsonl and the next call, with the same folder, measures the rest. On a warm machine
# $SWEEP_DIR and the engine cache (Inductor's compiled graphs under .devcache/engines/torchinductor) are still there.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
D=${SWEEP_DIR:-.devcache/sweep-h100}
LIMIT=${LIMIT:-560}
shift_args=("$@")
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout -s INT "$LIMIT" python -m perf.sweep --device cuda --out "$D" --engine-cache=.devcache/engines "${shift_args[@]}" \
  2>&1 | tr '\r' '\n' | grep -v '^[[:space:]]*$' > /tmp/sweep-full.log
# The log without the progress bar's redraws, but with its last state (rate and ETA).
{ grep -v 'config/s\|s/config\|it/s\|s/it\|[0-9]/[0-9]* \[' /tmp/sweep-full.log; tail -2 /tmp/sweep-full.log; } > "$OUT/sweep.log"
echo "call wall time: $(( $(date +%s) - start )) s (limit ${LIMIT} s)" | tee -a "$OUT/sweep.log"
cp "$D"/results.jsonl "$D"/runs.jsonl "$OUT/" 2>/dev/null
du -sh .devcache/engines/torchinductor 2>/dev/null | tee -a "$OUT/sweep.log"
tail -5 "$OUT/sweep.log"
