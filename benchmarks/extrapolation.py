"""Extrapolation: answers for cards a table never measured, against the engine on those cards.

A table is built as a sweep builds it (``engine.decide_on`` on each measured card at the
job's fraction, ``max_batch`` 1024, rows written by ``table.decision_row``); then
``orchestrator.lookup`` answers for every other catalog card at several fractions. Each
answer is judged on the simulated card it was asked for: does the full training step
at that batch fit the card's budget, and how does it compare with what the engine
finds when it measures that card (same cap)?

The same answers are also computed with the plain least-squares slope through the
probes instead of the line drawn above every probe (``answers.upper_line``), to show
what the upper line buys: column ``lsq_over_budget``.

    python -m benchmarks.extrapolation            # 4 workloads x 8 cards x 3 fractions = 96 cases
    python -m benchmarks.extrapolation --quick    # 1 workload x 2 cards x 1 fraction
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from orchestrator import answers, catalog, lookup, simulated, table, targets  # noqa: E402
from orchestrator.decision import OutOfMemory, fit_line  # noqa: E402
from orchestrator.simdevice import SimulatedBackend  # noqa: E402
from orchestrator.engine import decide_on  # noqa: E402
from orchestrator.spec import Workload  # noqa: E402

from . import report  # noqa: E402

log = logging.getLogger(__name__)

WORKLOADS = (
    Workload(model="torchvision:mobilenet_v3_small", imgsz=224),
    Workload(model="torchvision:resnet50", imgsz=224),
    Workload(model="ultralytics:yolov8n.yaml", imgsz=320),
    Workload(model="ultralytics:yolov8s.yaml", imgsz=640),
)
MEASURED = ("T4", "A10G", "A100-80GB")  # the default sweep's simulated fleet
FRACTIONS = (0.6, 0.8, 0.9)
TABLE_FRACTION = 0.8  # the sweep's default: what the table holds
MAX_BATCH = 1024  # the sweep's and lookup's default cap

COLUMNS = ["model", "imgsz", "card", "fraction", "budget_gib", "engine_batch", "engine_clamped", "extrapolated",
           "ratio", "fits", "peak_gib", "lsq_batch", "lsq_fits"]
SUMMARY_COLUMNS = ["answers", "cases", "over_budget", "below_engine", "above_engine", "ratio_min", "ratio_median",
                   "worst_case"]


@dataclass(frozen=True)
class Setup:
    workloads: tuple[Workload, ...] = WORKLOADS
    measured: tuple[str, ...] = MEASURED
    targets: tuple[str, ...] = tuple(k for k in catalog.CATALOG if k not in MEASURED)
    fractions: tuple[float, ...] = FRACTIONS
    max_batch: int = MAX_BATCH


QUICK = Setup(workloads=(Workload(model="ultralytics:yolov8n.yaml", imgsz=320),), targets=("V100-16GB", "H200"),
              fractions=(0.8,))


def _backend(card: str, prof: simulated.Profile) -> SimulatedBackend:
    backend = SimulatedBackend(card)
    backend.add_profile(prof)
    return backend


def _peak(backend: SimulatedBackend, w: Workload, batch: int) -> int | None:
    try:
        return backend.measurer(w)(batch).reserved_bytes
    except OutOfMemory:
        return None


def lsq_batch(rows, target: targets.Target, fraction: float, max_batch: int) -> int:
    """``answers.extrapolate`` with the plain least-squares slope instead of the upper line (diagnostic)."""
    fit = fit_line(answers.probe_points(rows[rows["status"] == "ok"]))
    budget = int(fraction * target.total_bytes) - target.outside_bytes
    usable = budget * (1 - answers.HELD_BACK)
    return min(max_batch, math.floor((usable - fit.fixed_bytes) / fit.bytes_per_sample))


def run(setup: Setup = Setup(), profile=simulated.profile) -> tuple[list[dict], float]:
    """One row per (workload, target card, fraction); returns the rows and the tracing seconds.
    ``profile(workload)`` traces a workload (tests pass their session's cache)."""
    rows, trace_s = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch_table.csv"
        profiles = {}
        for w in setup.workloads:
            t0 = time.perf_counter()
            profiles[w] = profile(w)
            trace_s += time.perf_counter() - t0
            table.write_rows(path, [table.decision_row(decide_on(_backend(c, profiles[w]), w, TABLE_FRACTION,
                                                                 max_batch=setup.max_batch))
                                    for c in setup.measured])
            log.info("%s: profiled in %.1fs, measured on %s", w.label(), time.perf_counter() - t0,
                     ", ".join(setup.measured))
        df = table.read(path)
        for w in setup.workloads:
            mine = answers.workload_rows(df, w, str(path))
            for card in setup.targets:
                backend = _backend(card, profiles[w])
                target = targets.resolve_gpu(card, df)
                for fraction in setup.fractions:
                    a = lookup(df, w, gpu=card, fraction=fraction, max_batch=setup.max_batch)
                    engine = decide_on(backend, w, fraction, max_batch=setup.max_batch).decision
                    budget = backend.info().budget_bytes(fraction)
                    peak = _peak(backend, w, a.batch_size)
                    lsq = lsq_batch(mine, target, fraction, setup.max_batch)
                    lsq_peak = _peak(backend, w, lsq) if lsq >= 1 else 0
                    rows.append({
                        "model": w.model, "imgsz": w.imgsz, "card": card, "fraction": fraction,
                        "budget_gib": round(budget / 2**30, 3), "engine_batch": engine.batch_size,
                        "engine_clamped": engine.clamped, "extrapolated": a.batch_size,
                        "ratio": round(a.batch_size / engine.batch_size, 4),
                        "fits": peak is not None and peak <= budget,
                        "peak_gib": "OOM" if peak is None else round(peak / 2**30, 3),
                        "lsq_batch": lsq, "lsq_fits": lsq_peak is not None and lsq_peak <= budget,
                    })
    return rows, trace_s


def summarize(rows: list[dict]) -> list[dict]:
    """Upper line (what lookup answers) and plain least squares (diagnostic), over every case."""
    out = []
    for name, batch, fits in (("lookup (upper line)", "extrapolated", "fits"), ("least-squares slope", "lsq_batch",
                                                                                "lsq_fits")):
        ratios = [(r[batch] / r["engine_batch"], r) for r in rows]
        worst = min(ratios, key=lambda x: x[0])[1]
        out.append({
            "answers": name, "cases": len(rows), "over_budget": sum(not r[fits] for r in rows),
            "below_engine": sum(x < 1 for x, _ in ratios), "above_engine": sum(x > 1 for x, _ in ratios),
            "ratio_min": round(min(x for x, _ in ratios), 4), "ratio_median": round(statistics.median(x for x, _ in ratios), 4),
            "worst_case": f"{worst['model']}@{worst['imgsz']} on {worst['card']} at {worst['fraction']:g}: "
                          f"{worst[batch]} vs {worst['engine_batch']}",
        })
    return out


def markdown(rows: list[dict], setup: Setup, command: str, trace_s: float, wall_s: float, revision: str) -> str:
    return "\n".join([
        "# Extrapolation: lookups for cards the table never measured",
        "",
        f"Run {report.now()} on {report.machine()}; orchestrator {revision}. Command: `{command}`. "
        f"Wall time {wall_s:.0f} s (tracing {trace_s:.0f} s).",
        "",
        f"Table: {', '.join(w.label() for w in setup.workloads)}, each measured by the engine on "
        f"{', '.join(setup.measured)} at fraction {TABLE_FRACTION} with max_batch {setup.max_batch} (as a sweep "
        f"writes it). Asked: {', '.join(setup.targets)} at fractions {', '.join(map(str, setup.fractions))}, "
        f"lookup capped at {setup.max_batch}: {len(rows)} cases. Simulated cards throughout.",
        "",
        "## Summary",
        "",
        report.markdown_table(summarize(rows), SUMMARY_COLUMNS),
        "",
        "- **over_budget**: the full training step at the answer does not fit the card's budget "
        "(fraction x total - context), measured on that simulated card.",
        "- **ratio**: the answer / the engine's answer when it measures that card (both capped at "
        f"{setup.max_batch}; where both are capped the ratio is 1).",
        "- **least-squares slope**: the same answers with the plain least-squares line through the "
        "probes instead of the line raised above every probe (what `answers.upper_line` replaces).",
        "",
        "## Every case",
        "",
        report.markdown_table(rows, COLUMNS),
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 workload x 2 cards x 1 fraction")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", help="file stem (default extrapolation, or extrapolation_quick with --quick)")
    args = p.parse_args(argv)
    report.setup_logging()
    setup = QUICK if args.quick else Setup()
    revision = report.revision()  # before the run: the code that is measured
    t0 = time.perf_counter()
    rows, trace_s = run(setup)
    wall_s = time.perf_counter() - t0
    command = ("python -m benchmarks.extrapolation " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    print(report.markdown_table(summarize(rows), SUMMARY_COLUMNS))
    stem = args.name or ("extrapolation_quick" if args.quick else "extrapolation")
    for path in (report.write_markdown(args.out / f"{stem}.md", markdown(rows, setup, command, trace_s, wall_s,
                                                                         revision)),
                 report.write_csv(args.out / f"{stem}.csv", rows, COLUMNS)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
