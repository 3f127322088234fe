"""Dev probe: what an FP16 residual stream (LayerNorm and softmax still computed in FP32) would
buy the compiled hybrid engine, in latency and in cosine against the FP32 reference.

Usage (H100): PYTHONPATH=$PWD python stream_probe.py bert-base,gpt2 1x128,32x128,32x512
"""
import json
import sys
import time

import torch

from engines.env import configure_fp32_reference_math
from engines.models import ModelLoader
from engines.precision import FLOAT16, FLOAT32, PrecisionPolicy, get_policy
from engines.torch_compile import TorchCompileRunner
from engines.torch_eager import TorchReferenceRunner
from perf.timing import staged_inputs

configure_fp32_reference_math()
FP16_STREAM = PrecisionPolicy(
    name="hybrid-fp16-stream",
    description="FP16 GEMMs and residual stream; FP32 softmax and LayerNorm arithmetic",
    matmul=FLOAT16, softmax=FLOAT32, layernorm=FLOAT32, elementwise=FLOAT16,
)


def events_median_ms(runner, inputs, rounds=50):
    for i in range(10):
        runner.run(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.run(inputs[i % len(inputs)])
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


loader = ModelLoader(model_paths={}, weights_mode="random")
models = sys.argv[1].split(",")
shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[2].split(",")]
for name in models:
    model = loader.load(name)
    reference = TorchReferenceRunner(model, "cuda").build()
    for policy in (get_policy("hybrid"), FP16_STREAM):
        runner = TorchCompileRunner(model, policy, "cuda").build()
        for shape in shapes:
            inputs = staged_inputs(runner, *shape)
            t0 = time.perf_counter()
            runner.run(inputs[0])
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = events_median_ms(runner, inputs)
            cosines, nonfinite = [], 0
            for batch in inputs:
                out = runner.run(batch).float()
                ref = reference.run(batch).float()
                nonfinite += int((~torch.isfinite(out)).sum())
                cosines.append(torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item())
            torch.cuda.reset_peak_memory_stats()
            runner.run(inputs[0])
            print(json.dumps(dict(model=name, policy=policy.name, shape=shape, first_call_s=round(first, 1),
                                  median_ms=round(ms, 4), min_cos=min(cosines), nonfinite=nonfinite,
                                  peak_mib=round(torch.cuda.max_memory_allocated() / 2**20))), flush=True)
        runner.close()
    reference.close()
