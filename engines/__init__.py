"""Engines: everything that turns a model name, a precision policy and a backend into a runnable engine.

Owns the model registry (:mod:`engines.models`), model inputs (:mod:`engines.batch`),
precision policies and their application (:mod:`engines.precision`), ONNX export and
precision graphs (:mod:`engines.graphs`), the runners (:mod:`engines.backends`), the
on-disk engine cache (:mod:`engines.cache`), numerics settings (:mod:`engines.numerics`)
and the one factory that builds engines for both ``fidelity/`` and ``perf/``
(:mod:`engines.factory`).  Nothing here measures time or judges fidelity.
"""
