"""Prediction first: measured steps on a "real" device that its simulation does not know exactly.

A sweep on real GPUs traces each workload once on the CPU (fake tensors) and replays
that profile for each device to predict its answer; the device then measures the
predicted batch and one just above the tolerance, and only searches further when the
prediction is off (``decision.Prior``). Here the "real" device is a simulated card with
perturbed constants (``baselines.PerturbedCard``: CUDA context and cuBLAS workspace off by
+-5/15/30%, bytes per sample off by +-3/10%, alone and together), and the prediction is
the unperturbed simulation of the catalog card. Each case is decided three ways on the
perturbed card:

- ``from batch 1``: no prediction (what every real-device decision did before);
- ``predicted (catalog)``: the prior is the catalog card's simulated answer, which knows
  neither the context nor the per-sample bytes of this device (the harder case);
- ``predicted (device)``: the prior is the simulation replayed with this device's own
  total and outside-the-allocator memory (``engine.predict`` on what the device reports),
  as a sweep or ``autobatch`` on a real card does; it still misses the per-sample bytes
  and the workspace.

Judged on the perturbed card itself: chosen / its true limit (bisection), over budget.
Measured steps count the batch sizes run on the device (each is one measurement of two
training steps; the CUDA backend's warm-up at batch 1 comes on top, for every variant).

    python -m benchmarks.prediction_cost            # 6 workloads x 4 cards x 21 perturbations
    python -m benchmarks.prediction_cost --quick    # 2 workloads x 2 cards
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from orchestrator import engine, simulated  # noqa: E402
from orchestrator.decision import OutOfMemory, decide  # noqa: E402
from orchestrator.simdevice import SimulatedBackend  # noqa: E402
from orchestrator.spec import Workload  # noqa: E402

from . import report  # noqa: E402
from .baselines import MAX_BATCH, PerturbedCard  # noqa: E402

FRACTION = 0.8
WORKLOADS = [
    Workload(model="torchvision:resnet50", imgsz=224),
    Workload(model="torchvision:mobilenet_v3_large", imgsz=320),
    Workload(model="torchvision:efficientnet_b0", imgsz=224),
    Workload(model="timm:convnext_tiny", imgsz=224, optimizer="AdamW"),
    Workload(model="ultralytics:yolov8n.yaml", imgsz=640),
    Workload(model="ultralytics:yolo11s.yaml", imgsz=640),
]
CARDS = ("T4", "A10G", "A100-80GB", "H100-80GB")
QUICK = (WORKLOADS[:1] + WORKLOADS[4:5], ("T4", "A100-80GB"))


def perturbations() -> list[tuple[str, str, tuple[float, float, float]]]:
    """(group, label, (per-sample, context, workspace) factors)."""
    out = [("exact", "none", (1.0, 1.0, 1.0))]
    for s in (0.05, 0.15, 0.30):
        for sign in (1, -1):
            out.append((f"context+workspace {s:.0%}", f"context+workspace {sign * s:+.0%}", (1.0, 1 + sign * s, 1 + sign * s)))
    for s in (0.03, 0.10):
        for sign in (1, -1):
            out.append((f"per-sample {s:.0%}", f"per-sample {sign * s:+.0%}", (1 + sign * s, 1.0, 1.0)))
    for group, ps, cw in (("within 5% (both)", 0.03, 0.05), ("30% off (both)", 0.10, 0.30)):
        for a in (1, -1):
            for b in (1, -1):
                out.append((group, f"per-sample {a * ps:+.0%}, context+workspace {b * cw:+.0%}",
                            (1 + a * ps, 1 + b * cw, 1 + b * cw)))
    return out


ALGORITHMS = ("from batch 1", "predicted (catalog)", "predicted (device)")
CASE_COLUMNS = ["model", "imgsz", "card", "group", "perturbation", "true_batch", "algorithm", "predicted", "batch",
                "ratio", "over_budget", "measurements", "probes"]
SUMMARY_COLUMNS = ["group", "algorithm", "cases", "over_budget", "ratio_min", "ratio_median", "measurements_median",
                   "measurements_max"]


def true_limit(real: PerturbedCard) -> int:
    if real.fits(MAX_BATCH, FRACTION):
        return MAX_BATCH
    lo, hi = 0, MAX_BATCH
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if real.fits(mid, FRACTION) else (lo, mid)
    return lo


def run_case(prof: simulated.Profile, card: str, group: str, label: str, factors) -> list[dict]:
    sim = SimulatedBackend(card)
    real = PerturbedCard(prof, card, factors=factors)
    budget = real.budget_bytes(FRACTION)

    def measure(batch: int) -> int:
        peak = real.peak(batch)
        if peak is None:
            raise OutOfMemory(f"batch {batch}")
        return peak

    truth = true_limit(real)
    device_info = dataclasses.replace(sim.info(), outside_bytes=real.context_bytes)
    priors = {"from batch 1": None,
              "predicted (catalog)": engine.predict(prof, sim.info(), FRACTION, MAX_BATCH),
              "predicted (device)": engine.predict(prof, device_info, FRACTION, MAX_BATCH)}
    rows = []
    for algorithm, prediction in priors.items():
        prior = engine.prior_of(prediction) if prediction is not None else None
        d = decide(measure, budget, max_batch=MAX_BATCH, prior=prior)
        rows.append({"model": prof.workload.model, "imgsz": prof.workload.imgsz, "card": card, "group": group,
                     "perturbation": label, "true_batch": truth, "algorithm": algorithm,
                     "predicted": prediction.batch_size if prediction is not None else None,
                     "batch": d.batch_size, "ratio": round(d.batch_size / truth, 4) if truth else None,
                     "over_budget": bool(d.batch_size) and not real.fits(d.batch_size, FRACTION),
                     "measurements": d.measurements, "probes": " ".join(str(p.batch) for p in d.probes)})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        for algorithm in ALGORITHMS:
            mine = [r for r in rows if r["group"] == group and r["algorithm"] == algorithm]
            ratios = [r["ratio"] for r in mine if r["ratio"] is not None]
            steps = [r["measurements"] for r in mine]
            out.append({"group": group, "algorithm": algorithm, "cases": len(mine),
                        "over_budget": sum(r["over_budget"] for r in mine), "ratio_min": min(ratios),
                        "ratio_median": statistics.median(ratios), "measurements_median": statistics.median(steps),
                        "measurements_max": max(steps)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 workloads x 2 cards")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    report.setup_logging()
    workloads, cards = QUICK if args.quick else (WORKLOADS, CARDS)
    t0 = time.perf_counter()
    rows, trace_s = [], 0.0
    for w in workloads:
        t = time.perf_counter()
        prof = simulated.profile(w)
        trace_s += time.perf_counter() - t
        print(f"{w.label()}: traced in {time.perf_counter() - t:.0f} s", flush=True)
        for card in cards:
            for group, label, factors in perturbations():
                rows += run_case(prof, card, group, label, factors)
    wall = time.perf_counter() - t0
    summary = summarize(rows)
    table = report.markdown_table(summary, SUMMARY_COLUMNS)
    print(table)
    stem = "prediction_cost_quick" if args.quick else "prediction_cost"
    command = "python -m benchmarks.prediction_cost" + (" --quick" if args.quick else "")
    cases = len(rows) // len(ALGORITHMS)
    text = "\n".join([
        "# Prediction first: measured steps on a device its simulation does not know exactly", "",
        f"Run {report.now()} on {report.machine()}; orchestrator {report.revision()}.",
        f"Command: `{command}`. Wall time {wall:.0f} s (tracing {trace_s:.0f} s).", "",
        f"{cases} cases = {len(workloads)} workloads x {len(cards)} cards ({', '.join(cards)}) x "
        f"{len(perturbations())} perturbations of the card; fraction {FRACTION}, batches capped at {MAX_BATCH}. "
        f"Workloads: {', '.join(w.label() for w in workloads)}.", "",
        table, "",
        "- **measurements**: batch sizes measured on the device (each one measurement of the full step; a real "
        "card's backend adds one unmeasured warm-up at batch 1 to every variant).",
        "- **ratio**: chosen / the perturbed card's own largest fitting batch (bisection on that card). "
        "**over_budget**: the chosen batch does not fit the perturbed card's budget (every variant measures the "
        "perturbed card itself, so 0 is the safety of the search, not luck).",
        "- **predicted (catalog)** knows nothing of the perturbation; **predicted (device)** knows the device's "
        "own total and outside-the-allocator memory, as a real device reports them, but not its per-sample bytes "
        "or workspace.", "",
    ])
    paths = [report.write_markdown(args.out / f"{stem}.md", text),
             report.write_csv(args.out / f"{stem}.csv", summary, SUMMARY_COLUMNS),
             report.write_csv(args.out / f"{stem}_cases.csv", rows, CASE_COLUMNS)]
    for path in paths:
        print(f"wrote {path}")
    print(f"{cases} cases in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
