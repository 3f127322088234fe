"""Dev probe: how the padding-mask bias reaches the fused attention kernel under Inductor.

12 layers of attention at one shape, compiled; variants of the bias:
  expand : [b,1,q,k] additive bias expanded to [b,h,q,k] inside the graph (the engine today)
  nohead : [b,1,q,k] passed as is (broadcast over heads by the kernel, if it accepts it)
  keyonly: [b,1,1,k] expanded to [b,h,q,k] (a key-padding mask: rows identical)
Usage (H100): python bias_probe.py 32x512 cudnn,efficient
"""
import sys

import torch

b, s = map(int, sys.argv[1].split("x"))
kernels = sys.argv[2].split(",")
h, d, layers = 12, 64, 12
dev = "cuda"
torch.manual_seed(0)
qkv = [torch.randn(b, s, 3 * h * d, device=dev, dtype=torch.float16) for _ in range(layers)]
mask = torch.ones(b, s, dtype=torch.bool, device=dev)
mask[: b // 2, s - s // 4 :] = False  # padded keys in half the rows


def attend(kernel, q, k, v, bias):
    if kernel == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, False, 0.0, False, False)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False)[0]


def make(kernel, variant):
    def fn(qkv, mask):
        full = mask[:, None, None, :].expand(b, 1, s, s)  # what transformers' sdpa_mask gives: [b,1,q,k]
        if variant == "keyonly":
            bias = torch.zeros((), dtype=torch.float16, device=dev).masked_fill(~mask[:, None, None, :], -65504.0)
            bias = bias.expand(b, h, s, s)
        else:
            bias = torch.zeros((), dtype=torch.float16, device=dev).masked_fill(~full, -65504.0)
            if variant == "expand":
                bias = bias.expand(b, h, s, s)
        out = []
        for x in qkv:
            q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in x.split(h * d, dim=-1))
            out.append(attend(kernel, q, k, v, bias))
        return out
    return fn


def events_ms(fn, *args, n=20):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(*args); z.record(); z.synchronize(); times.append(a.elapsed_time(z))
    return sorted(times)[n // 2]


for kernel in kernels:
    reference = None
    for variant in ("expand", "nohead", "keyonly"):
        try:
            eager = make(kernel, variant)(qkv, mask)
            compiled = torch.compile(make(kernel, variant), dynamic=False)
            out = compiled(qkv, mask)
            if reference is None:
                reference = eager
            diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, reference))
            ms = events_ms(compiled, qkv, mask)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                compiled(qkv, mask)
                torch.cuda.synchronize()
            rows = sorted(
                ((e.key[:70], e.count, e.self_device_time_total) for e in prof.key_averages() if e.self_device_time_total > 0),
                key=lambda r: -r[2],
            )
            print(f"{kernel:9s} {variant:8s} b{b} s{s}: {ms:.3f} ms for {layers} layers; max |diff| vs expand eager {diff:.2e}")
            for name, count, us in rows[:6]:
                print(f"    {us / 1e3:7.3f} ms  x{count:<3d} {name}")
        except Exception as exc:  # noqa: BLE001 - a probe: report and go on
            print(f"{kernel:9s} {variant:8s}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        torch._dynamo.reset()
