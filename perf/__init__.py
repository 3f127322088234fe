"""Latency and memory benchmarks (pytest-benchmark).

Runners never time themselves: the one GPU-correct timer lives here.  Not built
yet; see baselines/README.md.
"""
