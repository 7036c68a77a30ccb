"""orchestrator: training batch-size tables for GPU fleets.

``autobatch`` decides for one device (real or simulated); ``python -m orchestrator
sweep`` builds a lookup table for a whole Ray fleet.
"""
from .answers import Answer, lookup
from .decision import Decision, OutOfMemory, decide
from .engine import Result, autobatch
from .spec import SpecError, Workload

__all__ = ["Answer", "lookup", "Decision", "OutOfMemory", "Result", "SpecError", "Workload", "autobatch", "decide"]
__version__ = "0.1.0"
