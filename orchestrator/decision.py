"""The batch-size decision: pure arithmetic over a ``measure(batch)`` callable.

No torch, no ray. ``decide`` probes batch sizes geometrically, fits peak bytes
against batch size with least squares, extends probing toward the prediction,
then *measures the batch it is about to return* and narrows a bracket
(interpolation, with bisection as the safeguard) until the answer is known to be
within ``tolerance`` of the largest batch that fits. Every batch it returns has
been measured within budget; it never returns a size at or above one that failed.

Given a ``Prior`` (a prediction: the simulator's answer for this device and its
bytes per sample), the search starts at the predicted batch instead of batch 1:
when the prediction is right it measures that batch and one just above the
tolerance (which fails), two measurements in all; when it is off, the same
bracket logic continues from what was measured, anchored on the predicted slope
until the measurements span enough to fit their own line.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

from .errors import OutOfMemory

log = logging.getLogger(__name__)

# The decision's settings, declared once: flags, job files and the API default to these.
FRACTION = 0.8
"""Whole-device usage at the step's peak <= FRACTION x total (YOLO's default)."""
MAX_BATCH = 1024
"""Never answer above this (YOLO's autobatch cap)."""
TOLERANCE = 0.02
"""The search stops within this share of the largest batch that fits."""


@dataclass(frozen=True)
class Probe:
    """One measured training step: ``peak_bytes`` is None when it ran out of memory."""

    batch: int
    peak_bytes: int | None
    oom_message: str = ""  # what the device said when it ran out

    @property
    def oom(self) -> bool:
        return self.peak_bytes is None


@dataclass(frozen=True)
class Fit:
    """``peak_bytes ~= fixed_bytes + bytes_per_sample * batch`` over ``points`` probes."""

    bytes_per_sample: float
    fixed_bytes: float
    r2: float
    points: int

    def predict_batch(self, budget_bytes: int) -> int | None:
        """Largest batch the line keeps within ``budget_bytes``; None if the line has no slope."""
        if self.bytes_per_sample <= 0:
            return None
        return math.floor((budget_bytes - self.fixed_bytes) / self.bytes_per_sample)


@dataclass(frozen=True)
class Prior:
    """A prediction to start from: ``batch`` (0: predicted not to fit at all) and the predicted
    ``bytes_per_sample`` near it (what one more sample costs), e.g. a simulated decision's."""

    batch: int
    bytes_per_sample: float


SPAN = 1.5
"""The measured points fit their own line once the largest is at least SPAN x the smallest; closer
points (a prediction and one just above it) give a slope that allocator rounding dominates, and the
prior's slope is used instead."""


@dataclass
class Decision:
    """What ``decide`` found. ``batch_size`` is 0 when status is ``no-fit``."""

    batch_size: int
    status: str  # "ok" | "no-fit"
    budget_bytes: int
    peak_bytes: int | None  # measured at batch_size
    bytes_per_sample: float | None
    fixed_bytes: float | None
    r2: float | None
    probes: list[Probe] = field(default_factory=list)
    clamped: bool = False  # True when max_batch fits, so the true limit may be higher
    reason: str = ""

    @property
    def measurements(self) -> int:
        return len(self.probes)


def fit_line(points: list[tuple[int, int]]) -> Fit | None:
    """Least-squares line through (batch, peak_bytes) pairs; None with fewer than 2 batches."""
    xs = [float(b) for b, _ in points]
    ys = [float(y) for _, y in points]
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(bytes_per_sample=slope, fixed_bytes=intercept, r2=r2, points=n)


def monotonic(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted by batch, dropping any point whose peak is below a smaller batch's peak.

    A larger batch that needs less memory is measurement noise (or an allocator
    artefact); fitting it would tilt the line.
    """
    kept: list[tuple[int, int]] = []
    for b, y in sorted(points):
        if kept and y < kept[-1][1]:
            continue
        kept.append((b, y))
    return kept


FIT_WINDOW = 8
"""Fit only points at or above 1/FIT_WINDOW of the largest batch measured: below, the optimizer
step rather than the activations sets the peak, and the curve bends."""


def near_limit(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (batch, bytes) points that a line predicting the limit is fitted on (see ``FIT_WINDOW``)."""
    top = max((b for b, _ in points), default=0)
    return [(b, y) for b, y in points if b * FIT_WINDOW >= top]


class _Search:
    """The probes so far, and what they say about where the limit is."""

    def __init__(self, measure: Callable[[int], int], budget_bytes: int):
        self.measure = measure
        self.budget_bytes = budget_bytes
        self.probes: list[Probe] = []

    def run(self, batch: int) -> bool:
        """Measure ``batch``; True when it fits the budget. Only OutOfMemory is caught."""
        message = ""
        try:
            peak = int(self.measure(batch))
        except OutOfMemory as e:
            peak, message = None, str(e)
        self.probes.append(Probe(batch, peak, message))
        log.debug("batch %d -> %s", batch, message or f"{peak} B")
        return self.fits(self.probes[-1])

    def fits(self, probe: Probe) -> bool:
        return probe.peak_bytes is not None and probe.peak_bytes <= self.budget_bytes

    @property
    def hi(self) -> int | None:
        """Smallest batch that failed (OOM or over budget), if any."""
        bad = [p.batch for p in self.probes if not self.fits(p)]
        return min(bad) if bad else None

    @property
    def lo(self) -> int:
        """Largest batch that fit and lies below every failure (0 if none)."""
        hi = self.hi
        good = [p.batch for p in self.probes if self.fits(p) and (hi is None or p.batch < hi)]
        return max(good, default=0)

    def peak_at(self, batch: int) -> int | None:
        return next((p.peak_bytes for p in reversed(self.probes) if p.batch == batch), None)

    def span(self) -> float:
        """Largest over smallest batch measured with a reading (0 when none)."""
        read = [p.batch for p in self.probes if p.peak_bytes is not None]
        return max(read) / min(read) if read else 0.0

    def fit(self) -> Fit | None:
        """Line through the monotonic measured points ``near_limit``, keeping at least the two largest."""
        pts = monotonic([(p.batch, p.peak_bytes) for p in self.probes if p.peak_bytes is not None])
        if len(pts) < 2:
            return None
        window = near_limit(pts)
        return fit_line(window if len(window) >= 2 else pts[-2:])


def decide(
    measure: Callable[[int], int],
    budget_bytes: int,
    *,
    max_batch: int = MAX_BATCH,
    tolerance: float = TOLERANCE,
    first_probes: tuple[int, ...] = (1, 2, 4, 8),
    max_measurements: int = 24,
    prior: Prior | None = None,
) -> Decision:
    """Largest batch whose measured peak is <= ``budget_bytes``.

    ``measure(batch)`` returns the peak bytes of one training step at that batch
    or raises ``OutOfMemory``; any other exception propagates (only OOM is data).
    The result is within ``tolerance`` (relative) of the largest fitting batch,
    assuming peak memory grows with batch size; it is capped at ``max_batch``.
    With a ``prior`` the search starts from its prediction (see the module's text).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    s = _Search(measure, budget_bytes)
    if budget_bytes <= 0:  # nothing to measure: memory outside the allocator already takes the whole fraction
        return _result(s, "no-fit", max_batch=max_batch,
                       reason=f"nothing left: the budget is {budget_bytes} B (memory outside the allocator "
                              "takes the whole fraction)")
    if prior is not None:
        return _from_prior(s, prior, max_batch, tolerance, max_measurements)
    if not s.run(1):
        return _result(s, "no-fit", max_batch=max_batch, reason=_no_fit_reason(s.probes[0], budget_bytes))
    for b in first_probes:
        if b <= 1 or b > max_batch:
            continue
        if not s.run(b):
            break
    while len(s.probes) < max_measurements:
        nxt = _next_batch(s, max_batch, tolerance)
        if nxt is None:
            break
        s.run(nxt)
    else:
        log.warning("stopped after %d measurements; returning the largest verified batch", len(s.probes))
    return _result(s, "ok", max_batch=max_batch)


def _from_prior(s: _Search, prior: Prior, max_batch: int, tolerance: float, max_measurements: int) -> Decision:
    """The search started at the prior's batch; the bracket logic of ``_next_batch`` from there on."""
    if not prior.bytes_per_sample > 0:
        raise ValueError(f"prior.bytes_per_sample={prior.bytes_per_sample} must be > 0")
    s.run(min(max(prior.batch, 1), max_batch))
    while len(s.probes) < max_measurements:
        nxt = _next_batch(s, max_batch, tolerance, prior)
        if nxt is None:
            break
        s.run(nxt)
    else:
        log.warning("stopped after %d measurements; returning the largest verified batch", len(s.probes))
    if s.lo == 0:
        one = [p for p in s.probes if p.batch == 1]  # the search ends at batch 1 when nothing fits
        reason = (_no_fit_reason(one[0], s.budget_bytes) if one else
                  f"nothing fit in {len(s.probes)} measurements down to batch {s.hi}")
        return _result(s, "no-fit", max_batch=max_batch, reason=reason)
    return _result(s, "ok", max_batch=max_batch)


def _below_failure(s: _Search, hi: int, prior: Prior) -> int:
    """The next batch when every measurement so far failed, smallest failure ``hi`` (> 1): where a line
    through ``hi``'s reading meets the budget (the prior's slope; after two failures with readings, the
    slope between them), or 3/4 of ``hi`` when it ran out of memory (no reading to aim from)."""
    peak = s.peak_at(hi)
    if peak is None:
        return max(1, hi * 3 // 4)
    slope = prior.bytes_per_sample
    read = sorted((p.batch, p.peak_bytes) for p in s.probes if p.peak_bytes is not None and p.batch > hi)
    if read and read[0][1] > peak:  # a second failure above: the device's own slope
        slope = (read[0][1] - peak) / (read[0][0] - hi)
    return max(1, min(hi - 1, hi - math.ceil((peak - s.budget_bytes) / slope)))


def _same_side(s: _Search) -> bool:
    """The last two probes both fit, or both failed."""
    return len(s.probes) >= 2 and s.fits(s.probes[-1]) == s.fits(s.probes[-2])


def _next_batch(s: _Search, max_batch: int, tolerance: float, prior: Prior | None = None) -> int | None:
    """The next batch to measure, or None when the answer is settled."""
    lo, hi = s.lo, s.hi
    upper = max_batch if hi is None else min(max_batch, hi - 1)
    if lo >= upper:
        return None  # bracket closed, or max_batch verified
    if lo == 0:  # only with a prior: everything measured so far failed
        return _below_failure(s, hi, prior)
    if hi is None:
        if prior is not None and s.span() < SPAN and not _same_side(s):
            # the prior's slope through the largest batch that fit; once two probes in a row fit
            # (the prior's slope is too steep: creeping up), the measured points' own line
            predicted = lo + math.floor((s.budget_bytes - s.peak_at(lo)) / prior.bytes_per_sample)
        else:
            fit = s.fit()
            predicted = fit.predict_batch(s.budget_bytes) if fit else None
        if predicted is None:
            return min(upper, lo * 2)  # flat so far: keep doubling
        if predicted <= lo * (1 + tolerance):
            # the line says lo is (nearly) the limit, but the curve near the limit is not
            # exactly that line: one probe at the tolerance edge either fails, closing the
            # bracket within tolerance, or fits and moves lo up
            return min(upper, lo + max(1, math.floor(tolerance * lo)))
        if predicted > lo * 4 and prior is None:
            # far beyond the probes: measure halfway first, so the line that picks the
            # answer is fitted near the limit rather than extrapolated from small batches
            return min(upper, predicted // 2)
        return min(upper, predicted)
    if hi - lo <= max(1, math.floor(tolerance * hi)):
        return None  # lo is within tolerance of the limit
    # inside the bracket: interpolate between its ends (regula falsi); bisect when the
    # failed end has no reading (OOM) or the last two guesses fell on the same side
    peak_lo, peak_hi = s.peak_at(lo), s.peak_at(hi)
    if peak_hi is None and prior is not None and not _stalled(s):
        # the failure has no reading, but the prior (or the measured line) has a slope: aim from lo
        fit = s.fit() if s.span() >= SPAN else None
        slope = fit.bytes_per_sample if fit and fit.bytes_per_sample > 0 else prior.bytes_per_sample
        predicted = lo + math.floor((s.budget_bytes - peak_lo) / slope)
        if predicted < hi:  # at or past hi, the slope is too shallow for this device: bisect
            return max(predicted, lo + max(1, math.floor(tolerance * lo)))
    if peak_hi is None or peak_hi <= peak_lo or _stalled(s):
        return (lo + hi) // 2
    predicted = lo + math.floor((s.budget_bytes - peak_lo) * (hi - lo) / (peak_hi - peak_lo))
    if predicted <= lo:
        # the secant says lo is the limit: one probe at the tolerance edge confirms it
        # (its failure closes the bracket) or moves lo up by the tolerance
        return min(hi - 1, lo + max(1, math.floor(tolerance * lo)))
    return min(predicted, hi - 1)


def _stalled(s: _Search) -> bool:
    """Past the first bracket (three probes or more), the last two landed on the same side of the limit:
    interpolation is creeping."""
    return len(s.probes) >= 3 and _same_side(s)


def _no_fit_reason(probe: Probe, budget_bytes: int) -> str:
    if probe.peak_bytes is None:
        return f"batch 1 ran out of memory ({probe.oom_message})" if probe.oom_message else "batch 1 ran out of memory"
    return f"batch 1 needs {probe.peak_bytes} B, budget is {budget_bytes} B"


def _result(s: _Search, status: str, max_batch: int, reason: str = "") -> Decision:
    fit = s.fit()
    batch = s.lo if status == "ok" else 0
    return Decision(
        batch_size=batch,
        status=status,
        budget_bytes=s.budget_bytes,
        peak_bytes=s.peak_at(batch) if batch else None,
        bytes_per_sample=fit.bytes_per_sample if fit else None,
        fixed_bytes=fit.fixed_bytes if fit else None,
        r2=fit.r2 if fit else None,
        probes=list(s.probes),
        clamped=status == "ok" and batch == max_batch,
        reason=reason or (f"capped at max_batch={max_batch}" if batch == max_batch else ""),
    )

