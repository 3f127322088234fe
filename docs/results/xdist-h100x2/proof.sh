#!/usr/bin/env bash
# Two GPUs, issue 14 (a reduced proof: see README.md): the same fidelity run with one worker and with -n auto
# (one worker per GPU, each pinned to its own), on one 2-GPU host; wall time of each, and the rows of both reports.
# bert-base and gpt2 (random-init, no tokenizer there: Hypothesis inputs only) x torch, torch-cudagraph x fp32,
# hybrid, fp16, bf16, ci profile (derandomized: both runs draw the same batches).
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEL=(-m fidelity fidelity -k hypothesis --device=cuda --models=bert-base,gpt2 --backends=torch,torch-cudagraph
     --precisions=fp32,hybrid,fp16,bf16 --input-profile=ci --engine-cache=/tmp/ec)
{ nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader; python -c "import torch, xdist; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count(), 'xdist', xdist.__version__)"; } | tee "$OUT/machine.txt"
for mode in serial xdist; do
  args=(); [ "$mode" = xdist ] && args=(-n auto)
  start=$(date +%s.%N)
  python -m pytest -p no:cacheprovider "${args[@]}" "${SEL[@]}" --fidelity-report="$OUT/$mode.json" > "$OUT/$mode.log" 2>&1
  rc=$?
  echo "$mode rc=$rc wall $(python -c "print(round($(date +%s.%N) - $start, 1))") s: $(grep -E 'passed|failed' "$OUT/$mode.log" | tail -1)" | tee -a "$OUT/times.txt"
done
