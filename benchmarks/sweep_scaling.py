"""Sweep scaling: the same combinations in one process, and through the Ray fleet.

- **in-process**: no Ray. Profile each workload once, then decide on every card type
  (what a simulated sweep does, minus Ray);
- **ray**: ``orchestrator.fleet.run_sweep`` on a local Ray with a simulated fleet: one
  card type (``T4`` and ``T4 x2``: a simulated type has one actor whatever its count, so
  both cost the same), and 4 card types with one actor each. Profiling is per workload
  (CPU tasks), not per card, so 4 card types should cost barely more than 1.

Each Ray run starts and stops its own local Ray (unless one is already running):
``startup_s`` is that, plus starting the actors and building each model once in the
driver to validate the job; ``sweep_s`` is the work itself.

    python -m benchmarks.sweep_scaling            # 4 workloads (resnet50, mobilenet_v3_large, yolov8n, yolov8s)
    python -m benchmarks.sweep_scaling --quick    # 2 small workloads
    python -m benchmarks.sweep_scaling --fleet120 # 30 workloads x 4 card types = 120 rows: in-process,
                                                  # run_sweep in this process, and the CLI in a fresh one

``--fleet120`` is the cost issue's planning sweep: 5 YOLO detectors at 320/480/640 and 5
torchvision classifiers at 160/224/288 (fp16, SGD) on T4, A10G, A100-80GB and H100-80GB.
Its ``cli`` row is ``python -m orchestrator sweep`` started as a new process (imports, Ray,
actors, validation, the sweep, the fold, Ray down): what a user waits for.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from orchestrator import engine, fleet, job, simulated  # noqa: E402
from orchestrator.simdevice import SimulatedBackend  # noqa: E402

from . import report  # noqa: E402

log = logging.getLogger(__name__)

GRID = ({"models": ["torchvision:resnet50", "torchvision:mobilenet_v3_large"], "imgsz": [224]},
        {"models": ["ultralytics:yolov8n.yaml", "ultralytics:yolov8s.yaml"], "imgsz": [640]})
QUICK_GRID = ({"models": ["torchvision:resnet18"], "imgsz": [224]},
              {"models": ["ultralytics:yolov8n.yaml"], "imgsz": [320]})
FLEET120_GRID = ({"models": ["ultralytics:yolov8n.yaml", "ultralytics:yolov8s.yaml", "ultralytics:yolo11n.yaml",
                             "ultralytics:yolo11s.yaml", "ultralytics:yolov5su.yaml"], "imgsz": [320, 480, 640]},
                 {"models": ["torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v3_large",
                             "torchvision:efficientnet_b0", "torchvision:convnext_tiny"], "imgsz": [160, 224, 288]})
ONE_TYPE = "T4"
FOUR_TYPES = "T4, A10G, A100-80GB, H100-80GB"
CONFIGS = (("in-process", ONE_TYPE), ("ray", ONE_TYPE), ("ray", "T4 x2"),
           ("in-process", FOUR_TYPES), ("ray", FOUR_TYPES))
COLUMNS = ["runner", "fleet", "actors", "card_types", "combinations", "wall_s", "startup_s", "sweep_s",
           "s_per_combination", "ray_overhead_s_per_combination", "speedup", "profiles", "same_batches", "profile_s"]


def make_job(grid, fleet_text: str, out: Path) -> job.Job:
    return job.from_dict({"sweep": {"grid": [dict(g) for g in grid], "out": str(out)},
                          "fleet": {"mode": "simulate", "simulate": fleet_text}}, "benchmark")


def in_process(j: job.Job) -> tuple[float, dict, list[float]]:
    """Profile each workload once, decide on each card type: (seconds, {(card, workload): batch},
    seconds of each profile)."""
    cards = list(dict.fromkeys(key for key, _ in j.fleet.simulate))
    batches, profile_seconds = {}, []
    t0 = time.perf_counter()
    for w in j.sweep.workloads():
        t1 = time.perf_counter()
        prof = simulated.profile(w)
        profile_seconds.append(time.perf_counter() - t1)
        for card in cards:
            backend = SimulatedBackend(card)
            backend.add_profile(prof)
            result = engine.decide_on(backend, w, j.sweep.fraction, max_batch=j.sweep.max_batch)
            batches[(card, w.model, w.imgsz, w.precision)] = result.decision.batch_size
    return time.perf_counter() - t0, batches, profile_seconds


def through_ray(j: job.Job) -> tuple[float, float, dict, int]:
    """``fleet.run_sweep``: (wall seconds, seconds in Sweep.run, {(card, workload): batch}, profiles)."""
    t0 = time.perf_counter()
    stats, df = fleet.run_sweep(j, force=True)
    wall = time.perf_counter() - t0
    batches = {(r["card"], r["model"], int(r["imgsz"]), r["precision"]): int(r["batch_size"]) for _, r in df.iterrows()}
    return wall, stats.seconds, batches, stats.profiles


def through_cli(j: job.Job, tmp: Path) -> tuple[float, dict]:
    """``python -m orchestrator sweep`` in a fresh process on ``j`` written as a job file: (wall s, batches)."""
    import subprocess

    from orchestrator import table

    def toml(v):
        return "[" + ", ".join(toml(x) for x in v) + "]" if isinstance(v, (list, tuple)) else (
            f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v))

    grid = "\n".join(f"[[sweep.grid]]\nmodels = {toml(list(g.models))}\nimgsz = {toml(list(g.imgsz))}\n"
                     for g in j.sweep.grid)
    path = tmp / "fleet.toml"
    path.write_text(f'[sweep]\nfraction = {j.sweep.fraction}\nout = "{j.sweep.out}"\n{grid}\n[fleet]\n'
                    f'mode = "simulate"\nsimulate = "{", ".join(k for k, _ in j.fleet.simulate)}"\n')
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(path), "--force"], check=True,
                   capture_output=True, text=True)
    wall = time.perf_counter() - t0
    df = table.read(j.sweep.out)
    return wall, {(r["card"], r["model"], int(r["imgsz"]), r["precision"]): int(r["batch_size"])
                  for _, r in df.iterrows()}


def run(grid=GRID, configs=CONFIGS, warm_up: bool = True) -> list[dict]:
    """One row per configuration; Ray rows are compared with the in-process run of the same card types."""
    rows, baseline = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        # warm up this process (imports, first-use costs of fake tensors), untimed: Ray's actors
        # start cold, and that cost is Ray's, but the in-process rows should not depend on order
        # (--fleet120: 30 workloads amortize it, and warming up would trace all of them once more)
        if warm_up:
            in_process(make_job(grid, ONE_TYPE, Path(tmp) / "warmup.csv"))
        for i, (runner, fleet_text) in enumerate(configs):
            j = make_job(grid, fleet_text, Path(tmp) / f"table_{i}.csv")
            types = tuple(dict.fromkeys(key for key, _ in j.fleet.simulate))
            combos = len(j.sweep.workloads()) * len(types)
            if runner == "in-process":
                seconds, batches, ps = in_process(j)
                wall, profiles, ps = seconds, len(j.sweep.workloads()), sorted(ps)
                baseline[types] = (seconds, batches)
            elif runner == "cli":
                wall, batches = through_cli(j, Path(tmp))
                seconds, profiles = wall, len(j.sweep.workloads())
            else:
                wall, seconds, batches, profiles = through_ray(j)
            ref = baseline.get(types)
            rows.append({
                "runner": runner, "fleet": fleet_text,
                "actors": 0 if runner == "in-process" else len(types),  # one per simulated type
                # (cli: startup is inside its wall time; sweep_s is that wall time)
                "card_types": len(types), "combinations": combos, "wall_s": round(wall, 1),
                "startup_s": round(wall - seconds, 1), "sweep_s": round(seconds, 1),
                "s_per_combination": round(seconds / combos, 2),
                "ray_overhead_s_per_combination": None if runner == "in-process" or ref is None
                else round((seconds - ref[0]) / combos, 2),
                "speedup": None if ref is None else round(ref[0] / seconds, 2), "profiles": profiles,
                "same_batches": None if ref is None else batches == ref[1],
                "profile_s": f"{ps[0]:.1f} / {ps[len(ps) // 2]:.1f} / {ps[-1]:.1f}" if runner == "in-process" else None,
            })
            log.info("%s %s: %.1fs (%.1fs sweeping)", runner, fleet_text, wall, seconds)
    return rows


def markdown(rows: list[dict], command: str, grid, revision: str | None = None) -> str:
    workloads = "; ".join(f"{', '.join(g['models'])} at {'/'.join(map(str, g['imgsz']))}" for g in grid)
    return "\n".join([
        "# Sweep scaling: one process vs the Ray fleet",
        "",
        f"Run {report.now()} on {report.machine()}; orchestrator {revision or report.revision()}. Command: `{command}`.",
        f"Workloads (fp16, SGD, EMA, fraction 0.8): {workloads}. Simulated cards.",
        "",
        report.markdown_table(rows, COLUMNS),
        "",
        "- **sweep_s**: the work (in-process: profile + decide; Ray: `Sweep.run`); **startup_s**: starting "
        "Ray and the actors, validating the job (each model built once in the driver), shutting down.",
        "- **ray_overhead_s_per_combination**: (Ray sweep_s - in-process sweep_s for the same card types) / "
        "combinations; negative when the actors' parallelism outweighs Ray's cost.",
        "- **speedup**: in-process sweep_s / this sweep_s, for the same card types.",
        "- **same_batches**: every combination got the same batch size as in-process.",
        "- **profiles**: workloads traced (once each, whatever the number of card types); **profile_s**: "
        "min / median / max seconds of one workload's profile (in-process rows).",
    ])


def write(rows: list[dict], out_dir: Path, stem: str, command: str, grid=GRID,
          revision: str | None = None) -> list[Path]:
    return [report.write_markdown(out_dir / f"{stem}.md", markdown(rows, command, grid, revision)),
            report.write_csv(out_dir / f"{stem}.csv", rows, COLUMNS)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 small workloads instead of 4")
    p.add_argument("--fleet120", action="store_true", help="30 workloads x 4 card types: in-process, Ray, CLI")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", help="file stem (default sweep_scaling, or sweep_scaling_quick with --quick)")
    args = p.parse_args(argv)
    report.setup_logging()
    logging.getLogger("ray").setLevel(logging.WARNING)
    grid = QUICK_GRID if args.quick else FLEET120_GRID if args.fleet120 else GRID
    revision = report.revision()  # before the run: the code that is measured
    rows = run(grid, (("in-process", FOUR_TYPES), ("cli", FOUR_TYPES), ("ray", FOUR_TYPES))
               if args.fleet120 else CONFIGS, warm_up=not args.fleet120)
    command = ("python -m benchmarks.sweep_scaling " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    print(report.markdown_table(rows, COLUMNS))
    stem = "sweep_scaling_quick" if args.quick else "sweep_fleet120" if args.fleet120 else "sweep_scaling"
    for path in write(rows, args.out, args.name or stem,
                      command, grid, revision):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
