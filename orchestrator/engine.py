"""One device, one workload: the backend measures, the pure core decides."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from . import catalog, simulated, spec
from . import decision as core
from .catalog import NEIGHBOUR_WARN_BYTES
from .cuda import cuda_count
from .devices import make_backend
from .devicetypes import Backend, DeviceInfo, Measurement
from .errors import SpecError
from .simdevice import SimulatedMeasurer
from .spec import Workload, check_fraction, check_max_batch
from .units import MiB, gib

log = logging.getLogger(__name__)

MAX_REDECISIONS = 4
"""Times the answer is re-checked as memory outside the allocator keeps growing (each check can re-decide)."""


GENERIC_WORKSPACE = {9: 32 * MiB}
"""cuBLAS workspace by compute capability's major version, for a card not in the catalog (else 8 MiB)."""


def stand_in(info: DeviceInfo) -> catalog.Card:
    """The card the simulator replays a profile on for a device that reports ``info``: its own total and
    memory outside the allocator, and its catalog entry's workspace (a generic one for an unknown card)."""
    known = catalog.CATALOG.get(info.card) or catalog.by_device_name(info.name, info.total_bytes)
    major = int(info.capability.split(".")[0]) if info.capability[:1].isdigit() else 0
    workspace = known.workspace_bytes if known else GENERIC_WORKSPACE.get(major, 8 * MiB)
    capability = known.capability if known else (major, 0)
    return catalog.Card(key=info.card or info.name, name=info.name, total_bytes=info.total_bytes,
                        capability=capability, context_bytes=info.outside_bytes, workspace_bytes=workspace,
                        sold_gb=known.sold_gb if known else 0,
                        nccl_channels=known.nccl_channels if known else catalog.Card.nccl_channels)


def predict(prof: simulated.Profile, info: DeviceInfo, fraction: float, max_batch: int) -> core.Decision:
    """The simulator's decision for the device that reports ``info`` (see ``stand_in``): milliseconds of
    replays of a profile traced on the CPU, which a real device then verifies (``core.Prior``)."""
    m = SimulatedMeasurer(prof, stand_in(info), outside_bytes=info.outside_bytes)
    return core.decide(lambda b: m(b).reserved_bytes, info.budget_bytes(fraction), max_batch=max_batch)


def prior_of(prediction: core.Decision | None) -> core.Prior | None:
    """Where a real device's search starts from a prediction; None without one, or when it has no slope
    (a no-fit prediction: the search starts at batch 1, which settles that in one measurement)."""
    if prediction is None or prediction.status != "ok" or not (prediction.bytes_per_sample or 0) > 0:
        return None
    return core.Prior(prediction.batch_size, prediction.bytes_per_sample)


@dataclass
class Result:
    """A decision with what it was made for."""

    workload: Workload
    device: DeviceInfo
    fraction: float
    decision: core.Decision
    seconds: float
    profile_seconds: float = 0.0
    """Preparing the measurement: simulated, tracing the workload (shared by every card); CUDA, build and warm-up."""
    val_peak_bytes: int | None = None
    """Peak reserved by the validation pass at the chosen batch (None: no answer, or no validation)."""
    predicted_batch: int | None = None
    """The simulator's answer for this device, where the search started (None: searched from batch 1)."""


