"""Dev probe: compile time per shape and CUDA-event latency of torch-compile vs torch-cudagraph."""
import os, sys, time, json
import torch
from engines.env import configure_fp32_reference_math
from engines.models import ModelLoader
from engines.precision import get_policy
from engines.torch_compile import TorchCompileRunner
from engines.torch_cudagraph import TorchCudaGraphRunner
from engines.torch_eager import TorchReferenceRunner
from engines.cache import EngineCache
from engines.base import TokenBatch
from perf.timing import staged_inputs

configure_fp32_reference_math()
loader = ModelLoader(model_paths={}, weights_mode="random")
cache = EngineCache(__import__("pathlib").Path("/tmp/ecache"))
models = sys.argv[1].split(","); precs = sys.argv[2].split(","); shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[3].split(",")]
modes = (sys.argv[4] if len(sys.argv) > 4 else "default").split(",")
out = []
def events_median(runner, inputs, n=50):
    for i in range(10): runner.run(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    ts = []
    for i in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); runner.run(inputs[i % len(inputs)]); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]
for name in models:
    m = loader.load(name)
    ref = TorchReferenceRunner(m, "cuda").build()
    for prec, mode in [(p, md) for p in precs for md in modes]:
        pol = get_policy(prec)
        t0 = time.perf_counter()
        r = TorchCompileRunner(m, pol, "cuda", cache=cache, compile_mode=mode, dynamic="--static" not in sys.argv).build()
        g = TorchCudaGraphRunner(m, pol, "cuda").build() if "--cg" in sys.argv else None
        for shape in shapes:
            inputs = staged_inputs(r, *shape)
            t = time.perf_counter(); r.run(inputs[0]); torch.cuda.synchronize(); first = time.perf_counter() - t
            ms = events_median(r, inputs)
            gms = events_median(g, staged_inputs(g, *shape)) if g else None
            ro = ref.run(inputs[0]); co = r.run(inputs[0]).float()
            cos = torch.nn.functional.cosine_similarity(co.flatten(1), ro.flatten(1)).min().item()
            rec = dict(model=name, prec=prec, mode=mode, static="--static" in sys.argv, shape=shape, first_call_s=round(first, 1), compile_ms=round(ms, 4), cudagraph_ms=gms, cos_min=cos, nan=int(co.isnan().sum()), mem=torch.cuda.max_memory_allocated())
            print(json.dumps(rec), flush=True); out.append(rec)
        print("audit", r.audit.counts, r.describe(), flush=True)
        if "--prof" in sys.argv:
            inp = staged_inputs(r, *shapes[0])
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for i in range(5): r.run(inp[0])
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
        r.close(); g and g.close()
    ref.close()
