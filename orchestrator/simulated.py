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
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import attention, cudacost, fastfake, models, step
from .tracker import StorageTracker
from .spec import Workload

log = logging.getLogger(__name__)


def _fake_copy(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are fake tensors (structure shared, no data)."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        fake = (mode.fake_tensor_converter.from_meta_and_device(mode, t, torch.device("cpu")) if t.is_meta
                else mode.from_tensor(t))  # a module built on meta (models.Built.real): its tensors on the CPU
        memo[id(t)] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else fake
    return copy.deepcopy(module, memo)


def trace(built: models.Built, workload: Workload, batch: int, *, fake: bool = True, surrogate: bool | None = None,
          run_step: Callable = step.train, cache: fastfake.OutputCache | None = None, shortcuts: bool = True,
          cuda_costs: bool = False, **step_options) -> list[int]:
    """Allocation events of: moving the model to the device, then ``run_step`` (``step.STEPS`` training steps).

    ``fake=False`` runs the step for real on the CPU (slow, memory-hungry): the
    reference that fake runs are checked against. ``surrogate`` (default: ``fake``)
    selects the grad scaler that fake tensors need (no ``.item()``): a real run with
    ``surrogate=True`` is the same step as the fake one, a real run without it is
    the trainer's own. A data-dependent loss (YOLO's) runs for real in a fake trace
    too (``_SplicedLoss``).
    ``run_step`` has ``step.train``'s signature; benchmarks swap in other steps (the
    seed's forward+backward-only probe). ``step_options`` go to ``run_step``.
    ``cache``: fake ops' outputs seen before (``fastfake``) and the spliced loss's events, shared by
    the traces of one workload (default: a new one, which the trace's second step already uses).
    ``shortcuts=False`` runs every op through ``FakeTensorMode`` and the spliced loss once per trace
    and shape: the reference that tests hold the shortcuts to (the same events).
    ``cuda_costs``: trace what a CUDA run holds beyond one epoch's tensors: what kernels allocate inside
    ops (``cudacost``: cuDNN's contiguous copies, cuBLAS workspaces) and, with validation, the next
    epoch's steps on the layout validation leaves (``step.RUN_EPOCHS``); off, the trace is what a real
    CPU run of the step is checked against, to the byte.
    """
    surrogate = fake if surrogate is None else surrogate
    if cuda_costs and run_step is step.train:  # a run: the epoch after a validation too
        step_options.setdefault("epochs", step.run_epochs(workload))
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake:
        model = _fake_copy(built.module, mode)
    else:
        model = (models.on_device(built, torch.device("cpu"), workload).module if built.real is not None
                 else copy.deepcopy(built.module))
    if fake and built.for_fake is not None:
        built.for_fake(model)
    cache = (cache or fastfake.OutputCache()) if fake and shortcuts else None
    tracker = StorageTracker(mode, cache, cuda_costs) if fake else StorageTracker(cuda_costs=cuda_costs)
    loss = built.loss
    if fake and built.data_dependent_loss:
        loss = _SplicedLoss(built.loss, tracker, cache.losses if cache is not None else None)
    run = dataclasses.replace(built, module=model, loss=loss)
    kernels = attention.CudaAttention() if fake and cuda_costs else contextlib.nullcontext()  # CUDA's fused kernels
    with mode:
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        with tracker, kernels:
            run_step(run, workload, batch, torch.device("cpu"), surrogate=surrogate, mark=tracker.mark, **step_options)
    del model, run
    events = tracker.events
    if cuda_costs:  # each cuBLAS handle's workspace: allocated at its first matmul, kept for the process's life
        workspace = cudacost.cublas_workspace_bytes(workload.deterministic)
        events = _held_first([workspace] * len(tracker.cublas), events)
    return _canonical(events)


def _held_first(sizes: list[int], events: list[int]) -> list[int]:
    """``events`` after allocations of ``sizes`` that are never freed (they shift the indices of frees)."""
    k = len(sizes)
    return list(sizes) + [ev - k if ev < 0 else ev for ev in events]


def tensor_peak(events: list[int]) -> int:
    """Peak live bytes of a trace, before any allocator rounding or caching."""
    return max(phase_tensor_peaks(events))


def phase_tensor_peaks(events: list[int]) -> list[int]:
    """Peak live bytes of each phase of a trace (phases are separated by 0 marks)."""
    sizes: list[int] = []
    live = 0
    peaks = [0]
    for ev in events:
        if ev > 0:
            sizes.append(ev)
            live += ev
            peaks[-1] = max(peaks[-1], live)
        elif ev == 0:
            peaks.append(live)
        else:
            live -= sizes[-ev - 1]
    return peaks


