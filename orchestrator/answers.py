"""Read a batch size from the table: the measured row, or a safe answer for a card never measured.

``lookup`` answers in this order:

1. **Measured.** The table has a row for this workload on this card at this
   fraction: its batch size (``no-fit`` and ``error`` rows raise ``NoAnswer``).
2. **Extrapolated.** The card (or the fraction) was never measured, but the same
   workload was measured on some card. A simulated or real training step's peak
   is a card-independent function of batch size, so every probe the table keeps
   for the workload (``probes``/``probe_peak_bytes``, on any card, at any
   fraction) is a point on one curve. The answer solves a line through those
   points for the target's budget, rounded down, with two guards, because the
   curve is not exactly a line (allocator rounding puts some batch sizes a few
   percent above their neighbours):

   - the line's slope is raised until every probe near the top of its card's
     curve lies on or under it (the stored least-squares fit of one card
     overshot the real limit in about half of the cases we checked);
   - ``HELD_BACK`` (2%) of the budget is kept free for what no probe saw.

   Memory outside the allocator on the target: its catalog ``context_bytes``
   when the card is known (what the simulator and a fresh CUDA process use),
   plus, under DDP (``world_size`` > 1), NCCL's buffers for that many ranks
   (``ddp.comm_bytes``); otherwise the largest ``outside_bytes`` among the
   table's rows for the workload, the cautious choice for an unknown card.

A DDP job on several GPU types (``lookup_ranks``, ``lookup --gpus "A10G x4, T4 x4"``)
is answered per card, for the job's total ranks; every rank trains the same batch,
so the answer is the smallest, and the global batch is that times the ranks.

Anything else raises ``NoAnswer`` (a ``SpecError``: exit code 2 in the CLI) with
one line naming what is missing and the nearest keys the table does have.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace


import pandas as pd

from . import catalog, ddp, spec, table as tables
from . import decision as core
from .decision import fit_line, near_limit
from .errors import NoAnswer, SpecError
from .targets import Target, nearest, resolve_gpu, same_card
from .spec import Workload, check_fraction, check_max_batch
from .units import gib, mib

log = logging.getLogger(__name__)

HELD_BACK = 0.02
"""Share of an extrapolated budget left unused: covers allocator steps between the probes."""


@dataclass(frozen=True)
class Answer:
    """A batch size read from the table, with where it came from."""

    batch_size: int
    extrapolated: bool
    """True when no row measured this card at this fraction: the answer comes from the probes of other rows."""
    card: str
    """Catalog key of the source row's card ('' for a card not in the catalog)."""
    gpu_name: str
    """Device name of the source row (for an extrapolation: the measured card nearest in memory)."""
    fraction: float
    explanation: str


def lookup(table: str | os.PathLike | pd.DataFrame, model: str | Workload, imgsz: int | None = None,
           gpu: str | int | float | None = None, *, fraction: float | None = None, max_batch: int = core.MAX_BATCH,
           measured_only: bool = False, **fields) -> Answer:
    """The batch size for ``model`` at ``imgsz`` on ``gpu``, from the table at ``table``.

    ``fields``: the other workload fields (``spec.Workload``: precision, optimizer,
    ema, ..., and the size of a family not sized by ``imgsz``: ``seq_len=2048``; ``imgsz`` None is the
    default, 640, for image models)
    as the rows were measured, each at its default when not given; or pass
    a whole ``Workload`` as ``model``. ``gpu``: None for the current CUDA device; a
    catalog key ("A100-80GB"); a device name as the driver reports it ("Tesla T4");
    total memory as int bytes; or a size in GiB as a float or string ("24"), where a
    size cards are sold as (24 for L4/A10G/RTX 3090/4090) means the smallest catalog
    card sold as that. ``fraction`` None takes the table's. ``measured_only`` refuses
    to extrapolate. Raises ``NoAnswer`` when the table has no answer, ``SpecError``
    for bad arguments.
    """
    check_max_batch(max_batch)
    df, source = _load(table)
    workload = model if isinstance(model, Workload) else spec.make(model=model, imgsz=imgsz, **fields)
    rows = workload_rows(df, workload, source)
    target = resolve_gpu(gpu, df)
    mine = rows[[same_card(r, target) for _, r in rows.iterrows()]]
    fraction = _pick_fraction(fraction, mine if len(mine) else rows, workload)
    exact = mine[mine["fraction"].round(6) == round(fraction, 6)]
    if len(exact):  # the nearest in total memory, should the table hold the card twice (simulated and real)
        return _measured(exact.loc[(exact["gpu_total_bytes"] - target.total_bytes).abs().idxmin()], workload)
    if measured_only:
        cards = nearest(target.card or target.name, sorted({_card_label(r) for _, r in rows.iterrows()}))
        raise NoAnswer(f"{workload.label()} was not measured on {target.label()} at fraction {fraction:g} "
                       f"(measured on {cards}); add the card to the sweep, or drop --measured-only to extrapolate")
    return extrapolate(rows, workload, target, fraction, max_batch)


