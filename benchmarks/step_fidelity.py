"""The simulated step against a real CPU run of the trainer's step, configuration by configuration.

For each (model, image size, batch, objects, classes, precision) the trainer's step
(``step.train``: uint8 input, YOLO's real loss and target assigner, gradient
accumulation to nbs=64, AMP with the real GradScaler, EMA, then the validation pass
at 2x batch) runs twice on the CPU: on fake tensors as the simulated backend runs it
(YOLO's loss spliced in from real stand-ins) and on real tensors. The table gives
the tensor peak of the training steps and of the validation pass, each with the
simulated error in percent. Real runs are the slow part (seconds to a minute each).

    python -m benchmarks.step_fidelity            # the issue's grid (yolov8n, yolo11n x 320/640 x ...), long
    python -m benchmarks.step_fidelity --quick    # yolov8n at 320 px and one model per other task, minutes
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from orchestrator import models, simulated  # noqa: E402
from orchestrator.spec import Workload  # noqa: E402
from orchestrator.units import MiB  # noqa: E402

from . import report  # noqa: E402

COLUMNS = ["model", "imgsz", "batch", "objects", "classes", "precision", "sim_train_mib", "real_train_mib",
           "train_err_pct", "sim_val_mib", "real_val_mib", "val_err_pct", "real_s"]
DETECT = ("ultralytics:yolov8n.yaml", "ultralytics:yolo11n.yaml")
TASKS = ("ultralytics:yolo11n-seg.yaml", "ultralytics:yolov8n-pose.yaml", "ultralytics:yolov8n-obb.yaml",
         "ultralytics:yolo11n-cls.yaml")


def grid(quick: bool) -> list[tuple]:
    """(model, imgsz, batch, objects, classes, precision) to compare."""
    if quick:
        detect = list(itertools.product(DETECT[:1], (320,), (2,), (8, 400), (3, 80), ("fp32", "fp16")))
        tasks = [(m, 224 if m.endswith("-cls.yaml") else 320, 2, 100, 3, "fp16") for m in TASKS]
        return detect + tasks
    detect = list(itertools.product(DETECT, (320, 640), (2, 8), (8, 100, 400), (3, 80), ("fp32", "fp16")))
    tasks = [(m, 224 if m.endswith("-cls.yaml") else 640, b, 100, 3, p) for m in TASKS for b in (2, 8)
             for p in ("fp32", "fp16")]
    return detect + tasks


def compare(model: str, imgsz: int, batch: int, objects: int, classes: int, precision: str) -> dict:
    w = Workload(model=model, imgsz=imgsz, objects=objects, classes=classes, precision=precision)
    built = models.build(w)
    sim = simulated.phase_tensor_peaks(simulated.trace(built, w, batch))
    t0 = time.perf_counter()
    real = simulated.phase_tensor_peaks(simulated.trace(built, w, batch, fake=False))
    row = {"model": model, "imgsz": imgsz, "batch": batch, "objects": objects, "classes": classes,
           "precision": precision, "real_s": round(time.perf_counter() - t0, 1)}
    for name, i in (("train", 0), ("val", 1)):
        if i < len(real):
            row.update({f"sim_{name}_mib": round(sim[i] / MiB, 1), f"real_{name}_mib": round(real[i] / MiB, 1),
                        f"{name}_err_pct": round(100 * (sim[i] / real[i] - 1), 2)})
    return row


def markdown(rows: list[dict], command: str, revision: str) -> str:
    worst = max((abs(r[c]) for r in rows for c in ("train_err_pct", "val_err_pct") if c in r), default=0.0)
    return "\n".join([
        "# Step fidelity: simulated vs real CPU run of the trainer's step", "",
        f"Run {report.now()} on {report.machine()}; orchestrator {revision}. Command: `{command}`.",
        f"{len(rows)} configurations; largest simulated error {worst:.2f}% (tensor peaks, training and validation).",
        "", report.markdown_table(rows, COLUMNS)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="yolov8n at 320 px and one model per other task")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", help="file stem (default step_fidelity, or step_fidelity_quick with --quick)")
    args = p.parse_args(argv)
    report.setup_logging()
    revision = report.revision()
    rows = []
    stem = args.name or ("step_fidelity_quick" if args.quick else "step_fidelity")
    command = ("python -m benchmarks.step_fidelity " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    for config in grid(args.quick):
        rows.append(compare(*config))
        print(report.markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        report.write_markdown(args.out / f"{stem}.md", markdown(rows, command, revision))  # a killed run keeps rows
        report.write_csv(args.out / f"{stem}.csv", rows, COLUMNS)
    print(markdown(rows, command, revision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
