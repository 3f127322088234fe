"""Dev probe: the compiled hybrid engine against the FP32 reference on padded batches at cuDNN shapes
(>= 256 keys: the bias broadcast over heads), plus CUDA-event medians at the baseline's shapes.

Usage (H100): PYTHONPATH=$PWD python padded_probe.py bert-base,gpt2 [--time]
"""
import json
import sys

import torch

from engines.base import TokenBatch
from engines.env import configure_fp32_reference_math
from engines.models import ModelLoader
from engines.precision import get_policy
from engines.torch_compile import TorchCompileRunner
from engines.torch_eager import TorchReferenceRunner
from perf.timing import staged_inputs

configure_fp32_reference_math()
loader = ModelLoader(model_paths={}, weights_mode="random")


def padded_batch(model, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size, (batch, seq), generator=g)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return TokenBatch(ids, mask, source=f"padded b{batch}s{seq}"), lengths


def events_median_ms(runner, inputs, rounds=50):
    for i in range(10):
        runner.run(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(rounds):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); runner.run(inputs[i % len(inputs)]); z.record(); z.synchronize(); times.append(a.elapsed_time(z))
    return sorted(times)[rounds // 2]


for name in sys.argv[1].split(","):
    model = loader.load(name)
    reference = TorchReferenceRunner(model, "cuda").build()
    runner = TorchCompileRunner(model, get_policy("hybrid"), "cuda").build()
    print(name, runner.describe()["mode"], flush=True)
    for batch, seq in ((1, 512), (4, 300), (32, 512), (8, 256)):
        tokens, lengths = padded_batch(model, batch, seq, seed=batch * 1000 + seq)
        out = runner.run(tokens).double().cpu()  # float64: FP32 sums over 25M logits drift past 1e-3
        ref = reference.run(tokens).double().cpu()
        cosines = [
            torch.nn.functional.cosine_similarity(out[i, :n].flatten(), ref[i, :n].flatten(), dim=0).item()
            for i, n in enumerate(lengths.tolist())
        ]
        nonfinite = int((~torch.isfinite(out)).sum())
        print(json.dumps(dict(model=name, shape=[batch, seq], rows=batch, min_cos=min(cosines), nonfinite=nonfinite)), flush=True)
    if "--time" in sys.argv:
        for shape in ((1, 128), (32, 128), (32, 512)):
            median = events_median_ms(runner, staged_inputs(runner, *shape))
            print(json.dumps(dict(model=name, shape=shape, median_ms=round(median, 4))), flush=True)
    runner.close()
    reference.close()
