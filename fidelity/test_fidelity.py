"""`pytest -m fidelity`: every selected model x backend x precision against the FP32 reference.

Each engine gets a Hypothesis test (adversarial token patterns, padding, shapes)
and a natural-text test (WikiText-2 where available).  Gated precisions must meet
the cosine bar with zero NaN/Inf; the others are measured and reported.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fidelity.metrics import FidelityResult
from fidelity.strategies import token_batches

pytestmark = pytest.mark.fidelity


def assert_fidelity(results: list[FidelityResult]) -> None:
    __tracebackhide__ = True
    failures = [r.failure_message() for r in results if not r]
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@given(data=st.data())
def test_hypothesis_inputs(engine, fidelity_session, data) -> None:
    model = engine.model
    engine_batch, engine_seq = engine.input_limits()
    batch = data.draw(
        token_batches(
            vocab_size=model.vocab_size,
            max_batch=min(fidelity_session.options.profile.max_batch, engine_batch or 1 << 30),
            max_seq=min(fidelity_session.max_seq(model), engine_seq),
            special_ids=model.special_token_ids,
            pad_id=model.pad_token_id,
        ),
        label="batch",
    )
    result = fidelity_session.check(engine, batch, input_kind="hypothesis")
    if fidelity_session.is_gated(engine.policy.name):
        assert_fidelity([result])


def test_natural_text(engine, fidelity_session) -> None:
    if engine.model.tokenizer is None:
        message = f"{engine.model.name}: no natural text without a tokenizer: {engine.model.tokenizer_source}"
        if engine.model.spec.is_onnx_graph:  # a user's graph brings none, and its ids may not be WordPiece's
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    results = [
        fidelity_session.check(engine, batch, input_kind="natural-text")
        for batch in fidelity_session.text_batches(engine.model, engine.input_limits())
    ]
    if fidelity_session.is_gated(engine.policy.name):
        assert_fidelity(results)
