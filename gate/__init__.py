"""The upgrade gate: one verdict on a candidate stack against a baseline, over fidelity, latency and memory.

It owns result sets (what one nightly run produced: a fidelity report and a
pytest-benchmark JSON, with the facts of the stack they ran on), fidelity
baselines per GPU architecture beside the latency baselines, the fidelity drift
rule, the combined verdict and its Markdown/JSON reports, and the append-only
history with its change points.  Command: ``fidelity-gate`` (:mod:`gate.cli`).
It reads what ``fidelity/`` and ``perf/`` write and reuses the latency gate's
statistics; neither of them imports it.
"""
