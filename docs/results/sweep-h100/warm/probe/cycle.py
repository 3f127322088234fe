"""Probe (H100): does a closed bert-base torch-compile engine leave device memory until the garbage collector runs?

    python docs/results/sweep-h100/warm/probe/cycle.py
Per case: allocated MiB with the engine open, after close() with the collector off, after gc.collect();
whether the policy module is still alive after close, and what refers to it.
"""
import gc
import weakref

import torch

from engines.backends import torch_compile
from engines.backends.base import BuildOptions
from engines.backends.torch_compile import TorchCompileRunner
from engines.batch import TokenBatch
from engines.cache import EngineCache
from engines.models import ModelLoader
from engines.precision.policy import get_policy

model = ModelLoader(weights_mode="random", hub_probe=lambda: False).load("bert-base")
keep = torch_compile.uncompile_repeated_blocks
for case, mode, fix in (("regional, blocks left compiled", "regional", False), ("regional, uncompiled at close", "regional", True),
                        ("default", "default", True)):
    torch_compile.uncompile_repeated_blocks = keep if fix else (lambda module: None)
    runner = TorchCompileRunner(model, get_policy("fp32"), "cuda", BuildOptions(cache=EngineCache("/tmp/ec"), compile_mode=mode))
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
    referrers = sorted({type(r).__name__ for r in gc.get_referrers(alive())}) if alive() is not None else []
    still = alive() is not None
    gc.enable()
    gc.collect()
    print(f"{case}: open {open_mib} MiB, closed (no gc) {closed_mib} MiB, module alive {still} {referrers}, "
          f"after gc {torch.cuda.memory_allocated() >> 20} MiB", flush=True)
