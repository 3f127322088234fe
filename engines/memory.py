"""Which device memory belongs to an engine, whatever was built before it.

An engine's peak memory (``perf/``) is the torch allocator's peak during a call,
minus what others held when the engine was built.  Two process-wide caches make
"what others held" depend on test order unless they are emptied first:

* cuBLAS workspaces: PyTorch allocates one per (cuBLAS handle, stream) through its
  caching allocator and keeps it for the process.  The first engine to run a GEMM on
  a stream (the default stream, each CUDA-graph warm-up and capture stream) pays for
  it; an engine built after that found it already held and did not.  On the H100,
  ``bert-base/torch-cudagraph/fp16`` measured 315.8 MiB when built first in a
  session and 249.8 MiB when built after an FP32 engine (issue 9).
* blocks the caching allocator keeps after an earlier engine was closed.

Both are released before every engine is built, so every engine pays for the
workspaces it uses, and its figure no longer depends on what ran before it.

Device memory that a closed engine leaves to Python's garbage collector is freed when a
collection happens to run, possibly in the middle of a later engine's measurement, whose
"others'" bytes had counted it: on the H100 sweep with ``--compile-mode regional`` (each
compiled block held its compiled call, which held the block: fixed in
:mod:`engines.backends.torch_compile`), bert-base/torch-compile/fp16 measured 0 MiB peaks
at two shapes and too little at every later one.  A collection runs first, for any other
cycle.

Hazard, by design not met today: a CUDA graph captured by a live engine may still
point at a workspace released here (pytorch/pytorch#193402).  The suite builds
engines one at a time (the session fixture closes one before the next is built, and
the FP32 reference, built first, captures no graph), so no live graph exists when
this runs; a caller that keeps captured engines alive across builds must not use it.
On the H100, ``gpt2/torch-cudagraph/hybrid`` still measured 33 MiB more in a run
without FP32 engines than in one with them (docs/results/gate-h100): one more
cuBLAS workspace, by its size, whose owner was not found.
"""

from __future__ import annotations

import gc

import torch


def release_shared_device_memory(device: torch.device) -> int:
    """Free cached cuBLAS workspaces and allocator blocks on ``device``; return the bytes still allocated (others')."""
    gc.collect()  # closed engines kept alive by reference cycles: theirs, not the next engine's "others'"
    torch.cuda.synchronize(device)
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:  # present since PyTorch 1.13; without it, workspaces stay shared
        clear_workspaces()
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated(device))
