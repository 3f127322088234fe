"""Dev probe (issue 11, item 5): what a torch-compile engine's first call costs per shape, cold, with a warm local
Inductor cache, and with torch.compiler's portable cache artifacts ("mega-cache") loaded into an empty cache.

    python probe.py cold  ROOT ARTIFACTS   # empty caches under ROOT; compiles; saves the artifacts to ARTIFACTS
    python probe.py warm  ROOT ARTIFACTS   # the same ROOT again, a fresh process: the local caches are warm
    python probe.py load  ROOT ARTIFACTS   # another, empty ROOT; loads ARTIFACTS first (into Inductor's default folder)
    python probe.py load-in-engine-folder ROOT ARTIFACTS   # the same, loaded with the engine's Inductor folder set

One JSON line per shape: first-call seconds (compile + run) and the second call's seconds.
"""
import json
import os
import pathlib
import sys
import time

phase, root, artifacts = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
root.mkdir(parents=True, exist_ok=True)
os.environ["TRITON_CACHE_DIR"] = str(root / "triton")  # no kernel cache shared between the roots

import torch  # noqa: E402

from engines.backends.base import BuildOptions  # noqa: E402
from engines.backends.torch_compile import TorchCompileRunner  # noqa: E402
from engines.batch import TokenBatch  # noqa: E402
from engines.cache import EngineCache  # noqa: E402
from engines.models import ModelLoader  # noqa: E402
from engines.precision.policy import get_policy  # noqa: E402

from engines.backends.torch_compile import inductor_cache, inductor_cache_dir  # noqa: E402

if phase.startswith("load"):
    started = time.perf_counter()
    if phase == "load-in-engine-folder":
        with inductor_cache(inductor_cache_dir(EngineCache(root / "engines"))):
            torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    else:
        torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    print(json.dumps({"phase": phase, "load_artifacts_s": round(time.perf_counter() - started, 2)}), flush=True)
model = ModelLoader(weights_mode="random").load("bert-base")
runner = TorchCompileRunner(model, get_policy("hybrid"), "cuda", BuildOptions(cache=EngineCache(root / "engines"))).build()
for batch, seq in ((1, 128), (8, 128), (32, 512)):
    ids = torch.randint(0, model.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
    tokens = TokenBatch(ids, torch.ones_like(ids), "probe")
    times = []
    for _ in range(2):
        started = time.perf_counter()
        runner.infer(tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    print(json.dumps({"phase": phase, "shape": [batch, seq], "first_call_s": round(times[0], 2),
                      "second_call_s": round(times[1], 4)}), flush=True)
if phase == "cold":
    data, info = torch.compiler.save_cache_artifacts()
    artifacts.write_bytes(data)
    print(json.dumps({"phase": phase, "artifacts_bytes": len(data)}), flush=True)
