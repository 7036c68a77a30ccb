"""The fleet's Ray actors: a ``DeviceActor`` owns one GPU (real or simulated) for the whole sweep and decides
on it; a ``ProfileWorker`` is one CPU slot that traces a workload's card-independent simulated profile."""
from __future__ import annotations

import dataclasses
import os

import ray

from . import engine
from .cuda import device_fault
from .devicetypes import DeviceInfo
from .spec import Workload


class DeviceActor:
    """Owns one GPU (real or simulated) for the whole sweep."""

    def __init__(self, card: str | None):
        os.environ.setdefault("YOLO_OFFLINE", "1")  # actors never download
        from .devices import make_backend

        self.backend = make_backend(card)

    def info(self) -> DeviceInfo:
        return dataclasses.replace(self.backend.info(), pid=os.getpid(),
                                   node=ray.get_runtime_context().get_node_id())

    def decide(self, workload: Workload, fraction: float, max_batch: int, profile=None) -> engine.Result:
        """A simulated card replays ``profile``; a real one starts from what it predicts for this device."""
        if profile is not None and hasattr(self.backend, "add_profile"):
            self.backend.add_profile(profile)
            profile = None
        return _faults_named(engine.decide_on, self.backend, workload, fraction, max_batch=max_batch,
                             profile=profile)

    def profile(self, workload: Workload):
        """A workload's simulated profile, traced here: where it goes when profile workers keep dying under
        it (``scheduler.Job.fallback``); the tracing is CPU work any process can do."""
        return _profile(workload)


def _profile(workload: Workload):
    from . import simulated

    return _faults_named(simulated.profile, workload)


def _faults_named(fn, *args, **kwargs):
    """``fn(...)``, with a sticky CUDA error raised as ``DeviceFault``: the driver replaces this actor,
    whose CUDA context fails every later call (other exceptions pass unchanged: the combination's error)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        fault = device_fault(e)
        if fault is None:
            raise
    raise fault


RemoteDeviceActor = ray.remote(DeviceActor)


class ProfileWorker:
    """One CPU slot for CPU-only jobs: a workload's card-independent simulated profile (its fake-tensor
    traces), which every card type's decision replays (``DeviceActor.decide(..., profile)``).

    An actor, not a Ray task: torch and the tracer are imported once, at the fleet's start (under
    ``actor_timeout_s``), so ``task_timeout_s`` counts tracing only. A Ray task's worker starts cold
    (imports 1-1.6 s on an idle machine): as tasks, the tiny test model's profile, imports included,
    ran past a 12 s ``task_timeout_s`` on the loaded 2-core build machine.
    """

    def __init__(self):
        os.environ.setdefault("YOLO_OFFLINE", "1")  # workers never download
        from . import simulated  # noqa: F401 (the import is the point: paid before any job's clock starts)

    def ready(self) -> int:
        return os.getpid()

    def profile(self, workload: Workload):
        return _profile(workload)


# one CPU each (the pool is one per CPU of the cluster), no GPU; no restarts by Ray: the scheduler retries
# a job whose process died (bounded) and never one that raised (it would raise again)
MAX_PROFILE_WORKERS = 8
"""Profile workers on a real fleet at most (a simulated fleet has one per CPU): tracing only predicts there."""

RemoteProfileWorker = ray.remote(num_cpus=1, num_gpus=0, max_restarts=0, max_task_retries=0)(ProfileWorker)
