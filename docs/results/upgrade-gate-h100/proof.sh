#!/usr/bin/env bash
# H100, issue 13: real result sets for the upgrade gate, in one device call. bert-base and gpt2 (random-init, no hub)
# x torch-cudagraph: fidelity (fp32, hybrid, fp16; ci profile) and latency (hybrid, fp16; the perf grid, no CPU
# baseline). base: the baseline; again: the same stack again (a); deterministic: the same engines under
# --numerics deterministic, another real stack (b); perturbed-*: one GEMM of bert-base's hybrid engine a few
# percent off (c); slowed: gpt2's hybrid engine slowed by 25% (d). The gate itself runs afterwards, anywhere:
# fidelity-gate compare RUN --baseline base (README.md here).
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 FIDELITY_STACK=h100-torch-2.11
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=/tmp/gate; rm -rf "$R"; mkdir -p "$R"
ENGINES=(--device=cuda --models=bert-base,gpt2 --backends=torch-cudagraph --engine-cache=.devcache/engines)
FIDELITY=(-m fidelity fidelity "${ENGINES[@]}" --precisions=fp32,hybrid,fp16 --input-profile=ci)
PERF=(-m perf perf "${ENGINES[@]}" --precisions=hybrid,fp16 --no-cpu-baseline)
step() {  # step NAME KIND [extra pytest args...]: one result set's fidelity or perf half, with its log
  local name=$1 kind=$2; shift 2; mkdir -p "$R/$name"
  local start=$(date +%s)
  if [ "$kind" = fidelity ]; then
    timeout 150 python -m pytest -q -p no:cacheprovider "${FIDELITY[@]}" --fidelity-report="$R/$name/fidelity.json" "$@" > "$R/$name/fidelity.log" 2>&1
  else
    timeout 150 python -m pytest -q -p no:cacheprovider "${PERF[@]}" --benchmark-json="$R/$name/perf.json" "$@" > "$R/$name/perf.log" 2>&1
  fi
  echo "$name $kind rc=$? $(( $(date +%s) - start ))s: $(tail -1 "$R/$name/$kind.log")" | tee -a "$R/steps.log"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
step base fidelity
step base perf
step again fidelity
step again perf
step perturbed-5pct fidelity --perturb-weight=bert-base/torch-cudagraph/hybrid=encoder.layer.3.output.dense.weight:1.05
step slowed perf --perf-slow-engine=gpt2/torch-cudagraph/hybrid=x1.25
step deterministic perf --numerics=deterministic
step perturbed-2pct fidelity --perturb-weight=bert-base/torch-cudagraph/hybrid=encoder.layer.3.output.dense.weight:1.02
tar czf "$OUT/gate-h100.tgz" -C "$R" .
cat "$R/steps.log"