class _SplicedLoss:
    """A data-dependent loss (YOLO's target assigner) run for real inside a fake trace.

    Fake tensors cannot index by data, so the loss runs on real CPU tensors shaped
    like the model's fake outputs (stand-ins, not recorded: the outputs are already
    counted), with its forward and backward recorded by the tracker as they allocate;
    the gradients it gives the outputs then flow into the fake graph from a fake
    scalar, allocated there as the backward would allocate them.
    """

    def __init__(self, loss: models.Loss, tracker: StorageTracker, seen: dict | None = None):
        self.loss, self.tracker = loss, tracker
        if hasattr(loss, "setup"):  # the criterion's own tensors exist before any step: not in the trace
            loss.setup(torch.device("cpu"))
        # inputs' shapes -> (its events, grad shapes, cuBLAS handles it used); shared by a profile's traces
        self._seen: dict[tuple, tuple[list[int], list, frozenset]] = {} if seen is None else seen

    def __call__(self, outputs, workload: Workload, batch: int, surrogate: bool):
        flat, spec = tree_flatten(outputs)
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        wants = [t for t in tensors if t.requires_grad]
        key = (tuple((t.shape, t.dtype, t.requires_grad) for t in tensors), torch.is_grad_enabled())
        if key in self._seen:  # the same loss on the same shapes allocates the same: replay it, don't rerun it
            events, shapes, cublas = self._seen[key]
            self.tracker.replay(events)
            self.tracker.cublas |= cublas
        else:
            start, first, before = len(self.tracker.events), self.tracker.allocations, set(self.tracker.cublas)
            shapes = self._run(flat, spec, tensors, wants, workload, batch)
            events = self.tracker.local(start, first)
            if events is not None:
                self._seen[key] = (events, shapes, frozenset(self.tracker.cublas - before))
        if not shapes:
            return tensors[0].new_zeros(())
        return _GradsInto.apply(shapes, *wants)

    def _run(self, flat, spec, tensors, wants, workload, batch) -> list:
        """The loss for real on stand-ins, and the gradient of each output that wants one; its shapes."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            stand_ins = {id(t): self._stand_in(t) for t in tensors}
            real = tree_unflatten([stand_ins.get(id(x), x) for x in flat], spec)
            loss = self.loss(real, workload, batch, False)
            shapes = []
            if wants and loss.requires_grad:  # no grad (validation): the forward is all there is
                grads = torch.autograd.grad(loss, [stand_ins[id(t)] for t in wants], allow_unused=True)
                shapes = [(t.shape, t.dtype) if g is not None else None for t, g in zip(wants, grads)]
                del grads
            del loss, real, stand_ins
        return shapes

    def _stand_in(self, t: torch.Tensor) -> torch.Tensor:
        with self.tracker.untracked():
            real = torch.zeros(t.shape, dtype=t.dtype)
        self.tracker.ignore(real)
        return real.requires_grad_(t.requires_grad)


class _GradsInto(torch.autograd.Function):
    """A zero scalar whose backward gives each input a gradient of its shape (None where the loss gave none)."""

    @staticmethod
    def forward(ctx, shapes, *tensors):
        ctx.shapes, ctx.device = shapes, tensors[0].device
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        grads = [torch.zeros(s[0], dtype=s[1], device=ctx.device) if s else None for s in ctx.shapes]
        return (None, *grads)


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
class Regime:
    """Traces of one shape of step and their affine model in batch size.

    The step's shape depends on the batch only through gradient accumulation: with
    it, a step runs two iterations (``iterations`` 2), without it one (see
    ``step.train``); within a shape every event is affine in the batch size.
    """

    iterations: int
    base: dict[int, list[int]] = field(default_factory=dict)  # batch -> events, traced directly
    intercept: list[int] | None = None  # allocation sizes at b >= 2: intercept + slope * b
    slope: list[int] | None = None  # None for frees and marks, whose entries in intercept are the event

    def fit(self, b1: int, b2: int, b3: int) -> bool:
        """Fit on ``b2``, ``b3`` and check on ``b1`` and ``b3``; True when the traces are affine."""
        e1, e2, e3 = self.base[b1], self.base[b2], self.base[b3]
        if len(e1) == len(e2) == len(e3) and all((x > 0) == (y > 0) for x, y in zip(e2, e3)):
            slope = [(y - x) // (b3 - b2) if x > 0 else None for x, y in zip(e2, e3)]
            intercept = [x - k * b2 if k is not None else x for x, k in zip(e2, slope)]
            if _synthesize(intercept, slope, b1) == e1 and _synthesize(intercept, slope, b3) == e3:
                self.intercept, self.slope = intercept, slope
        return self.slope is not None


def iterations(workload: Workload, batch: int) -> int:
    """The shape of step ``batch`` runs: 2 iterations per optimizer step when gradients accumulate, else 1."""
    return min(step.accumulation(workload, batch), 2)


@dataclass
class Profile:
    """Card-independent allocation traces of one workload at any batch size."""

    workload: Workload
    regimes: dict[int, Regime] = field(default_factory=dict)  # iterations -> its traces
    trace_seconds: float = 0.0
    traced: int = 0
    run_step: Callable = step.train
    """The step that is traced: the full training step unless a benchmark swaps in another."""
    cuda_costs: bool = True
    """Traces are of a CUDA run (``trace``'s ``cuda_costs``: kernels' copies, cuBLAS workspaces, the epoch
    after validation); False: the tensors of one epoch alone, as a real CPU run checks them."""
    _built: models.Built | None = field(default=None, repr=False, compare=False)
    _cache: fastfake.OutputCache | None = field(default=None, repr=False, compare=False)

    @property
    def affine(self) -> bool:
        """Every shape of step profiled so far synthesizes any batch size exactly."""
        return all(r.slope is not None for r in self.regimes.values())

    def events(self, batch: int) -> list[int]:
        it = iterations(self.workload, batch)
        regime = self.regimes.get(it) or self.add_regime(it, PROFILE_BATCHES[1:])
        if batch in regime.base:
            return regime.base[batch]
        if regime.slope is not None and batch >= 2:
            return _synthesize(regime.intercept, regime.slope, batch)
        return self._trace(regime, batch)

    def add_regime(self, it: int, batches: tuple[int, ...]) -> Regime:
        """Trace the step shape ``it`` at ``batches`` and fit it on the last three; when the first three
        already fit (most models: batch 1 is affine with 2 and 3), the rest is not traced."""
        regime = self.regimes[it] = Regime(it)
        for b in batches[:3]:
            self._trace(regime, b)
        if len(batches) > 3 and regime.fit(*batches[:3]):
            return regime
        for b in batches[3:]:
            self._trace(regime, b)
        if not regime.fit(*batches[-3:]):
            log.warning("%s: traces are not affine in batch size; tracing every batch (slower)",
                        self.workload.label())
        return regime

    def _trace(self, regime: Regime, batch: int) -> list[int]:
        if self._built is None:
            self._built = models.build(self.workload)
        t0 = time.perf_counter()
        if self._cache is None:
            self._cache = fastfake.OutputCache()
        ev = trace(self._built, self.workload, batch, run_step=self.run_step, accumulate=regime.iterations,
                   cache=self._cache, cuda_costs=self.cuda_costs)
        self.trace_seconds += time.perf_counter() - t0
        self.traced += 1
        regime.base[batch] = ev
        return ev

    def __getstate__(self):  # travels between Ray processes without the model
        state = dict(self.__dict__)
        state["_built"] = state["_cache"] = None
        return state


def _synthesize(intercept: list[int], slope: list, batch: int) -> list[int]:
    return [c if k is None else c + k * batch for c, k in zip(intercept, slope)]


PROFILE_BATCHES = (1, 2, 3, 4)
"""Batches traced per shape of step: 1, 2 and 3 (batch 1 runs the shape of small batches; in the other
shape it is only the check, traced because its ops are then all remembered, see ``profile``); batch 4
only where batch 1 is not affine with 2 and 3 (e.g. convnext), and then not batch 1 in the other
shape. Small, because YOLO's loss runs for real and its cost grows with the batch."""


def profile(workload: Workload, built: models.Built | None = None, batches=PROFILE_BATCHES,
            run_step: Callable = step.train, cuda_costs: bool = True) -> Profile:
    """Trace every shape of step ``workload`` can take (``iterations``) at ``batches``, and fit each.

    Batch 1 runs the shape of small batches; large batches never accumulate: with
    ``nbs`` > 1 both shapes are traced, so that any card replays the profile alone. The second
    shape is traced at the batches the first just traced: its ops' outputs are remembered
    (``fastfake``), so its traces cost a third of the first's.
    """
    prof = Profile(workload, run_step=run_step, cuda_costs=cuda_costs, _built=built)
    small = iterations(workload, 1)
    first = prof.add_regime(small, batches)
    if small != 1:  # without batch 1 where it was not affine in the first shape
        prof.add_regime(1, batches if len(first.base) <= 3 else batches[1:])
    return prof
