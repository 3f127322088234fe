#!/usr/bin/env bash
# H100, issue 11 item 5: the 360-configuration sweep inside one 10-minute device call, with warm engine caches.
# "Warm" = Inductor's and Triton's on-disk caches under the engine cache (.devcache/engines/torchinductor) filled
# by an earlier call on the same machine (kept between back-to-back device calls; too large to carry).
#   bash docs/results/sweep-h100/warm.sh prime   # call 1 (cold): every torch-compile shape compiled once, 5 rounds,
#                                                #   no CPU baseline, no fidelity: what a cold cache costs
#   bash docs/results/sweep-h100/warm.sh sweep   # call 2 (warm): the full sweep, one call, into a new folder
# Both with --compile-mode regional (each repeated block compiled once per shape for all blocks: see
# engines/backends/torch_compile.py); the CPU FP32 baseline with its default 3 rounds, measured first.
set -uo pipefail
here=$(dirname "$0")
case "${1:-}" in
  prime) SWEEP_DIR=.devcache/sweep-warm-prime LIMIT=${LIMIT:-570} bash "$here/full.sh" --backends torch-compile \
           --compile-mode regional --rounds 5 --warmup 0 --no-cpu-baseline --no-fidelity ;;
  sweep) SWEEP_DIR=.devcache/sweep-warm LIMIT=${LIMIT:-575} bash "$here/full.sh" --backends torch-compile,torch-cudagraph \
           --compile-mode regional ;;
  *) echo "usage: warm.sh prime|sweep" >&2; exit 2 ;;
esac
du -sh .devcache/engines 2>/dev/null | tee -a "${OUT:-/tmp/out}/sweep.log"
