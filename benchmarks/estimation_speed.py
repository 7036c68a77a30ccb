"""Estimation speed: seconds per simulated measurement against batch size (a replay should be flat).

Two ways the simulated device measures a batch:

- **direct trace**: the training step on fake tensors at that batch (``simulated.trace``),
  then the allocator replay; what every batch would cost without synthesis;
- **replay**: what a decision pays per probe once the workload is profiled: the trace
  synthesized from the affine event model, replayed through the allocator model
  (``SimulatedBackend.measurer``).

    python -m benchmarks.estimation_speed            # resnet50 @ 224 and yolov8s @ 640, batch 1..64

A direct trace of a YOLO step runs YOLO's own loss (target assigner included) for real, whose
cost grows with the batch (at batch 256 with 400 objects per image: over 10 minutes here), which
is why profiles trace batches 1-4 and synthesize the rest.
    python -m benchmarks.estimation_speed --quick    # batch 1 and 64, one repeat
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from orchestrator import allocator, models, simulated  # noqa: E402
from orchestrator.decision import OutOfMemory  # noqa: E402
from orchestrator.simdevice import SimulatedBackend  # noqa: E402
from orchestrator.spec import Workload  # noqa: E402

from . import report  # noqa: E402

log = logging.getLogger(__name__)
from orchestrator.units import GiB  # noqa: E402

WORKLOADS = (("torchvision:resnet50", 224), ("ultralytics:yolov8s.yaml", 640))
BATCHES = (1, 4, 16, 64)  # a direct trace runs YOLO's real loss, whose cost grows with the batch
CARD = "H200"  # the largest catalog card: every batch above fits, so every replay runs to the end
COLUMNS = ["model", "imgsz", "precision", "batch", "events", "trace_s", "replay_ms", "peak_gib", "profile_s"]


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(workloads=WORKLOADS, batches=BATCHES, *, precision: str = "fp16", card: str = CARD,
        trace_repeats: int = 2, replay_repeats: int = 5) -> list[dict]:
    """One row per (workload, batch): direct-trace seconds and replay milliseconds (medians)."""
    rows = []
    for model, imgsz in workloads:
        w = Workload(model=model, imgsz=imgsz, precision=precision)
        built = models.build(w)
        t0 = time.perf_counter()
        prof = simulated.profile(w, built)
        profile_s = time.perf_counter() - t0
        backend = SimulatedBackend(card)
        backend.add_profile(prof)
        measure = backend.measurer(w)
        for batch in batches:
            trace_s = _median_seconds(lambda: allocator.replay(simulated.trace(built, w, batch)), trace_repeats)
            replay_s = _median_seconds(lambda: _measure(measure, batch), replay_repeats)
            peak = _measure(measure, batch)
            rows.append({
                "model": model, "imgsz": imgsz, "precision": precision, "batch": batch,
                "events": len(prof.events(batch)), "trace_s": round(trace_s, 2), "replay_ms": round(replay_s * 1000, 1),
                "peak_gib": "OOM" if peak is None else round(peak / GiB, 2), "profile_s": round(profile_s, 1),
            })
            log.info("%s batch %d: trace %.2fs, replay %.1fms", w.label(), batch, trace_s, replay_s * 1000)
    return rows


def _measure(measure, batch: int) -> int | None:
    try:
        return measure(batch).reserved_bytes
    except OutOfMemory:
        return None


def flatness(rows: list[dict]) -> list[dict]:
    """Per workload: slowest / fastest batch, for the direct trace and for the replay."""
    out = []
    for model, imgsz in dict.fromkeys((r["model"], r["imgsz"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["imgsz"]) == (model, imgsz)]
        traces = [r["trace_s"] for r in mine]
        replays = [r["replay_ms"] for r in mine]
        out.append({
            "model": model, "imgsz": imgsz, "batches": f"{mine[0]['batch']}..{mine[-1]['batch']}",
            "trace_s_median": statistics.median(traces), "trace_max_over_min": round(max(traces) / min(traces), 2),
            "replay_ms_median": statistics.median(replays),
            "replay_max_over_min": round(max(replays) / min(replays), 2), "profile_s": mine[0]["profile_s"],
        })
    return out


FLAT_COLUMNS = ["model", "imgsz", "batches", "trace_s_median", "trace_max_over_min", "replay_ms_median",
                "replay_max_over_min", "profile_s"]


def markdown(rows: list[dict], command: str, card: str, revision: str | None = None) -> str:
    return "\n".join([
        "# Estimation speed: one simulated measurement against batch size",
        "",
        f"Run {report.now()} on {report.machine()}; orchestrator {revision or report.revision()}. Command: `{command}`. Card {card}; medians of repeats.",
        "",
        "- **trace_s**: a direct fake-tensor trace of the full training step (2 steps) at that batch, "
        "plus its replay: what each probe would cost without synthesis.",
        "- **replay_ms**: what a decision pays per probe once the workload is profiled: the synthesized "
        "trace replayed through the allocator model.",
        "- **profile_s**: the one-off profile (`simulated.profile`: each shape of step traced at batches 1-3, or 1-4 "
        "where batch 1 is not affine with 2 and 3, and checked affine), shared by every card.",
        "",
        "## Flatness",
        "",
        report.markdown_table(flatness(rows), FLAT_COLUMNS),
        "",
        "## Every batch",
        "",
        report.markdown_table(rows, COLUMNS),
    ])


def write(rows: list[dict], out_dir: Path, stem: str, command: str, card: str = CARD,
          revision: str | None = None) -> list[Path]:
    return [report.write_markdown(out_dir / f"{stem}.md", markdown(rows, command, card, revision)),
            report.write_csv(out_dir / f"{stem}.csv", rows, COLUMNS)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 and 64, one repeat each")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,4,16,64)")
    p.add_argument("--card", default=CARD, help=f"catalog card for the replays (default {CARD}: everything fits)")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", help="file stem (default estimation_speed, or estimation_speed_quick with --quick)")
    args = p.parse_args(argv)
    report.setup_logging()
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else ((1, 64) if args.quick else BATCHES)
    repeats = dict(trace_repeats=1, replay_repeats=1) if args.quick else {}
    revision = report.revision()  # before the run: the code that is measured
    rows = run(batches=batches, card=args.card, **repeats)
    command = ("python -m benchmarks.estimation_speed " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    print(report.markdown_table(flatness(rows), FLAT_COLUMNS))
    print()
    print(report.markdown_table(rows, COLUMNS))
    for path in write(rows, args.out, args.name or ("estimation_speed_quick" if args.quick else "estimation_speed"),
                      command, args.card, revision):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