@dataclass(frozen=True)
class RanksAnswer:
    """The batch per rank of a DDP job whose ranks run on the GPU types in ``answers``."""

    batch_size: int
    """Per rank: the smallest of the cards' answers, since every rank trains the same batch."""
    global_batch: int
    """``batch_size`` x ``world_size``: what trainers whose ``batch`` is global (ultralytics) take."""
    world_size: int
    limiting: str
    """The card whose answer is the per-rank batch (the first such, in the order given)."""
    answers: dict[str, Answer]
    """Each card's own answer for the job's ``world_size``, by the name it was given as."""
    counts: dict[str, int]
    """Ranks on each card."""

    @property
    def extrapolated(self) -> bool:
        return any(a.extrapolated for a in self.answers.values())

    def explanation(self) -> str:
        each = ", ".join(f"{name} x{self.counts[name]}: {a.batch_size}" for name, a in self.answers.items())
        return (f"batch {self.batch_size} per rank, limited by {self.limiting} (per rank: {each}); global batch "
                f"{self.global_batch} = {self.batch_size} x {self.world_size} ranks")


def parse_gpus(text: str) -> list[tuple[str, int]]:
    """``"A10G x4, T4 x4"`` -> [("A10G", 4), ("T4", 4)]; a name may be a catalog key or a device name
    ("Tesla T4 x2"); SpecError for anything else."""
    out = catalog.parse_counts(text, f"gpus={text!r}", "A10G x4, T4 x4")
    names = [n.lower() for n, _ in out]
    if len(set(names)) < len(names):
        raise SpecError(f"gpus={text!r} names a card twice: give each card once with its count, e.g. 'T4 x8'")
    return out


def lookup_ranks(table: str | os.PathLike | pd.DataFrame, model: str | Workload, imgsz: int | None = None, *,
                 gpus: str | list[tuple[str, int]], world_size: int | None = None, fraction: float | None = None,
                 max_batch: int = core.MAX_BATCH, measured_only: bool = False, **fields) -> RanksAnswer:
    """The per-rank batch of a DDP job with ranks on ``gpus`` (``"A10G x4, T4 x4"`` or [(card, count)]):
    each card answered by ``lookup`` for the job's total ranks, and the smallest taken. ``world_size`` None
    (or the workload's 1) is the total count; another value than the total is a SpecError. Any card the
    table cannot answer raises ``NoAnswer``."""
    items = parse_gpus(gpus) if isinstance(gpus, str) else [(str(n), int(c)) for n, c in gpus]
    total = sum(c for _, c in items)
    if isinstance(model, Workload):
        given = world_size if world_size is not None else (model.world_size if model.world_size != 1 else None)
    else:
        given = world_size
    if given is not None and given != total:
        raise SpecError(f"world_size={given} but gpus={gpus!r} holds {total} ranks: drop --world-size (it is the "
                        f"total) or give every rank's card")
    df, _ = _load(table)
    for name, count in items:  # an unknown card first: the lookups below would blame the world size
        try:
            resolve_gpu(name, df, memory_hint=f"as the entry, e.g. '24 x{count}' for a 24 GB card")
        except SpecError as e:
            raise type(e)(f"gpus={gpus!r}: {e}") from None
    if isinstance(model, Workload):
        workload = replace(model, world_size=total)
    else:
        workload = spec.make(model=model, imgsz=imgsz, world_size=total, **fields)
    answers = {name: lookup(table, workload, gpu=name, fraction=fraction, max_batch=max_batch,
                            measured_only=measured_only) for name, _ in items}
    limiting = min(answers, key=lambda n: answers[n].batch_size)
    batch = answers[limiting].batch_size
    return RanksAnswer(batch, batch * total, total, limiting, answers, dict(items))


