"""Hypothesis strategies for transformer inputs, and the profiles that size them.

Strategies are plural nouns with keyword-only arguments and build their structure
directly (no filtering).  The bulk of a long sequence comes from a NumPy generator
seeded by a drawn integer, so an example stays small for Hypothesis to store and
shrink, while the structure that matters (shape, pattern, padding, the repeated
token) is drawn and shrinks to the minimal failing input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from hypothesis import strategies as st

from engines.batch import TokenBatch

PATTERNS = (
    "uniform",  # ids drawn uniformly from the whole vocabulary
    "repeated",  # one token for the whole sequence
    "repeated-run",  # a long run of one token inside random text
    "periodic",  # a short motif repeated: many identical keys in attention
    "special-heavy",  # mostly special tokens ([CLS], [SEP], [MASK], <|endoftext|> ...)
    "vocab-edges",  # the first and last ids of the vocabulary (rare embeddings)
)
PADDING_SIDES = ("none", "right", "left")


@dataclasses.dataclass(frozen=True)
class InputProfile:
    """How many and how large inputs a fidelity run uses."""

    name: str
    max_examples: int
    max_batch: int
    max_seq: int | None  # None: the model's maximum
    text_shapes: tuple[tuple[int, int], ...]  # (batch, sequence) of natural-text batches
    derandomize: bool = False


INPUT_PROFILES: dict[str, InputProfile] = {
    p.name: p
    for p in (
        InputProfile("ci", max_examples=5, max_batch=4, max_seq=64, text_shapes=((4, 64),), derandomize=True),
        InputProfile("dev", max_examples=15, max_batch=8, max_seq=128, text_shapes=((8, 128),)),
        InputProfile(
            "nightly",
            max_examples=40,
            max_batch=32,
            max_seq=None,
            text_shapes=((32, 128), (16, 512), (8, 1024)),
            # Derandomized so that every engine of a model sees the same inputs:
            # rows compare like with like, and FP32 references are computed once.
            derandomize=True,
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """The drawn structure of one sequence; ``seed`` fills in the rest."""

    pattern: str
    valid_length: int
    padding: str
    token: int
    seed: int


def batch_shapes(*, max_batch: int, max_seq: int, min_seq: int = 1) -> st.SearchStrategy[tuple[int, int]]:
    """``(batch, sequence)`` pairs; both shrink towards 1."""
    return st.tuples(st.integers(1, max_batch), st.integers(min_seq, max_seq))


@st.composite
def sample_specs(
    draw,
    *,
    seq_len: int,
    vocab_size: int,
    special_ids: Sequence[int],
    patterns: Sequence[str] = PATTERNS,
    padding: Sequence[str] = PADDING_SIDES,
) -> SampleSpec:
    pattern = draw(st.sampled_from(patterns))
    side = draw(st.sampled_from(padding)) if seq_len > 1 else "none"
    valid_length = seq_len if side == "none" else draw(st.integers(1, seq_len - 1))
    if special_ids and pattern in ("repeated", "special-heavy"):
        token = draw(st.one_of(st.sampled_from(list(special_ids)), st.integers(0, vocab_size - 1)))
    else:
        token = draw(st.integers(0, vocab_size - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    return SampleSpec(pattern, valid_length, side, token, seed)


def render_sample(
    spec: SampleSpec, *, seq_len: int, vocab_size: int, special_ids: Sequence[int], pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a :class:`SampleSpec` into ``(ids, mask)`` of length ``seq_len``."""
    rng = np.random.default_rng(spec.seed)
    n = spec.valid_length
    if spec.pattern == "uniform":
        body = rng.integers(0, vocab_size, n)
    elif spec.pattern == "repeated":
        body = np.full(n, spec.token)
    elif spec.pattern == "repeated-run":
        body = rng.integers(0, vocab_size, n)
        start = int(rng.integers(0, n))
        body[start : start + max(1, (3 * n) // 4)] = spec.token
    elif spec.pattern == "periodic":
        motif = rng.integers(0, vocab_size, int(rng.integers(1, 5)))
        motif[0] = spec.token
        body = np.resize(motif, n)
    elif spec.pattern == "special-heavy":
        pool = np.array(list(special_ids) or [spec.token])
        body = np.where(rng.random(n) < 0.8, rng.choice(pool, n), rng.integers(0, vocab_size, n))
    elif spec.pattern == "vocab-edges":
        edges = np.concatenate([np.arange(0, 8), np.arange(vocab_size - 8, vocab_size)])
        body = rng.choice(edges, n)
    else:
        raise ValueError(f"unknown pattern {spec.pattern!r}; known: {PATTERNS}")
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    mask = np.zeros(seq_len, dtype=np.int64)
    window = slice(seq_len - n, seq_len) if spec.padding == "left" else slice(0, n)
    ids[window] = body
    mask[window] = 1
    return ids, mask


@st.composite
def token_batches(
    draw,
    *,
    vocab_size: int,
    max_batch: int,
    max_seq: int,
    special_ids: Sequence[int] = (),
    pad_id: int = 0,
    patterns: Sequence[str] = PATTERNS,
    padding: Sequence[str] = PADDING_SIDES,
) -> TokenBatch:
    """Batches of token ids from a real vocabulary, with attention masks."""
    if vocab_size < 16:
        raise ValueError(f"vocab_size {vocab_size} is too small for these patterns (need >= 16)")
    special_ids = tuple(i for i in special_ids if 0 <= i < vocab_size)
    batch, seq_len = draw(batch_shapes(max_batch=max_batch, max_seq=max_seq))
    specs = [
        draw(sample_specs(seq_len=seq_len, vocab_size=vocab_size, special_ids=special_ids, patterns=patterns, padding=padding))
        for _ in range(batch)
    ]
    rows = [
        render_sample(s, seq_len=seq_len, vocab_size=vocab_size, special_ids=special_ids, pad_id=pad_id)
        for s in specs
    ]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    mask = torch.from_numpy(np.stack([r[1] for r in rows]))
    return TokenBatch(ids, mask, source="hypothesis")
