"""The batch-size algorithms we compare, all run against the same simulated cards.

Written by us from the algorithms' descriptions (the annotated YOLOv5/YOLOv9 seed in
``../shared/seeds/``, ultralytics' and Lightning's documented behaviour), not copied:

- ``seed``: YOLOv5/YOLOv9 ``utils/autobatch.py``. Before probing it reads total,
  reserved and allocated memory in GiB and takes free = total - (reserved +
  allocated). It probes batch 1, 2, 4, 8, 16 with its profiler's loop: 3 iterations
  of forward, sum of the outputs, backward; no loss function, no optimizer step or
  state, no grad scaler, no EMA. It reads ``memory_reserved()`` after each probe in
  GB (1e9 bytes), fits a line with x = the first len(y) batch sizes (misaligned
  when a middle probe failed), solves for ``fraction`` of free, steps back to the
  probe before the first failure if the answer is at or above it, and uses 16 when
  the answer is outside 1..1024. An error in the fit is not caught: training stops.
- ``ultralytics-style``: the same, probing 7 sizes (1..64) on cards of 16 GiB or
  more, dropping points that are not increasing or not within (0, total) before the
  fit; any error gives the default 16. Its own default fraction is 0.6; the
  benchmarks run every algorithm at the same fraction and this one at 0.6 besides.
- ``power``: Lightning's ``scale_batch_size(mode="power")``: double from 1 until a
  step fails, keep the last success. It measures the full training step; "fails"
  is out of memory or over the budget (Lightning itself only knows OOM, so it would
  fill the card regardless of any fraction).
- ``ours``: ``orchestrator.decision.decide`` on the full-step measurement.
- ``seed-fullstep`` (diagnostic): the seed's arithmetic fed with the full-step
  measurement, separating the fault of its probe from the faults of its arithmetic.

Every algorithm is capped at batch 1024 (the seed's "safe range"). Each algorithm
takes the fraction of its testbed (``Testbed.fraction``).

Cost is counted in one unit for every algorithm: forward+backward passes
(``Outcome.passes``), with the optimizer steps among them apart, and what the same
decision would add on a real GPU (``Outcome.warmup``: our CUDA backend runs one
unmeasured measurement at batch 1 before the first, so that the CUDA context it
loads is counted).
"""
from __future__ import annotations

import itertools
import random
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from orchestrator import allocator, catalog, models, simulated, step
from orchestrator.decision import OutOfMemory, decide
from orchestrator.devicetypes import DeviceInfo
from orchestrator.simdevice import SimulatedBackend, replay_run
from orchestrator.spec import Workload

from orchestrator.units import GiB
GB = 10**9  # the seed's profiler reports memory in GB
MAX_BATCH = 1024  # the seed's "safe range" upper end; every algorithm is capped here
DEFAULT_BATCH = 16  # the seed's and ultralytics' fallback
SEED_SIZES = (1, 2, 4, 8, 16)
ULTRALYTICS_SIZES = (1, 2, 4, 8, 16, 32, 64)  # on cards of 16 GiB or more
SEED_ITERATIONS = 3  # the profiler's n=3 in the seed's autobatch call