def _load(table) -> tuple[pd.DataFrame, str]:
    """The table (a DataFrame is taken as ``table.read`` returns it) and how to name it in errors."""
    df, source = (table, "the table") if isinstance(table, pd.DataFrame) else (tables.read(table), os.fspath(table))
    if df.empty:
        raise NoAnswer(f"{source} has no rows (missing or empty): build it with "
                       f"`python -m orchestrator sweep --out {source}`")
    return df, source


# -- which rows: the workload, narrowed one key at a time so the error names the key that is missing


def workload_rows(df: pd.DataFrame, w: Workload, source: str) -> pd.DataFrame:
    """Rows of ``df`` for workload ``w`` (any card, any fraction); NoAnswer names the first key not there."""
    what = ""
    for col in spec.KEYS:
        value = getattr(w, col)
        hit = df[df[col] == value]
        if hit.empty:
            there = nearest(value, df[col].unique().tolist())
            raise NoAnswer(f"{col}={value!r} is not in {source}{what}: it has {col} {there}; "
                           "pick one of those or measure it with `python -m orchestrator sweep`")
        df = hit
        what = f" for {w.model}" if col == "model" else f"{what} {col}={value}"
    return df


def _pick_fraction(fraction: float | None, rows: pd.DataFrame, w: Workload) -> float:
    if fraction is not None:
        check_fraction(fraction)
        return float(fraction)
    there = sorted(rows["fraction"].round(6).unique())
    if len(there) > 1:
        raise NoAnswer(f"fraction is ambiguous for {w.label()}: the table has {', '.join(map(str, there))}; "
                       "pass one (fraction=, --fraction)")
    return float(there[0])


# -- answers


def _measured(row, w: Workload) -> Answer:
    where = f"{row['gpu_name']} ({gib(row['gpu_total_bytes'])}) at fraction {row['fraction']:g}"
    if row["status"] == "no-fit":
        raise NoAnswer(f"{w.label()} does not fit on {where} (no-fit: {row['error'] or 'batch 1 is over budget'}); "
                       f"try a smaller {w.size_axis}, fp16/bf16, SGD, --no-ema or a larger card")
    if row["status"] == "error":
        raise NoAnswer(f"{w.label()} failed to measure on {where} ({row['error']}); "
                       "fix the cause and re-run the sweep with --force")
    batch = int(row["batch_size"])
    text = (f"{w.label()}: batch {batch}, measured on {where} ({row['backend']}): "
            f"peak {gib(row['peak_bytes'])} of a {gib(row['budget_bytes'])} budget")
    if row["clamped"]:
        text += "; capped at the sweep's max batch, the card may take more"
    card = row["card"] if isinstance(row["card"], str) else ""
    return Answer(batch, False, card, str(row["gpu_name"]), float(row["fraction"]), text)


@dataclass(frozen=True)
class Line:
    """``peak_bytes <= fixed_bytes + bytes_per_sample * batch`` for every probe it was drawn over."""

    bytes_per_sample: float
    fixed_bytes: float
    points: int


def probe_points(rows: pd.DataFrame) -> list[tuple[int, int]]:
    """(batch, peak bytes) of every probe that ran, each row's points near the top of its curve.

    Small batches are left out as the decision's fit leaves them out
    (``decision.near_limit``): there the optimizer step, not the activations, sets the peak.
    """
    points: list[tuple[int, int]] = []
    for _, r in rows.iterrows():
        pairs = [(int(b), int(p)) for b, p in zip(str(r["probes"]).split(","), str(r["probe_peak_bytes"]).split(","))
                 if p.strip().isdigit()]
        points += near_limit(pairs)
    return points


