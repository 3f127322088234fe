#!/usr/bin/env bash
# H100, issue 10: TensorRT for RTX 1.7.1.116 (cp312 wheels carried in two calls: .whl/a, then .whl/b, joined
# and sha256-checked in /tmp/stage), then the fidelity suite with the trt-rtx backend for bert-base and gpt2 at
# every built-in precision under the nightly profile: each engine is exported, converted, parsed, checked,
# built (ahead of time for the default target) and cached, and its run step skips with the runtime's reason.
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=/tmp/stage
cp .whl/b/* "$S/" && cd "$S" && cat libs.part.aa libs.part.ab > tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl \
  && sha256sum -c libs.sha256 | tee "$OUT/wheel-check.txt" && cd - >/dev/null || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$S"/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)" | tee -a "$OUT/wheel-check.txt"
timeout -s INT 400 python3 -m pytest -p no:cacheprovider -m fidelity fidelity --device cuda --backends trt-rtx \
  --models bert-base,gpt2 --precisions fp32,hybrid,fp16,fp16-strict,bf16 --input-profile nightly \
  --engine-cache=/tmp/ec --fidelity-report="$OUT/trt-rtx-h100.json" -rs 2>&1 | tee "$OUT/trt-rtx-h100.log" | tail -30
timeout -s INT 100 python3 -m pytest -p no:cacheprovider tests/engines/backends/test_trt.py -k on_a_gpu -rs \
  2>&1 | tee "$OUT/trt-rtx-gpu-test.log" | tail -8
