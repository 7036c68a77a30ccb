"""orchestrator: training batch-size tables for GPU fleets.

``autobatch`` decides for one device (real or simulated); ``python -m orchestrator
sweep`` builds a lookup table for a whole Ray fleet; ``lookup`` reads it.

The names below are imported on first use, so that the pure modules
(``orchestrator.decision``, ``orchestrator.scheduler``, ``orchestrator.spec``) import
without torch, ray or pandas.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Answer": "answers", "lookup": "answers", "lookup_ranks": "answers", "RanksAnswer": "answers",
    "Decision": "decision", "OutOfMemory": "decision", "decide": "decision",
    "Result": "engine", "autobatch": "engine",
    "SpecError": "spec", "Workload": "spec",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
