"""Shared fixtures: one Ray instance per session, and card-independent simulated profiles."""
import os

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

_PROFILES = {}


@pytest.fixture(scope="session")
def profiles():
    """workload -> simulated.Profile, traced once per test session (traces do not depend on the card)."""
    from orchestrator import simulated

    def get(workload):
        if workload not in _PROFILES:
            _PROFILES[workload] = simulated.profile(workload)
        return _PROFILES[workload]

    return get
