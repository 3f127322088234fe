"""Latency and memory: the one timer, the benchmarks, per-machine baselines and the regression gate.

Measure (:mod:`perf.timing`, :mod:`perf.session`), store (:mod:`perf.baselines`:
pytest-benchmark JSON under ``baselines/<machine id>/``) and compare
(:mod:`perf.stats`: Mann-Whitney U per item, a geometric-mean suite aggregate) are
kept apart; :mod:`perf.report` and :mod:`perf.roofline` turn a saved run into a
table with hardware floors.  Timing holds the device's lock (never two engines timed
on one device at once); under pytest-xdist each worker times on its own GPU and the
controller merges their results and decides the suite aggregate (:mod:`perf.workers`).
Engines come from :mod:`engines.factory`; nothing here imports ``fidelity/``.
"""
