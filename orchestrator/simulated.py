"""The simulated device: a training step on fake tensors, replayed through the allocator model.

``trace`` runs the real training step (``step.train``) under ``FakeTensorMode`` on
device ``cpu``: shapes, dtypes and autograd behave as in a real run but no memory
is touched, so a 640 px YOLO step costs about a second at any batch size. A
``TorchDispatchMode`` sees every tensor storage that is created and (through a
weakref finalizer) freed, giving the sequence of allocations a CUDA device would
receive. ``allocator.replay`` turns that sequence into peak reserved bytes.

``Profile`` makes a workload's traces card-independent and cheap: the event
sequence has the same structure at every batch size and each size is affine in
the batch, so two traces determine a third exactly. It checks that on a third
trace and falls back to tracing every batch when a model breaks the rule.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import models, step
from .spec import Workload

log = logging.getLogger(__name__)


class _StorageTracker(TorchDispatchMode):
    """Records storage allocations (size) and frees (index) in order."""

    def __init__(self):
        super().__init__()
        self.events: list[int] = []  # size > 0: allocation; -(i + 1): free of allocation i
        self._live: dict[int, int] = {}  # id(storage) -> allocation index
        self._count = 0

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        s = t.untyped_storage()
        nbytes = s.nbytes()
        if nbytes == 0 or id(s) in self._live:
            return
        index = self._count
        self._count += 1
        self._live[id(s)] = index
        self.events.append(nbytes)
        weakref.finalize(s, self._free, id(s), index)

    def _free(self, key: int, index: int) -> None:
        if self._live.get(key) == index:
            del self._live[key]
            self.events.append(-(index + 1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def _fake_copy(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are fake tensors (structure shared, no data)."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        fake = mode.from_tensor(t)
        memo[id(t)] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else fake
    return copy.deepcopy(module, memo)


def trace(built: models.Built, workload: Workload, batch: int, *, fake: bool = True, surrogate: bool | None = None,
          run_step: Callable = step.train) -> list[int]:
    """Allocation events of: moving the model to the device, then ``run_step`` (``step.STEPS`` training steps).

    ``fake=False`` runs the step for real on the CPU (slow, memory-hungry): the
    reference that fake runs are checked against. ``surrogate`` (default: ``fake``)
    selects the data-independent loss and grad scaler that fake tensors need; a
    real run with ``surrogate=True`` is the same step as the fake one, a real run
    without it is the trainer's own. ``run_step`` has ``step.train``'s signature;
    benchmarks swap in other steps (the seed's forward+backward-only probe).
    """
    surrogate = fake if surrogate is None else surrogate
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    model = _fake_copy(built.module, mode) if fake else copy.deepcopy(built.module)
    run = models.Built(model, built.stride, built.loss)
    tracker = _StorageTracker()
    with mode:
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        with tracker:
            run_step(run, workload, batch, torch.device("cpu"), surrogate=surrogate)
    del model, run
    return _canonical(tracker.events)


def tensor_peak(events: list[int]) -> int:
    """Peak live bytes of a trace, before any allocator rounding or caching."""
    sizes: list[int] = []
    live = peak = 0
    for ev in events:
        if ev > 0:
            sizes.append(ev)
            live += ev
            peak = max(peak, live)
        else:
            live -= sizes[-ev - 1]
    return peak


def _canonical(events: list[int]) -> list[int]:
    """Sort each run of consecutive frees by allocation index.

    Tensors released together (an autograd graph node, a list) are freed in an order
    that can vary between runs; the allocator's state after a run of frees does not
    depend on that order (coalescing is commutative), so a fixed order loses nothing
    and makes traces at different batch sizes comparable.
    """
    out: list[int] = []
    run: list[int] = []
    for ev in events:
        if ev < 0:
            run.append(ev)
            continue
        out.extend(sorted(run, reverse=True))
        run = []
        out.append(ev)
    out.extend(sorted(run, reverse=True))
    return out


@dataclass
class Profile:
    """Card-independent allocation traces of one workload at any batch size."""

    workload: Workload
    base: dict[int, list[int]]  # batch -> events, traced directly
    intercept: list[int] | None = None  # allocation sizes at b >= 2: intercept + slope * b
    slope: list[int] | None = None  # None for frees, whose entries in intercept are the event
    trace_seconds: float = 0.0
    traced: int = 0
    run_step: Callable = step.train
    """The step that is traced: the full training step unless a benchmark swaps in another."""
    _built: models.Built | None = field(default=None, repr=False, compare=False)

    def events(self, batch: int) -> list[int]:
        if batch in self.base:
            return self.base[batch]
        if self.slope is not None and batch >= 2:
            return _synthesize(self.intercept, self.slope, batch)
        return self._trace(batch)

    def _trace(self, batch: int) -> list[int]:
        if self._built is None:
            self._built = models.build(self.workload)
        t0 = time.perf_counter()
        ev = trace(self._built, self.workload, batch, run_step=self.run_step)
        self.trace_seconds += time.perf_counter() - t0
        self.traced += 1
        self.base[batch] = ev
        return ev

    def __getstate__(self):  # travels between Ray processes without the model
        state = dict(self.__dict__)
        state["_built"] = None
        return state


def _synthesize(intercept: list[int], slope: list, batch: int) -> list[int]:
    return [c if k is None else c + k * batch for c, k in zip(intercept, slope)]


def profile(workload: Workload, built: models.Built | None = None, batches=(1, 2, 4, 8),
            run_step: Callable = step.train) -> Profile:
    """Trace ``workload`` at ``batches``; fit the affine event model on the two largest, check it on another."""
    prof = Profile(workload, {}, run_step=run_step, _built=built)
    for b in batches:
        prof._trace(b)
    b1, b2, b3 = batches[-3], batches[-2], batches[-1]
    e1, e2, e3 = prof.base[b1], prof.base[b2], prof.base[b3]
    if len(e1) == len(e2) == len(e3) and all((x > 0) == (y > 0) for x, y in zip(e2, e3)):
        slope = [(y - x) // (b3 - b2) if x > 0 else None for x, y in zip(e2, e3)]
        intercept = [x - k * b2 if k is not None else x for x, k in zip(e2, slope)]
        if _synthesize(intercept, slope, b1) == e1 and _synthesize(intercept, slope, b3) == e3:
            prof.intercept, prof.slope = intercept, slope
    if prof.slope is None:
        log.warning("%s: traces are not affine in batch size; tracing every batch (slower)", workload.label())
    return prof
