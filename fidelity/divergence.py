"""First divergence: where an engine's computation leaves the FP32 reference, block by block.

For one engine and one batch, every block's output (embeddings, each layer, each
layer's attention / MLP / LayerNorm children and the attention probabilities, the final
norm; what the backend exposes through ``Runner.intermediates``) is compared with the reference's at the same module
path, over the batch's valid positions: per-sample min cosine, max absolute error,
non-finite values.  The trace names the first block whose output goes non-finite
(where the reference's is finite) and the first block below the cosine bar, in
execution order.  A failing fidelity test prints the compact trace next to its replay
literal; ``python -m fidelity.instability trace`` (issue 12) will print the whole table.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from engines.batch import TokenBatch


@dataclasses.dataclass(frozen=True)
class BlockDivergence:
    name: str
    min_cosine: float  # NaN where a sample's output is not finite
    max_abs_err: float
    nonfinite: int  # non-finite values at valid positions in the engine's output
    reference_nonfinite: int


@dataclasses.dataclass(frozen=True)
class DivergenceTrace:
    engine: str
    bar: float
    blocks: list[BlockDivergence]
    missing: list[str]  # reference blocks the engine did not report (renamed or fused away)

    @property
    def first_nonfinite(self) -> BlockDivergence | None:
        return next((b for b in self.blocks if b.nonfinite and not b.reference_nonfinite), None)

    @property
    def first_below_bar(self) -> BlockDivergence | None:
        return next((b for b in self.blocks if math.isnan(b.min_cosine) or b.min_cosine < self.bar), None)

    def compact(self, *, context: int = 2, output_failed: bool = False) -> str:
        """A few lines: the first bad blocks, and the blocks just before them.  ``output_failed``: the engine's
        output failed the check (a failure message), so a trace with no bad block points past the last block."""
        if not self.blocks:
            return f"no block outputs to compare for {self.engine}"
        lines = []
        bad = self.first_nonfinite
        lines.append(f"first non-finite block: {bad.name} ({bad.nonfinite} values)" if bad else
                     "first non-finite block: none")
        below = self.first_below_bar
        if below:
            lines.append(f"first block below {self.bar}: {below.name} (min cosine {below.min_cosine:.7f})")
        else:
            lines.append(f"first block below {self.bar}: none" + (
                " (every block follows FP32: the divergence is after the last block, in the output head)"
                if output_failed else ""))
        anchor = next((i for i, b in enumerate(self.blocks) if b in (bad, below)), len(self.blocks) - 1)
        shown = self.blocks[max(0, anchor - context): anchor + 1]
        lines.append("  ".join(f"{b.name}: {b.min_cosine:.7f} / {b.max_abs_err:.3g}" for b in shown)
                     + "  (min cosine / max |err| against FP32)")
        return "\n".join(lines)

    def table(self) -> list[tuple[str, str, str, str]]:
        return [(b.name, f"{b.min_cosine:.7f}", f"{b.max_abs_err:.3g}", str(b.nonfinite)) for b in self.blocks]


def valid_positions(tensor: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask broadcastable to ``tensor``: the batch's valid positions where its leading dims are
    (batch, sequence); for attention probabilities (batch, heads, query, key), valid queries over valid keys;
    else everything (a tensor of another layout)."""
    mask = attention_mask.to(tensor.device).bool()
    if tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(mask.shape):
        return mask.reshape(*mask.shape, *([1] * (tensor.dim() - 2)))
    if tensor.dim() == 4 and tensor.shape[0] == mask.shape[0] and tuple(tensor.shape[2:]) == (mask.shape[1],) * 2:
        return mask[:, None, :, None] & mask[:, None, None, :]
    return torch.ones((), dtype=torch.bool, device=tensor.device)


def compare_blocks(engine: list[tuple[str, torch.Tensor]], reference: list[tuple[str, torch.Tensor]],
                   batch: TokenBatch, *, engine_name: str, bar: float) -> DivergenceTrace:
    theirs = dict(engine)
    blocks, missing = [], []
    for name, ref in reference:
        out = theirs.get(name)
        if out is None or out.shape != ref.shape:
            missing.append(name)
            continue
        out = out.to(ref.device)
        valid = valid_positions(ref, batch.attention_mask)
        flat_out = (out * valid).reshape(out.shape[0], -1).double()  # padded positions zeroed in both
        flat_ref = (ref * valid).reshape(ref.shape[0], -1).double()
        cosines = torch.nn.functional.cosine_similarity(flat_out, flat_ref, dim=1, eps=1e-12)
        err = (flat_out - flat_ref).abs()
        blocks.append(BlockDivergence(
            name=name,
            min_cosine=float("nan") if torch.isnan(cosines).any() else float(cosines.min()),
            max_abs_err=float(err[torch.isfinite(err)].max()) if torch.isfinite(err).any() else float("nan"),
            nonfinite=int((~torch.isfinite(out) & valid).sum()),
            reference_nonfinite=int((~torch.isfinite(ref) & valid).sum()),
        ))
    return DivergenceTrace(engine_name, bar, blocks, missing)


def trace(engine, reference, batch: TokenBatch, *, bar: float) -> DivergenceTrace | None:
    """The divergence of ``engine`` from ``reference`` (both runners of one model) on ``batch``; None where the
    engine's backend exposes no block outputs."""
    ours = engine.intermediates(batch)
    if ours is None:
        return None
    return compare_blocks(ours, reference.intermediates(batch), batch, engine_name=engine.name, bar=bar)
