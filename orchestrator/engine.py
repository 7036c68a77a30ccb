"""One device, one workload: the backend measures, the pure core decides."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from . import autobatch as core
from .devices import DeviceInfo, cuda_count, make_backend
from .spec import SpecError, Workload, check_fraction

log = logging.getLogger(__name__)


@dataclass
class Result:
    """A decision with what it was made for."""

    workload: Workload
    device: DeviceInfo
    fraction: float
    decision: core.Decision
    seconds: float
    profile_seconds: float = 0.0
    """Simulated: time spent tracing the workload (shared by every card that replays it)."""


def decide_on(backend, workload: Workload, fraction: float, *, max_batch: int = 1024) -> Result:
    """Run the decision for ``workload`` on ``backend``'s device."""
    check_fraction(fraction)
    t0 = time.perf_counter()
    measure = backend.measurer(workload)  # builds the model; CUDA: loads kernels, so context is counted
    info = backend.info()
    budget = info.budget_bytes(fraction)
    if budget <= 0:
        decision = core.Decision(0, "no-fit", budget, None, None, None, None,
                                 reason=f"nothing left: {info.outside_bytes} B used outside the allocator")
    else:
        decision = core.decide(measure, budget, max_batch=max_batch)
    seconds = time.perf_counter() - t0
    log.info("%s on %s: batch %d (%s) after %d measurements in %.1fs", workload.label(), info.name,
             decision.batch_size, decision.status, decision.measurements, seconds)
    prof = getattr(backend, "_profiles", {}).get(workload)
    return Result(workload, info, fraction, decision, seconds, prof.trace_seconds if prof else 0.0)


def autobatch(model: str, imgsz: int = 640, fraction: float = 0.8, *, gpu: str | None = None,
              precision: str = "fp16", optimizer: str = "SGD", ema: bool = True,
              cudnn_benchmark: bool = False, max_batch: int = 1024) -> Result:
    """The largest training batch for ``model`` at ``imgsz`` within ``fraction`` of one device.

    ``gpu`` names a catalog card to simulate (e.g. "T4"); None uses CUDA device 0,
    or raises when there is none. The drop-in for YOLO's ``check_train_batch_size``:
    ``autobatch("ultralytics:yolov8s.yaml", 640).decision.batch_size``.
    """
    workload = Workload(model, imgsz, precision, optimizer, ema, cudnn_benchmark)
    check_fraction(fraction)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise SpecError(f"max_batch={max_batch!r} must be a positive integer, e.g. 1024")
    if gpu is None and cuda_count() == 0:
        raise SpecError("no CUDA device found: name a card to simulate, e.g. gpu='T4' (--gpu T4)")
    try:
        backend = make_backend(gpu)
    except ValueError as e:  # unknown catalog card
        raise SpecError(str(e)) from None
    return decide_on(backend, workload, fraction, max_batch=max_batch)


__all__ = ["Result", "autobatch", "decide_on"]
