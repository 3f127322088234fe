"""Dev probe: CUDA kernel time of the compiled hybrid engine per kernel family at one shape.

Usage (H100): PYTHONPATH=$PWD python profile_probe.py bert-base 32x512
"""
import collections
import sys

import torch

from engines.models import ModelLoader
from engines.precision import get_policy
from engines.torch_compile import TorchCompileRunner
from perf.timing import staged_inputs

name, shape = sys.argv[1], tuple(map(int, sys.argv[2].split("x")))
model = ModelLoader(model_paths={}, weights_mode="random").load(name)
runner = TorchCompileRunner(model, get_policy("hybrid"), "cuda").build()
inputs = staged_inputs(runner, *shape)
for i in range(10):
    runner.run(inputs[i % len(inputs)])
torch.cuda.synchronize()
ITERATIONS = 5
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for i in range(ITERATIONS):
        runner.run(inputs[i % len(inputs)])
    torch.cuda.synchronize()
families = collections.Counter()
calls = collections.Counter()
for event in prof.key_averages():
    if event.device_type != torch.autograd.DeviceType.CUDA:
        continue
    key = event.key.lower()
    # Inductor names its Triton kernels after the ops they feed: classify those first.
    if key.startswith("triton"):
        if "scaled_dot_product" in key:
            family = "triton: attention inputs (mask bias, Q/K/V layout)"
        else:
            family = "triton: fused elementwise/LayerNorm"
    elif "fmha" in key or "attention" in key or "sdpa" in key or "flash" in key:
        family = "attention kernel"
    elif "gemm" in key or "cutlass" in key or "xmma" in key or "nvjet" in key:
        family = "gemm"
    elif "memcpy" in key or "copy" in key:
        family = "copy"
    else:
        family = "other"
    families[family] += event.self_device_time_total / ITERATIONS
    calls[family] += event.count // ITERATIONS
total = sum(families.values())
print(f"{name} hybrid {shape}: {total / 1e3:.3f} ms of kernel time per forward")
for family, us in families.most_common():
    print(f"  {family:32s} {us / 1e3:7.3f} ms  {100 * us / total:5.1f}%  {calls[family]} kernels")
print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20), flush=True)