def decide_on(backend: Backend, workload: Workload, fraction: float, *, max_batch: int = core.MAX_BATCH,
              profile=None) -> Result:
    """Run the decision for ``workload`` on ``backend``'s device; SpecError for a bad fraction or max_batch.

    ``profile`` (a ``simulated.Profile`` of ``workload``, traced on the CPU): the search starts from what
    the simulator predicts for this device (``predict``) and verifies it, two measurements when
    the prediction is right; the result records the prediction (``predicted_batch``).

    Memory outside the allocator (context, kernels, other processes) is read after every probe and at
    the end; when it grew past what the budget assumed, the answer is checked against the budget
    recomputed with the most seen, and decided again within it if it no longer fits (probes already
    measured are reused). The result's device reports that most-seen figure and any neighbours."""
    check_fraction(fraction)
    check_max_batch(max_batch)
    t0 = time.perf_counter()
    measure = backend.measurer(workload)  # builds the model; CUDA: loads kernels, so context is counted
    info = backend.info()
    # the workload's own memory outside the allocator (DDP: NCCL's buffers) counts from the first probe
    info = dataclasses.replace(info, outside_bytes=max(info.outside_bytes, measure.outside_bytes))
    seen: dict[int, Measurement | str] = {}  # batch -> Measurement, or the out-of-memory message

    def reserved(batch: int) -> int:
        if batch not in seen:
            try:
                seen[batch] = measure(batch)
            except core.OutOfMemory as e:
                seen[batch] = str(e)
        if isinstance(seen[batch], str):
            raise core.OutOfMemory(seen[batch])
        return seen[batch].reserved_bytes

    def prediction(info: DeviceInfo) -> core.Decision | None:  # the simulator's, for the budget ``info`` gives
        return predict(profile, info, fraction, max_batch) if profile is not None else None

    predicted = prediction(info)
    decision = core.decide(reserved, info.budget_bytes(fraction), max_batch=max_batch, prior=prior_of(predicted))
    for _ in range(MAX_REDECISIONS):
        end = backend.info()
        outside = max([info.outside_bytes, end.outside_bytes, measure.outside_bytes]
                      + [m.outside_bytes for m in seen.values() if isinstance(m, Measurement)])
        info = dataclasses.replace(info, outside_bytes=outside, neighbours=max(info.neighbours, end.neighbours),
                                   neighbour_bytes=max(info.neighbour_bytes, end.neighbour_bytes))
        budget = info.budget_bytes(fraction)
        if budget >= decision.budget_bytes:
            break
        log.info("%s: memory outside the allocator grew to %s during the decision; budget %s -> %s",
                 workload.label(), gib(outside), gib(decision.budget_bytes), gib(budget))
        if decision.status != "ok" or decision.peak_bytes <= budget:
            decision = dataclasses.replace(decision, budget_bytes=budget)  # the answer fits the smaller budget
            break
        decision = core.decide(reserved, budget, max_batch=max_batch, prior=prior_of(prediction(info)))
        decision.probes = [core.Probe(b, None, m) if isinstance(m, str) else core.Probe(b, m.reserved_bytes)
                           for b, m in seen.items()]  # every measurement made, in order
    else:
        log.warning("%s: memory outside the allocator was still growing after %d re-checks; the answer fits "
                    "the budget of the last one", workload.label(), MAX_REDECISIONS)
    if info.neighbour_bytes > NEIGHBOUR_WARN_BYTES:
        log.warning("%s on %s: other processes (%d) held %s of the device while it was measured; the answer "
                    "is for what they left (re-runs measure it again)", workload.label(), info.uuid or info.name,
                    info.neighbours, gib(info.neighbour_bytes))
    seconds = time.perf_counter() - t0
    log.info("%s on %s: batch %d (%s) after %d measurements in %.1fs", workload.label(), info.name,
             decision.batch_size, decision.status, decision.measurements, seconds)
    chosen = seen.get(decision.batch_size)
    val = chosen.val_reserved_bytes if isinstance(chosen, Measurement) and chosen.val_reserved_bytes else None
    # 0: predicted not to fit (a prediction without a slope still says its batch; the search then starts at 1)
    return Result(workload, info, fraction, decision, seconds, measure.setup_seconds, val,
                  None if predicted is None else predicted.batch_size if predicted.status == "ok" else 0)


def autobatch(model: str | Workload, imgsz: int | None = None, fraction: float = core.FRACTION, *, gpu: str | None = None,
              max_batch: int = core.MAX_BATCH, predict: bool = True, **fields) -> Result:
    """The largest training batch for ``model`` at ``imgsz`` within ``fraction`` of one device.

    ``fields``: the other workload fields (``spec.Workload``: precision, optimizer,
    ema, ...), or pass a whole ``Workload`` as ``model``. ``gpu`` names a catalog card
    to simulate (e.g. "T4"); None uses this process's current CUDA device, or raises
    when there is none. On a real device, ``predict`` first traces the workload on the
    CPU (fake tensors, seconds) and starts the search at the simulator's answer for this
    device, which then costs 2 measured steps when the prediction is right instead of
    about 7 (``predict=False``: search from batch 1). The drop-in for YOLO's
    ``check_train_batch_size``:
    ``autobatch("ultralytics:yolov8s.yaml", 640).decision.batch_size``.
    """
    workload = model if isinstance(model, Workload) else spec.make(model=model, imgsz=imgsz, **fields)
    if gpu is None and cuda_count() == 0:
        raise SpecError("no CUDA device found: name a card to simulate, e.g. gpu='T4' (--gpu T4)")
    try:
        backend = make_backend(gpu)
    except ValueError as e:  # unknown catalog card
        raise SpecError(str(e)) from None
    profile = None
    if predict and gpu is None:  # a prediction only says where the search starts: without one, batch 1
        try:
            profile = simulated.profile(workload)
        except Exception as e:  # e.g. a model fake tensors cannot run; a sweep's real fleet does the same
            log.warning("%s: no prediction (%s: %s); searching from batch 1", workload.label(), type(e).__name__, e)
    return decide_on(backend, workload, fraction, max_batch=max_batch, profile=profile)


__all__ = ["Result", "autobatch", "decide_on"]
