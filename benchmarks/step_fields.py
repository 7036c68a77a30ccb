"""How much each field of the trainer's step moves the answer, on simulated cards.

Start from the step as measured before these fields existed (8 boxes per image,
the model's own classes, no gradient accumulation, no validation: each field's
``legacy`` value) and set one field at a time to another value, then all of
today's defaults together. Each row is the largest batch within fraction 0.8.

    python -m benchmarks.step_fields            # yolov8n and yolo11s at 640 px on T4 and A100-80GB
    python -m benchmarks.step_fields --quick    # yolov8n at 320 px on T4
    python -m benchmarks.step_fields --fields world_size --models ultralytics:yolov8n.yaml   # DDP lines only
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from orchestrator import spec  # noqa: E402
from orchestrator.simdevice import SimulatedBackend  # noqa: E402
from orchestrator.engine import decide_on  # noqa: E402
from orchestrator.spec import Workload  # noqa: E402

from . import report  # noqa: E402

CHANGES = [  # (label, fields set on top of the legacy step)
    ("legacy step (objects 8, classes 80, nbs 1, val_scale 0)", {}),
    ("objects 100", {"objects": 100}),
    ("objects 400 (default)", {"objects": 400}),
    ("classes 3", {"classes": 3}),
    ("nbs 64 (default: accumulation)", {"nbs": 64}),
    ("val_scale 2 (default: validation)", {"val_scale": 2}),
    ("world_size 2 (DDP, per rank)", {"world_size": 2}),
    ("world_size 8 (DDP, per rank)", {"world_size": 8}),
    ("all defaults", {k: spec.DEFAULTS[k] for k in ("objects", "nbs", "val_scale", "classes")}),
]
LEGACY = {k: spec.LEGACY[k] for k in ("objects", "nbs", "val_scale", "classes")}


def run(models: list[tuple[str, int]], cards: list[str], fraction: float = 0.8,
        fields: list[str] | None = None) -> list[dict]:
    """Each line of ``CHANGES`` (only the legacy step and those setting ``fields``, when given) on each card."""
    rows = []
    changes = [(label, c) for label, c in CHANGES if fields is None or not c or set(c) <= set(fields)]
    for model, imgsz in models:
        base = None
        for label, change in changes:
            w = Workload(model=model, imgsz=imgsz, **{**LEGACY, **change})
            row = {"model": model, "imgsz": imgsz, "step": label}
            traced = None  # the workload's profile, traced on the first card and replayed on the others
            for card in cards:
                backend = SimulatedBackend(card)
                if traced is not None:
                    backend.add_profile(traced)
                row[card] = decide_on(backend, w, fraction).decision.batch_size
                traced = backend.profile(w)
            base = base or row
            row["change_pct"] = round(100 * (row[cards[0]] / base[cards[0]] - 1), 1)
            rows.append(row)
            print(report.markdown_table([row], ["model", "imgsz", "step", *cards, "change_pct"]).splitlines()[-1],
                  flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="yolov8n at 320 px on T4")
    p.add_argument("--fields", help="comma-separated: only the lines that set these fields (and the legacy step)")
    p.add_argument("--models", help="comma-separated models at 640 px (default yolov8n and yolo11s)")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", help="file stem (default step_fields, or step_fields_quick with --quick)")
    args = p.parse_args(argv)
    report.setup_logging()
    revision = report.revision()
    models = [("ultralytics:yolov8n.yaml", 320)] if args.quick else [("ultralytics:yolov8n.yaml", 640),
                                                                     ("ultralytics:yolo11s.yaml", 640)]
    if args.models:
        models = [(m.strip(), 640) for m in args.models.split(",") if m.strip()]
    cards = ["T4"] if args.quick else ["T4", "A100-80GB"]
    rows = run(models, cards, fields=args.fields.split(",") if args.fields else None)
    columns = ["model", "imgsz", "step", *cards, "change_pct"]
    command = ("python -m benchmarks.step_fields " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    text = "\n".join(["# How much each field of the trainer's step moves the answer", "",
                      f"Run {report.now()} on {report.machine()}; orchestrator {revision}. Command: `{command}`. "
                      "Largest batch within fraction 0.8 on simulated cards; change_pct on the first card, against "
                      "the legacy step.", "", report.markdown_table(rows, columns)])
    stem = args.name or ("step_fields_quick" if args.quick else "step_fields") + (
        "_" + args.fields.replace(",", "_") if args.fields else "")
    print(text)
    for path in (report.write_markdown(args.out / f"{stem}.md", text), report.write_csv(args.out / f"{stem}.csv",
                                                                                          rows, columns)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
