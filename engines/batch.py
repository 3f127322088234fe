"""Model inputs: a batch of token ids with its attention mask, and the one input check.

Every producer of inputs (Hypothesis strategies, natural text, the benchmarks'
staged batches) makes a :class:`TokenBatch`; every runner checks it with
:func:`validate_batch` before use, so bad input gets one message whatever the backend.
"""

from __future__ import annotations

import dataclasses

import torch


class InvalidInputError(ValueError):
    """An input batch the model cannot take; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Token ids and attention mask, int64, shape [batch, sequence], on the CPU."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str = "unspecified"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def describe(self) -> str:
        b, s = self.shape
        valid = self.attention_mask.sum(dim=1).tolist()
        return f"{self.source} batch={b} seq={s} valid_tokens={valid}"

    def replay(self) -> str:
        """Python literal that rebuilds this batch (printed on failures)."""
        return (
            f"TokenBatch(input_ids=torch.tensor({self.input_ids.tolist()}), "
            f"attention_mask=torch.tensor({self.attention_mask.tolist()}), source={self.source!r})"
        )


def validate_batch(batch: TokenBatch, *, vocab_size: int, max_positions: int, model_name: str) -> None:
    ids, mask = batch.input_ids, batch.attention_mask
    if ids.dim() != 2:
        raise InvalidInputError(f"{model_name}: input_ids must be [batch, sequence], got shape {tuple(ids.shape)}")
    if mask.shape != ids.shape:
        raise InvalidInputError(
            f"{model_name}: attention_mask shape {tuple(mask.shape)} differs from input_ids shape {tuple(ids.shape)}"
        )
    if ids.dtype != torch.int64 or mask.dtype != torch.int64:
        raise InvalidInputError(f"{model_name}: input_ids and attention_mask must be int64, got {ids.dtype}/{mask.dtype}")
    batch_size, seq_len = ids.shape
    if batch_size < 1 or seq_len < 1:
        raise InvalidInputError(f"{model_name}: empty batch of shape {tuple(ids.shape)}")
    if seq_len > max_positions:
        raise InvalidInputError(
            f"{model_name}: sequence length {seq_len} exceeds the model's maximum of {max_positions} positions. "
            f"Truncate inputs to {max_positions} tokens (or lower the profile's sequence cap)."
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise InvalidInputError(
            f"{model_name}: token ids must lie in [0, {vocab_size}), got range [{low}, {high}]. "
            "Tokenize with this model's tokenizer."
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InvalidInputError(f"{model_name}: attention_mask must hold only 0 and 1")
    empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(f"{model_name}: samples {empty} have no attended token (all-zero attention_mask)")
