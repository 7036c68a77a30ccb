"""The answer with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` against PyTorch's default allocator,
on simulated cards (issue 25 item 2).

Each model is traced once (the traces do not depend on the allocator's settings) and replayed through
the allocator model with each setting: the largest batch within fraction 0.8 and its peak reserved
bytes, as a table row records them. The reason, in numbers: at the default allocator's answer, the
peak reserved bytes each setting needs beyond the peak of live tensors (block and segment rounding,
cached blocks a request cannot use), from the replay alone (no run-history factor).

    python -m benchmarks.expandable_segments            # yolov8s at 640 px, resnet50 at 224 px; T4, A100-80GB
    python -m benchmarks.expandable_segments --quick    # resnet18 at 224 px on T4
    python -m benchmarks.expandable_segments --confs "default;expandable_segments:True"   # those two only
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from orchestrator import allocator, simulated  # noqa: E402
from orchestrator.engine import decide_on  # noqa: E402
from orchestrator.simdevice import SimulatedBackend  # noqa: E402
from orchestrator.spec import Workload  # noqa: E402
from orchestrator.units import GiB  # noqa: E402

from . import report  # noqa: E402

MODELS = [("ultralytics:yolov8s.yaml", 640), ("torchvision:resnet50", 224)]
CARDS = ["T4", "A100-80GB"]
CONFS = ["", "expandable_segments:True", "max_split_size_mb:128", "expandable_segments:True,max_split_size_mb:128"]
"""The baseline first; max_split_size_mb alone and with expandable segments for comparison."""
COLUMNS = ["model", "imgsz", "card", "alloc_conf", "batch", "change_pct", "peak_reserved_gib", "at_batch",
           "reserved_gib", "tensors_gib", "overhead_gib", "reason"]


def _gib(nbytes: int) -> float:
    return round(nbytes / GiB, 2)


def run(models: list[tuple[str, int]], cards: list[str], confs: list[str], fraction: float = 0.8) -> list[dict]:
    """One row per (model, card, setting): the answer and its peak reserved, and at the default allocator's
    answer (``at_batch``) the replay's peak reserved, peak of live tensors and the difference (overhead)."""
    rows = []
    for model, imgsz in models:
        prof = simulated.profile(Workload(model=model, imgsz=imgsz))
        for card in cards:
            base, at = None, None
            for conf in confs:
                w = Workload(model=model, imgsz=imgsz, alloc_conf=conf)
                backend = SimulatedBackend(card)
                backend.add_profile(dataclasses.replace(prof, workload=w))  # the same traces, this setting
                m = backend.measurer(w)
                d = decide_on(backend, w, fraction).decision
                at = d.batch_size if at is None else at  # the first setting's answer (the default's)
                held = [] if prof.cuda_costs else [backend.card.workspace_bytes]
                st = allocator.replay(prof.events(at), m.capacity, held=held, conf=w.alloc_conf)
                base = base or d.batch_size
                row = {"model": model, "imgsz": imgsz, "card": card, "alloc_conf": w.alloc_conf or "default",
                       "batch": d.batch_size, "change_pct": round(100 * (d.batch_size / base - 1), 1),
                       "peak_reserved_gib": _gib(d.peak_bytes), "at_batch": at,
                       "reserved_gib": _gib(st.peak_reserved), "tensors_gib": _gib(st.peak_allocated),
                       "overhead_gib": _gib(st.peak_reserved - st.peak_allocated)}
                row["reason"] = reason(row, None if conf == confs[0] else rows[-confs.index(conf)])
                rows.append(row)
                print(report.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


def reason(row: dict, default: dict | None) -> str:
    """One line: where the setting's answer comes from, in the replay's numbers at the default's answer."""
    if default is None:
        return (f"at batch {row['at_batch']}: {row['reserved_gib']} GiB reserved for {row['tensors_gib']} GiB of "
                f"live tensors ({row['overhead_gib']} GiB in segments sized per request and blocks cached)")
    delta = round(row["overhead_gib"] - default["overhead_gib"], 2)
    return (f"at batch {row['at_batch']}: {row['overhead_gib']} GiB reserved beyond live tensors instead of "
            f"{default['overhead_gib']} ({delta:+.2f} GiB), so {row['change_pct']:+.1f}% batch")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet18 at 224 px on T4")
    p.add_argument("--confs", help="';'-separated settings, the first the baseline (default: the default "
                                   "allocator, expandable_segments:True, max_split_size_mb:128 and both)")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", help="file stem (default expandable_segments, or expandable_segments_quick)")
    args = p.parse_args(argv)
    report.setup_logging()
    revision = report.revision()
    models = [("torchvision:resnet18", 224)] if args.quick else MODELS
    cards = ["T4"] if args.quick else CARDS
    confs = [Workload(model="m:f", alloc_conf=c.strip()).alloc_conf for c in args.confs.split(";")] \
        if args.confs else CONFS
    rows = run(models, cards, confs)
    command = ("python -m benchmarks.expandable_segments " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    text = "\n".join([
        "# expandable_segments against the default allocator", "",
        f"Run {report.now()} on {report.machine()}; orchestrator {revision}. Command: `{command}`. Simulated "
        "cards, fraction 0.8, the trainer's default step (fp16, SGD, EMA, validation). `batch`: the answer; "
        "`peak_reserved_gib`: its peak reserved as the row records it (with the run-history factor); "
        "`at_batch`: the first setting's answer, where the replay alone gives `reserved_gib`, the peak of live "
        "tensors `tensors_gib` and their difference `overhead_gib`. Never run on a GPU: the allocator model's "
        "reading of PyTorch's source, not a measurement.", "", report.markdown_table(rows, COLUMNS)])
    stem = args.name or ("expandable_segments_quick" if args.quick else "expandable_segments")
    print(text)
    for path in (report.write_markdown(args.out / f"{stem}.md", text),
                 report.write_csv(args.out / f"{stem}.csv", rows, COLUMNS)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
