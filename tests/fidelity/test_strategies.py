import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity.strategies import INPUT_PROFILES, PATTERNS, SampleSpec, render_sample, token_batches

SPECIAL = (0, 100, 101, 102, 103)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), vocab=st.sampled_from([30522, 50257, 64]), max_batch=st.integers(1, 8), max_seq=st.integers(1, 48))
def test_token_batches_are_always_valid_model_inputs(data, vocab, max_batch, max_seq):
    batch = data.draw(token_batches(vocab_size=vocab, max_batch=max_batch, max_seq=max_seq, special_ids=SPECIAL, pad_id=0))
    b, s = batch.shape
    assert 1 <= b <= max_batch and 1 <= s <= max_seq
    assert int(batch.input_ids.min()) >= 0 and int(batch.input_ids.max()) < vocab
    assert set(batch.attention_mask.unique().tolist()) <= {0, 1}
    assert bool((batch.attention_mask.sum(dim=1) >= 1).all())
    # padding is contiguous on one side: the mask is a single run of ones
    for row in batch.attention_mask.tolist():
        ones = [i for i, v in enumerate(row) if v]
        assert ones == list(range(ones[0], ones[-1] + 1))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_every_pattern_renders_with_each_padding(pattern, padding):
    valid = 12 if padding == "none" else 7
    ids, mask = render_sample(SampleSpec(pattern, valid, padding, 5, 1), seq_len=12, vocab_size=1000, special_ids=SPECIAL, pad_id=0)
    assert ids.shape == mask.shape == (12,) and mask.sum() == valid
    if padding == "left":
        assert mask[:5].sum() == 0 and mask[5:].all()
    if padding == "right":
        assert mask[:7].all() and mask[7:].sum() == 0
    if pattern == "repeated":
        assert set(ids[mask == 1].tolist()) == {5}
    if pattern == "vocab-edges":
        assert all(i < 8 or i >= 992 for i in ids[mask == 1])


def test_seeded_rendering_is_reproducible():
    spec = SampleSpec("uniform", 30, "none", 0, 1234)
    a = render_sample(spec, seq_len=30, vocab_size=50257, special_ids=(), pad_id=0)
    b = render_sample(spec, seq_len=30, vocab_size=50257, special_ids=(), pad_id=0)
    assert np.array_equal(a[0], b[0])


def test_profiles():
    ci, dev, nightly = INPUT_PROFILES["ci"], INPUT_PROFILES["dev"], INPUT_PROFILES["nightly"]
    assert ci.derandomize and ci.max_examples <= dev.max_examples <= nightly.max_examples
    assert nightly.max_seq is None and nightly.max_batch == 32  # full shapes: the model's maximum
    assert max(s for _, s in nightly.text_shapes) >= 1024


def test_too_small_vocabulary_is_refused():
    @given(token_batches(vocab_size=4, max_batch=1, max_seq=4))
    def draw(batch):
        pass

    with pytest.raises(ValueError, match="too small"):
        draw()
