"""Benchmarks: decision quality and cost against the seed's algorithm, and measurement speed.

Run as modules from the repository root, e.g. ``python -m benchmarks.decision_quality --quick``.
"""
