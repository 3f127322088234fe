"""Probe for the GPU (not run yet): what keeps a closed bert-base torch-compile engine's device memory until a
garbage collection (the warm sweep's bert-base peaks of 0 MiB: ../README.md)?

    HF_HUB_OFFLINE=1 python docs/results/sweep-h100/warm/probe/cycle.py
Per compile mode and precision: allocated MiB with the engine open, after close() with the collector off, after
gc.collect(); whether the policy module is still alive after close, and what refers to it.
"""
import gc
import weakref

import torch

from engines.backends.base import BuildOptions
from engines.backends.torch_compile import TorchCompileRunner
from engines.batch import TokenBatch
from engines.cache import EngineCache
from engines.models import ModelLoader
from engines.precision.policy import get_policy

model = ModelLoader(weights_mode="random", hub_probe=lambda: False).load("bert-base")
for mode in ("regional", "default"):
    for precision in ("fp32", "hybrid"):
        runner = TorchCompileRunner(model, get_policy(precision), "cuda", BuildOptions(cache=EngineCache("/tmp/ec"), compile_mode=mode))
        runner.build()
        for shape in ((2, 32), (4, 64)):
            ids = torch.randint(0, model.vocab_size, shape)
            runner.infer(TokenBatch(ids, torch.ones_like(ids), "probe"))
        alive = weakref.ref(runner.forward.model)
        gc.collect()
        open_mib = torch.cuda.memory_allocated() >> 20
        gc.disable()
        runner.close()
        del runner
        closed_mib = torch.cuda.memory_allocated() >> 20
        still = alive() is not None
        referrers = sorted({type(r).__name__ for r in gc.get_referrers(alive())}) if still else []
        gc.enable()
        gc.collect()
        print(f"{mode} {precision}: open {open_mib} MiB, closed (no gc) {closed_mib} MiB, module alive {still} "
              f"{referrers}, after gc {torch.cuda.memory_allocated() >> 20} MiB", flush=True)