def forward_backward(built, workload: Workload, batch: int, device: torch.device, *, surrogate: bool = False,
                     **_) -> None:
    """The seed's probe: ``SEED_ITERATIONS`` x (forward, sum of every output, backward) on one input.

    As the seed's profiler runs it: an uninitialised input that requires grad, the
    sum of the raw outputs instead of a loss, gradients accumulating across
    iterations, under autocast when the trainer uses AMP. Nothing else runs: no loss
    function, no optimizer step or state, no grad scaler, no EMA. Same signature as
    ``step.train``, so ``simulated.trace`` can trace it.
    """
    model = built.module.train()
    dtype = step.AMP_DTYPES.get(workload.precision)
    images = torch.empty(batch, 3, workload.imgsz, workload.imgsz, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(SEED_ITERATIONS):
            outputs = model(images)
            leaves = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            sum(t.sum() for t in leaves).backward()
    # images, the last outputs and the gradients are alive when the seed reads memory_reserved()


def _load_only(built, workload, batch, device, *, surrogate=False, **_) -> None:
    """No step: what a trace records is the model's weights arriving on the device."""


@dataclass
class Traces:
    """Card-independent traces of one workload: the full training step and the seed's probe."""

    workload: Workload
    full: simulated.Profile
    probe: simulated.Profile
    resident: list[int]
    """Allocations of the model's weights and buffers: on the device before the seed probes."""
    seconds: float = 0.0


def trace_workload(workload: Workload) -> Traces:
    """Build the model once and trace both steps at batch 1, 2, 4, 8 (any other batch is synthesized)."""
    t0 = time.perf_counter()
    built = models.build(workload)
    full = simulated.profile(workload, built)
    probe = simulated.profile(workload, built, run_step=forward_backward)
    loaded = simulated.trace(built, workload, 1, run_step=_load_only)
    resident = list(itertools.takewhile(lambda ev: ev > 0, loaded))
    return Traces(workload, full, probe, resident, time.perf_counter() - t0)


class Testbed:
    """One workload on one simulated card, and the measurements an algorithm may call."""

    def __init__(self, traces: Traces, card: str, fraction: float = 0.8):
        self.traces = traces
        self.backend = SimulatedBackend(card)
        self.backend.add_profile(traces.full)
        self.info: DeviceInfo = self.backend.info()
        self.fraction = fraction
        self.budget_bytes = self.info.budget_bytes(fraction)
        self._full_step = self.backend.measurer(traces.workload)
        self._judged: dict[int, int | None] = {}

    def full_step(self, batch: int) -> int:
        """Peak reserved bytes of the full training step (what ``ours`` measures); raises OutOfMemory."""
        return self._full_step(batch).reserved_bytes

    def full_step_or_none(self, batch: int) -> int | None:
        try:
            return self._full_step(batch).reserved_bytes
        except OutOfMemory:
            return None

    def fits(self, batch: int) -> bool:
        """The full step at ``batch`` neither runs out of memory nor exceeds the budget."""
        peak = self.full_step_or_none(batch)
        return peak is not None and peak <= self.budget_bytes

    def judged_peak(self, batch: int) -> int | None:
        """``full_step_or_none``, remembered: for ground truth and judging, not for the algorithms' timing."""
        if batch not in self._judged:
            self._judged[batch] = self.full_step_or_none(batch)
        return self._judged[batch]

    def judged_fits(self, batch: int) -> bool:
        peak = self.judged_peak(batch)
        return peak is not None and peak <= self.budget_bytes

    def probe_reserved(self, batch: int) -> int | None:
        """``memory_reserved()`` after the seed's forward+backward probe; None when it ran out of memory."""
        card = self.backend.card
        events = self.traces.probe.events(batch)
        held = [] if self.traces.probe.cuda_costs else [card.workspace_bytes]  # else the trace holds cuBLAS's
        try:
            return allocator.replay(events, card.total_bytes - card.context_bytes, held=held).reserved
        except allocator.AllocatorOutOfMemory:
            return None

    def resident(self) -> tuple[int, int]:
        """(reserved, allocated) bytes before probing: the cuBLAS workspace and the model's weights."""
        stats = allocator.replay([self.backend.card.workspace_bytes] + self.traces.resident)
        return stats.reserved, stats.allocated


class PerturbedCard:
    """The card as it might really be: per-sample bytes, CUDA context and cuBLAS workspace each off
    from the simulation by up to ``spread`` (uniform, drawn once from ``seed_text``).

    The algorithms measure the unperturbed simulation (``Testbed``); their choices are judged here,
    where, as between a real card and its simulation, the judge is not the measurement they verified.
    Per-sample bytes: the affine event model's slopes are scaled (every allocation, where the
    workload's traces are not affine).
    """

    def __init__(self, traces: Traces | simulated.Profile, card: str, seed_text: str = "", spread: float = 0.03,
                 factors: tuple[float, float, float] | None = None):
        """``factors``: (per-sample, context, workspace) multipliers to use instead of random ones."""
        rng = random.Random(zlib.crc32(seed_text.encode()))
        self.per_sample, self.context, self.workspace = factors or (1 + rng.uniform(-spread, spread) for _ in range(3))
        c = catalog.card(card)
        self.card_key = card
        self.total_bytes = c.total_bytes
        self.context_bytes = round(c.context_bytes * self.context)
        self.workspace_bytes = round(c.workspace_bytes * self.workspace)
        self.profile = traces if isinstance(traces, simulated.Profile) else traces.full
        self._peaks: dict[int, int | None] = {}

    def label(self) -> str:
        return (f"per-sample {self.per_sample - 1:+.1%}, context {self.context - 1:+.1%}, "
                f"workspace {self.workspace - 1:+.1%}")

    def events(self, batch: int) -> list[int]:
        prof = self.profile
        base = prof.events(batch)  # also profiles the shape of step this batch takes, if not yet done
        regime = prof.regimes[simulated.iterations(prof.workload, batch)]
        if regime.slope is None:
            return self._scaled(base)
        slope = [None if k is None else round(k * self.per_sample) for k in regime.slope]
        if batch >= 2:
            return [c if k is None else c + k * batch for c, k in zip(regime.intercept, slope)]
        # batch 1 is traced, not synthesized: shift its allocations where they line up
        if len(base) == len(slope) and all((e > 0) == (k is not None) for e, k in zip(base, slope)):
            return [e if k is None else e + k - k0 for e, k, k0 in zip(base, slope, regime.slope)]
        return self._scaled(base)

    def _scaled(self, events: list[int]) -> list[int]:
        return [round(e * self.per_sample) if e > 0 else e for e in events]

    def peak(self, batch: int) -> int | None:
        """Peak reserved bytes of the full step at ``batch`` on this card, as the simulated card reads it
        (``simdevice.replay_run``); None when it runs out of memory. A profile that holds its own cuBLAS
        workspaces (``cuda_costs``) gets the workspace's perturbation as a held block where it is larger."""
        if batch not in self._peaks:
            card = catalog.card(self.card_key)
            held = ([max(self.workspace_bytes - card.workspace_bytes, 0)] if self.profile.cuda_costs
                    else [self.workspace_bytes])
            try:
                self._peaks[batch] = replay_run(self.profile, self.events(batch), self.total_bytes - self.context_bytes,
                                                self.context_bytes, [h for h in held if h]).reserved_bytes
            except OutOfMemory:
                self._peaks[batch] = None
        return self._peaks[batch]

    def budget_bytes(self, fraction: float) -> int:
        return int(fraction * self.total_bytes) - self.context_bytes

    def fits(self, batch: int, fraction: float) -> bool:
        peak = self.peak(batch)
        return peak is not None and peak <= self.budget_bytes(fraction)


@dataclass
class Outcome:
    """What one algorithm chose for one testbed. ``batch`` is None when the algorithm raised."""

    batch: int | None
    probes: list[int] = field(default_factory=list)  # batches measured, in order
    passes: int = 0
    """Forward+backward passes those measurements ran (an OOM probe of the seed family: 1)."""
    optimizer_steps: int = 0
    """Optimizer steps among them: the seed family's probe runs none, a full training step one each."""
    warmup: int = 0
    """Measurements a CUDA backend adds that the simulated one does not (ours: 1, at batch 1)."""
    note: str = ""
    target_bytes: float | None = None
    """Seed family: the reading its fit solved for (fraction x free GiB, read as GB), in bytes."""

    @property
    def measurements(self) -> int:
        return len(self.probes)

    @property
    def passes_cuda(self) -> int:
        """``passes`` on a real GPU: each warm-up measurement is another full measurement (``step.STEPS`` steps)."""
        return self.passes + self.warmup * step.STEPS


class _Meter:
    """Wraps a measurement, recording the batches it was asked for."""

    def __init__(self, measure: Callable[[int], object]):
        self.measure = measure
        self.batches: list[int] = []

    def __call__(self, batch: int):
        self.batches.append(batch)
        return self.measure(batch)


def _seed_memory(bed: Testbed) -> tuple[float, float]:
    """The seed's view before probing: (total GiB, free GiB)."""
    total_gib = bed.info.total_bytes / GiB  # total_memory: the CUDA context is inside it, unseen
    reserved, allocated = bed.resident()
    # allocated is part of reserved, so it is subtracted twice; the context not at all
    return total_gib, total_gib - (reserved + allocated) / GiB


def _solve(sizes, used_gb, free_gib: float, fraction: float) -> int:
    """Fit memory (GB) against batch, solve for ``fraction`` of free (GiB): the units differ, as in the seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        slope, intercept = np.polyfit(sizes, used_gb, deg=1)
    return int((free_gib * fraction - intercept) / slope)


def _step_back(batch: int, sizes, results) -> int:
    """If the answer is at or above the first failed probe, take the probe before it."""
    if None in results:
        failed = results.index(None)
        if batch >= sizes[failed]:
            batch = sizes[max(failed - 1, 0)]
    return batch


def seed(bed: Testbed, fraction: float | None = None, *, probe: Callable[[int], int | None] | None = None,
         iterations: int = SEED_ITERATIONS, optimizer_steps: bool = False) -> Outcome:
    """YOLOv5/YOLOv9 autobatch at ``fraction`` (default: the testbed's); ``probe`` replaces its
    forward+backward reading (``seed-fullstep``, whose ``iterations`` are full steps: ``optimizer_steps``)."""
    fraction = bed.fraction if fraction is None else fraction
    meter = _Meter(probe or bed.probe_reserved)
    total_gib, free_gib = _seed_memory(bed)
    results = [None if (m := meter(b)) is None else m / GB for b in SEED_SIZES]
    used = [y for y in results if y is not None]
    cost = _cost(results, iterations, optimizer_steps)
    try:
        # x is the first len(used) sizes, whichever probes failed
        batch = _solve(SEED_SIZES[:len(used)], used, free_gib, fraction)
    except (ArithmeticError, TypeError, ValueError, np.linalg.LinAlgError) as e:
        return Outcome(None, meter.batches, *cost, note=f"raises {type(e).__name__}: training does not start")
    return _safe_range(_step_back(batch, SEED_SIZES, results), meter, cost, free_gib * fraction * GB)


def _cost(results, iterations: int, optimizer_steps: bool) -> tuple[int, int]:
    """(passes, optimizer steps) of the seed family's probes: ``iterations`` each, 1 for one that ran out."""
    passes = sum(iterations if y is not None else 1 for y in results)
    return passes, passes if optimizer_steps else 0


def _safe_range(batch: int, meter: "_Meter", cost: tuple[int, int], target_bytes: float) -> Outcome:
    """The seed family's last word: outside 1..1024 the fit is not trusted and 16 is used."""
    note = ""
    if batch < 1 or batch > MAX_BATCH:
        batch, note = DEFAULT_BATCH, f"fit gave {batch}: default {DEFAULT_BATCH}"
    return Outcome(batch, meter.batches, *cost, note=note, target_bytes=target_bytes)


def seed_fullstep(bed: Testbed, fraction: float | None = None) -> Outcome:
    """The seed's arithmetic on the full-step measurement: what its probe alone costs it."""
    return seed(bed, fraction, probe=bed.full_step_or_none, iterations=step.STEPS, optimizer_steps=True)


def ultralytics_style(bed: Testbed, fraction: float | None = None) -> Outcome:
    """The seed with 7 probes on cards >= 16 GiB, non-increasing points dropped, errors -> 16, at
    ``fraction`` (default: the testbed's; ultralytics' own default is ``ULTRALYTICS_FRACTION``)."""
    fraction = bed.fraction if fraction is None else fraction
    meter = _Meter(bed.probe_reserved)
    total_gib, free_gib = _seed_memory(bed)
    sizes = SEED_SIZES if total_gib < 16 else ULTRALYTICS_SIZES
    results = [None if (m := meter(b)) is None else m / GB for b in sizes]
    cost = _cost(results, SEED_ITERATIONS, False)
    points = [
        (b, y) for i, (b, y) in enumerate(zip(sizes, results))
        if y is not None and 0 < y < total_gib and (i == 0 or results[i - 1] is None or y > results[i - 1])
    ]
    try:
        batch = _solve([b for b, _ in points], [y for _, y in points], free_gib, fraction)
    except (ArithmeticError, TypeError, ValueError, np.linalg.LinAlgError) as e:
        return Outcome(DEFAULT_BATCH, meter.batches, *cost, note=f"{type(e).__name__}: default {DEFAULT_BATCH}")
    return _safe_range(_step_back(batch, sizes, results), meter, cost, free_gib * fraction * GB)


def power(bed: Testbed, max_batch: int = MAX_BATCH) -> Outcome:
    """Lightning's power scaling: double from 1 while the full step fits; the last fit wins (0: none)."""
    fits = _Meter(bed.fits)
    batch, last_fit = 1, 0
    while batch <= max_batch and fits(batch):
        last_fit, batch = batch, batch * 2
    steps = len(fits.batches) * step.STEPS
    return Outcome(last_fit, fits.batches, steps, steps)


def ours(bed: Testbed, max_batch: int = MAX_BATCH) -> Outcome:
    """``orchestrator.decision.decide`` on the full-step measurement (0: no-fit)."""
    meter = _Meter(bed.full_step)
    d = decide(meter, bed.budget_bytes, max_batch=max_batch)
    steps = len(meter.batches) * step.STEPS
    return Outcome(d.batch_size, meter.batches, steps, steps, warmup=1, note=d.reason)


ALGORITHMS: dict[str, Callable[[Testbed], Outcome]] = {
    "seed": seed,
    "ultralytics-style": ultralytics_style,
    "power": power,
    "ours": ours,
    "seed-fullstep": seed_fullstep,
}
"""Every algorithm at the testbed's fraction: the same budget for all."""

ULTRALYTICS_FRACTION = 0.6
OWN_DEFAULTS: dict[str, tuple[float, Callable[[Testbed], Outcome]]] = {
    "ultralytics-style@0.6": (ULTRALYTICS_FRACTION, ultralytics_style),
}
"""Algorithms whose own default fraction differs: run (and judged) at that fraction besides."""