def upper_line(points: list[tuple[int, int]]) -> Line | None:
    """Least-squares line through ``points``, its slope raised until no point lies above it."""
    fit = fit_line(points)
    if fit is None or fit.bytes_per_sample <= 0:
        return None
    # through the fit's intercept, steep enough that every point is on or under the line
    slope = max([fit.bytes_per_sample] + [(p - fit.fixed_bytes) / b for b, p in points])
    return Line(slope, fit.fixed_bytes, len(points))


def extrapolate(rows: pd.DataFrame, w: Workload, target: Target, fraction: float, max_batch: int) -> Answer:
    """The answer for a card or fraction no row measured, from every probe of ``w`` in ``rows``."""
    ok = rows[rows["status"] == "ok"]
    line = upper_line(probe_points(ok)) if len(ok) else None
    if line is None:
        raise NoAnswer(_nothing_to_extrapolate(rows, w))
    outside, why = _outside(target, rows, w)
    budget = int(fraction * target.total_bytes) - outside
    usable = budget * (1 - HELD_BACK)
    batch = min(max_batch, math.floor((usable - line.fixed_bytes) / line.bytes_per_sample))
    if batch < 1:
        raise NoAnswer(f"{w.label()} is not expected to fit on {target.label()} at fraction {fraction:g} "
                       f"(extrapolated: batch 1 needs about {gib(line.fixed_bytes + line.bytes_per_sample)}, "
                       f"budget {gib(budget)}); try a larger fraction or card, or a smaller {w.size_axis}")
    cards = ", ".join(sorted({_card_label(r) for _, r in ok.iterrows()}))
    text = (f"{w.label()}: batch {batch}, EXTRAPOLATED for {target.label()} at fraction {fraction:g} "
            f"(no row measured it): budget {gib(budget)} = {fraction:g} x {gib(target.total_bytes)} - "
            f"{gib(outside)} outside ({why}), {HELD_BACK:.0%} of it held back; line {mib(line.bytes_per_sample)}/"
            f"sample + {mib(line.fixed_bytes)} over {line.points} probes measured on {cards}"
            + (f"; capped at max_batch={max_batch}" if batch == max_batch else ""))
    log.info("%s", text)
    near = ok.loc[(ok["gpu_total_bytes"] - target.total_bytes).abs().idxmin()]  # named as the source row
    card = near["card"] if isinstance(near["card"], str) else ""
    return Answer(batch, True, card, str(near["gpu_name"]), fraction, text)


def _card_label(row) -> str:
    return row["card"] if isinstance(row["card"], str) and row["card"] else str(row["gpu_name"])


def _outside(target: Target, rows: pd.DataFrame, w: Workload) -> tuple[int, str]:
    if target.outside_bytes is None:  # the rows were measured with this workload: their DDP buffers included
        return int(rows["outside_bytes"].max()), "unknown card: the largest in the table's rows for this workload"
    if w.world_size == 1:
        return target.outside_bytes, target.outside_from
    channels = target.nccl_channels or catalog.channels_for(None)
    comm = ddp.comm_bytes(w.world_size, channels)
    return target.outside_bytes + comm, (f"{target.outside_from}, and {mib(comm)} of NCCL buffers for "
                                         f"{w.world_size} ranks on {channels} channels")


def _nothing_to_extrapolate(rows: pd.DataFrame, w: Workload) -> str:
    no_fit = rows[rows["status"] == "no-fit"]
    r = no_fit.iloc[0] if len(no_fit) else rows.iloc[0]
    where = f"{r['gpu_name']} at fraction {r['fraction']:g}"
    if len(no_fit):
        return (f"{w.label()} did not fit on any card in the table ({where}: {r['error']}); "
                f"nothing to extrapolate from: try a smaller {w.size_axis} or a larger card")
    return (f"{w.label()} has no usable measurement to extrapolate from ({where}: {r['status']} "
            f"{r['error'] or ''}); fix the cause and re-run the sweep with --force")
