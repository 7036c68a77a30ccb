"""Shared fixtures: one Ray instance per session, and card-independent simulated profiles."""
import os
import sys

import pytest
import torch

# The suite's real-tensor steps are small: on a shared 2-core machine a second intra-op thread mostly
# spin-waits (yolov8n's real step at 256 px: 12 s with 2 threads, 1.3 s with 1). Memory does not
# depend on it (same tensors, same bytes). CLI subprocesses and Ray workers keep torch's default.
torch.set_num_threads(1)

TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("RAY_ADDRESS", None)  # never attach the suite to a cluster that happens to run here
# Ray workers (and CLI subprocesses) import tests/tiny_models.py
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, TESTS)

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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: 2 CPUs, 4 logical GPUs."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False,
             object_store_memory=80 * 2**20, log_to_driver=False, logging_level="error")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def default_table(ray_session, tmp_path_factory):
    """The built-in default job (jobs/quickstart.toml), swept once on the session's Ray."""
    from orchestrator import fleet, job

    out = tmp_path_factory.mktemp("default") / "batch_table.csv"
    j = job.with_overrides(job.load(None), out=str(out), simulate="T4, A10G, A100-80GB")
    stats, df = fleet.run_sweep(j)
    return j, stats, df
