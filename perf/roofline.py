"""Hardware floors: how fast a forward pass could possibly be on a given GPU.

A forward pass must at least read every GEMM weight once and write its output
(memory floor: bytes over memory bandwidth), and must do its matrix arithmetic
(compute floor: FLOPs over the matrix units' dense peak).  The floor is the
larger of the two; a measured latency divided by it says how much is left.
Embedding lookups, activations that stay in cache, and launch gaps are not
counted, so the floor is optimistic, which is what a floor should be.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class GpuPeaks:
    memory_bytes_per_s: float
    half_flops: float  # dense FP16/BF16 tensor-core peak (no sparsity)
    fp32_flops: float  # FP32 without tensor cores: the reference runs with TF32 off
    source: str


# Keyed by torch.cuda.get_device_name(), as in the machine id.
GPU_PEAKS: Mapping[str, GpuPeaks] = {
    "NVIDIA H100 80GB HBM3": GpuPeaks(
        memory_bytes_per_s=3.35e12,
        half_flops=989.4e12,
        fp32_flops=66.9e12,
        source="NVIDIA H100 Tensor Core GPU datasheet, SXM5: HBM3 3.35 TB/s, FP16 1979 TFLOPS with sparsity, FP32 67 TFLOPS",
    ),
    "NVIDIA H200": GpuPeaks(
        memory_bytes_per_s=4.8e12,
        half_flops=989.4e12,
        fp32_flops=66.9e12,
        source="NVIDIA H200 datasheet, SXM: HBM3e 4.8 TB/s, FP16 1979 TFLOPS with sparsity, FP32 67 TFLOPS",
    ),
}

def weight_bytes(precision: str) -> int:
    """Bytes of one GEMM weight element under a built-in policy (its matmul dtype, from the dtype table).

    A policy file's name in a saved run cannot be resolved here: it is held to FP32, so its floor is an
    FP32 floor (the lower the floor, the more optimistic; this errs the other way and says so in reports).
    """
    from engines.precision.policy import DTYPES, POLICIES

    policy = POLICIES.get(precision)
    return 4 if policy is None else DTYPES[policy.classes["matmul"]].itemsize


@dataclasses.dataclass(frozen=True)
class ForwardCost:
    flops: float
    weight_bytes: float
    output_bytes: float

    def times_s(self, peaks: GpuPeaks, precision: str) -> tuple[float, float]:
        """(memory time, compute time) of one pass at the device's peaks."""
        flops_per_s = peaks.fp32_flops if weight_bytes(precision) == 4 else peaks.half_flops
        return (self.weight_bytes + self.output_bytes) / peaks.memory_bytes_per_s, self.flops / flops_per_s

    def floor_s(self, peaks: GpuPeaks, precision: str) -> float:
        return max(self.times_s(peaks, precision))

    def bound(self, peaks: GpuPeaks, precision: str) -> str:
        memory, compute = self.times_s(peaks, precision)
        return "memory" if memory >= compute else "compute"


def forward_cost(family: str, config: Mapping[str, Any], precision: str, batch: int, seq: int) -> ForwardCost:
    """GEMM and attention FLOPs, GEMM weight bytes and FP32 output bytes of one forward pass."""
    if family == "gpt2":
        hidden, layers = config["n_embd"], config["n_layer"]
        inner = config.get("n_inner") or 4 * hidden
        head = config["vocab_size"]  # the LM head GEMM
    else:
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        inner = config["intermediate_size"]
        head = 0
    tokens = batch * seq
    gemm_params = layers * (4 * hidden * hidden + 2 * hidden * inner) + hidden * head
    attention_flops = 4 * layers * batch * seq * seq * hidden  # Q K^T and P V
    output_width = head or hidden
    return ForwardCost(
        flops=2.0 * tokens * gemm_params + attention_flops,
        weight_bytes=float(gemm_params * weight_bytes(precision)),
        output_bytes=float(tokens * output_width * 4),
    )
