"""Fidelity: whether an engine's outputs are faithful to the FP32 reference.

Owns the comparison (:mod:`fidelity.metrics`: per-sample cosine, NaN/Inf, the
tolerance table), the inputs (:mod:`fidelity.strategies` for Hypothesis,
:mod:`fidelity.corpus` for natural text), the session and its report
(:mod:`fidelity.session`, :mod:`fidelity.report`), the options
(:mod:`fidelity.options`), the pytest plugin and the fidelity tests.  Engines come
from :mod:`engines.factory`.
"""
