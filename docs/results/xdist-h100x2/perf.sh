#!/usr/bin/env bash
# Issue 14, item 4 on GPUs (results: perf/; README.md beside this script): the benchmarks under pytest-xdist on one 2-GPU host. The same perf run
# twice: once in one process, once with -n 2 (one worker per GPU); each saves its run (--benchmark-save) and writes
# --benchmark-json, so the two can be set side by side: every benchmark once, each naming its worker and GPU
# (extra_info: worker, gpu_index, device_lock), and a compare under -n 2 against the serial run's baseline.
# Usage (repository root, a device call of kind nvidia-h100-x2): bash docs/results/xdist-h100x2/perf.sh
# Then, here: copy $RES's files beside this script (perf/) and run analyse_perf.py on them.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; RES=${RES:-/tmp/xdist-perf}; mkdir -p "$OUT" "$RES"
# DEVICE=cpu MODELS=tiny-bert BACKENDS=torch: a check of the script on a CPU machine. EXTRA: more pytest arguments
# for every run (EXTRA=--no-cpu-baseline: the GPU timing alone); COMPARE=0: no third run.
SEL=(-m perf perf --device="${DEVICE:-cuda}" --models="${MODELS:-bert-base,gpt2}" --backends="${BACKENDS:-torch-cudagraph}"
     --precisions=fp32,hybrid,fp16 --engine-cache=/tmp/ec-perf --benchmark-storage="file://$RES/baselines" ${EXTRA:-})
{ nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
  python -c "import importlib.metadata as m, torch; print('torch', torch.__version__, *(f'{p} {m.version(p)}' for p in ('pytest', 'pytest-xdist', 'pytest-benchmark')))"
} > "$RES/machine.txt"
for mode in serial xdist; do
  args=(); [ "$mode" = xdist ] && args=(-n 2)
  start=$(date +%s.%N)
  python -m pytest -p no:cacheprovider "${args[@]}" "${SEL[@]}" --benchmark-save="$mode" \
    --benchmark-json="$RES/$mode.json" > "$RES/$mode.log" 2>&1
  echo "$mode rc=$? wall $(python -c "print(round($(date +%s.%N) - $start, 1))") s: $(tail -1 "$RES/$mode.log")" >> "$RES/times.txt"
done
# Under -n 2, compared with the serial run's saved baseline (run 0001; the newest, 0002, is the xdist one).
if [ "${COMPARE:-1}" = 1 ]; then
  python -m pytest -p no:cacheprovider -n 2 "${SEL[@]}" --benchmark-compare=0001 > "$RES/compare.log" 2>&1
  echo "compare rc=$? $(tail -1 "$RES/compare.log")" >> "$RES/times.txt"
fi
cat "$RES/times.txt"
tar czf "$OUT/xdist-perf.tgz" -C "$RES" .
