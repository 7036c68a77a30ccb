"""The simulator against published real-GPU memory readings (issue 21).

Each point in ``benchmarks/data/calibration_points.csv`` is a number a real GPU printed:
an ultralytics trainer's ``GPU_mem`` during training (``torch.cuda.memory_reserved()``,
in GB or GiB by release) or one row of an AutoBatch profile. Each is simulated as it
was run: the trainer's step with the run's model, image size, batch, precision,
optimizer and classes (objects per image: the data set's, where the log lets us
estimate it: ``objects_basis`` says how), read as that release reads it:

- ``epoch1``: the first epoch's training steps (the cache holds training's high water);
- ``epochN``: a later epoch in a release that empties the cache at every epoch end
  (8.0.196 - 8.3.99): the same as epoch 1;
- ``epochN_keep``: a later epoch in a release that keeps the cache through validation
  (8.4.x below 50 % reserved, 8.1.x, YOLOv5): training then validation, no
  ``empty_cache`` in between;
- ``probe``: the release's own AutoBatch probe, simulated step by step
  (``profile_fb3``: 8.0.x, forward + backward x3 on an input that requires grad, reserved
  after the loop; ``profile_f3``: the same where the backward raised, forward only, two
  graphs alive; ``profile_f1_proxy``: 8.4.41, one forward, then the sum of two reserved
  readings with ``empty_cache`` before each, the second after a
  ``randn(b, max_num_obj, anchors)`` proxy), with what was allocated before profiling held.

The CUDA-side costs a CPU trace cannot show are added as the simulator adds them
(``orchestrator.cudacost``); ``--raw`` leaves them out (the simulator as it was before
issue 21). The table gives simulated / real per point, then per card, per software
stack, per kind and per split: ``fit`` points are those the correction in
``cudacost`` was fitted on, ``holdout`` points were left out of every fit.

    python -m benchmarks.calibration            # every point (about 10 min on 2 cores)
    python -m benchmarks.calibration --raw      # without the CUDA-side costs
    python -m benchmarks.calibration --ids 3090-11s-b8-e1,T4-8s-p8
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from orchestrator import allocator, calibration, cudacost, simulated, step  # noqa: E402
from orchestrator.spec import Workload  # noqa: E402
from orchestrator.units import GiB, MiB  # noqa: E402

from . import report  # noqa: E402

POINTS = Path(__file__).parent / "data" / "calibration_points.csv"
GB = 10**9
UNITS = {"GB": GB, "GiB": GiB}
COLUMNS = ["id", "split", "kind", "gpu", "stack", "model", "imgsz", "batch", "objects", "reading", "unit",
           "real", "simulated", "ratio"]


def load(path: Path = POINTS) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _probe(iterations: int, backward: bool, proxy_objects: int = 0):
    """An ultralytics AutoBatch probe as ``simulated.trace`` runs a step (``step.train``'s signature).

    ``profile`` of 8.0.x-8.2.x: ``iterations`` x (``y = model(x)``; ``sum(y).backward()``) on
    ``torch.empty(b, 3, s, s)`` with ``requires_grad`` under autocast; the gradients accumulate.
    Where the backward raised (seg heads' tuple output), forward only: the last graph is
    released when ``y`` is replaced, so two graphs are alive during the later forwards.
    ``proxy_objects``: 8.4.41's ``profile_ops`` (n=1), whose reading is reserved after the
    forward plus reserved after ``empty_cache`` and a ``randn(b, max_num_obj, anchors)`` fp32
    proxy with the forward's graph alive: ``mark`` separates the two readings."""

    def run(built, workload: Workload, batch: int, device, *, surrogate=False, mark=None, **_):
        model = built.module.train()
        dtype = step.AMP_DTYPES.get(workload.precision)
        x = torch.empty(batch, 3, workload.imgsz, workload.imgsz, device=device, requires_grad=True)
        y = None
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for _ in range(iterations):
                y = model(x)
                if backward:
                    leaves = [t for t in tree_flatten(y)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
                    sum(t.sum() for t in leaves).backward()
        if proxy_objects:
            mark()  # empty_cache, then the second reading
            s = workload.imgsz
            anchors = int(sum((s / st) ** 2 for st in built.module.stride.tolist()))
            torch.randn(batch, proxy_objects, anchors, device=device, dtype=torch.float32)
        del y, x

    return run


PROBES = {
    "profile_fb3": lambda pt: _probe(3, True),
    "profile_f3": lambda pt: _probe(3, False),
    "profile_f1_proxy": lambda pt: _probe(1, False, int(pt["objects"])),
}


def workload_of(pt: dict) -> Workload:
    return Workload(model=f"ultralytics:{pt['model']}", imgsz=int(pt["imgsz"]), precision=pt["precision"],
                    optimizer=pt["optimizer"] or "SGD", classes=int(pt["classes"]),
                    objects=int(pt["objects"]) or 8)


def simulate(pt: dict, profiles: dict, raw: bool = False) -> int:
    """The bytes the point's reading would show on the simulated card."""
    w = workload_of(pt)
    kind = pt["kind"]
    key = (w, kind, pt["objects"])
    if key not in profiles:
        run_step = step.train if kind == "train" else PROBES[kind](pt)
        profiles[key] = simulated.profile(w, run_step=run_step, cuda_costs=not raw)
    prof = profiles[key]
    batch = int(pt["batch"])
    events = prof.events(batch)
    held = [8 * MiB] if raw else []  # with CUDA's costs the trace holds its cuBLAS workspaces itself
    if pt["before_gib"]:
        held.append(int(float(pt["before_gib"]) * GiB))
    if kind == "train":
        return read_training(events, pt["reading"], held, raw)
    stats = allocator.replay(events, None, held=held)
    if kind == "profile_f1_proxy":
        return stats.phase_peaks[0] + stats.phase_peaks[1]
    return stats.reserved


def read_training(events: list[int], reading: str, held: list[int], raw: bool) -> int:
    """What the trainer prints during training, from a trace of epochs (training, validation, training,
    validation; ``step.RUN_EPOCHS``) whose ``0`` marks are where the simulator empties the cache."""
    marks = [i for i, ev in enumerate(events) if ev == 0]
    if reading == "epoch1" or len(marks) < 3:  # the first epoch's steps
        reserved = allocator.replay(events, None, held=held).phase_peaks[0]
    else:
        run = events[:marks[2]]  # two epochs' steps and the validation between them
        if reading == "epochN":  # the cache kept through validation, emptied at the epoch's end
            reserved = allocator.replay(run[:marks[0]] + run[marks[0] + 1:], None, held=held).phase_peaks[1]
        else:  # epochN_keep: never emptied
            reserved = allocator.replay([ev for ev in run if ev != 0], None, held=held).peak_reserved
    return reserved if raw else cudacost.over_a_run(reserved)


def run(points: list[dict], raw: bool = False) -> list[dict]:
    profiles: dict = {}
    rows = []
    for pt in points:
        t0 = time.perf_counter()
        sim = simulate(pt, profiles, raw)
        unit = UNITS[pt["unit"]]
        real = float(pt["real"])
        row = {k: pt[k] for k in ("id", "split", "kind", "gpu", "stack", "model", "imgsz", "batch", "objects",
                                  "reading", "unit")}
        row.update(real=real, simulated=round(sim / unit, 3), ratio=round(sim / unit / real, 3))
        rows.append(row)
        print(f"{pt['id']:22s} {row['simulated']:8.3f} / {real:7.3f} {pt['unit']:3s} = {row['ratio']:.3f}"
              f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rows


def _summary(rows: list[dict], by: str) -> list[dict]:
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r[by], []).append(r["ratio"])
    out = []
    for name, ratios in groups.items():
        out.append({by: name, "points": len(ratios), "median": round(statistics.median(ratios), 3),
                    "min": min(ratios), "max": max(ratios),
                    "within 5%": f"{sum(abs(x - 1) <= 0.05 for x in ratios)}/{len(ratios)}"})
    return out


def summaries(rows: list[dict]) -> dict[str, list[dict]]:
    train = [r for r in rows if r["kind"] == "train"]
    torch2 = [r for r in train if not r["stack"].startswith("ultralytics 8.1")]  # 8.1.47 ran on torch 1.10
    probes = [r for r in rows if r["kind"] != "train"]
    tagged = ([dict(r, group=f"train {r['split']}") for r in train]
              + [dict(r, group=f"train torch>=2 {r['split']}") for r in torch2]
              + [dict(r, group=f"train torch>=2 after epoch 1 {r['split']}") for r in torch2 if steady(r)]
              + [dict(r, group=f"profile {r['split']}") for r in probes])
    return {"group": _summary(tagged, "group"), "gpu": _summary(rows, "gpu"), "stack": _summary(rows, "stack"),
            "kind": _summary(rows, "kind")}


def steady(r: dict) -> bool:
    """A training reading after the first epoch: what the whole run holds (what an answer must fit)."""
    return r["kind"] == "train" and r["reading"] != "epoch1"


def fitted(rows: list[dict]) -> dict:
    """What ``orchestrator.calibration`` holds, from these rows: the factor that centres the ``fit`` points'
    steady-state readings on 1, and the error band by kind of workload over every torch >= 2 training
    reading once corrected by that factor (for a row's ``sim_error``)."""
    fit = [r["ratio"] for r in rows if steady(r) and r["split"] == "fit"]
    factor = calibration.HISTORY_FACTOR / statistics.median(fit) if fit else calibration.HISTORY_FACTOR
    bands: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "train" and not r["id"].startswith("2080Ti"):
            ratio = r["ratio"] * factor / calibration.HISTORY_FACTOR
            bands.setdefault(calibration.kind_of(f"ultralytics:{r['model']}"), []).append(ratio - 1)
    return {"HISTORY_FACTOR": round(factor, 3),
            "EXPECTED_ERROR": {k: (round(min(v), 2), round(max(v), 2)) for k, v in bands.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", action="store_true", help="leave out the CUDA-side costs (the simulator before issue 21)")
    ap.add_argument("--ids", default="", help="comma-separated point ids (default: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    points = load()
    if args.ids:
        wanted = set(args.ids.split(","))
        points = [p for p in points if p["id"] in wanted]
    t0 = time.perf_counter()
    rows = run(points, args.raw)
    name = args.name or ("calibration_raw" if args.raw else "calibration")
    sums = summaries(rows)
    worst = sorted(rows, key=lambda r: abs(r["ratio"] - 1), reverse=True)[:5]
    what = ("without the CUDA-side costs, the second epoch or the fitted factor (the simulator before issue 21)"
            if args.raw else f"calibration {calibration.VERSION}: CUDA-side costs, second epoch, factor "
                             f"{calibration.HISTORY_FACTOR}")
    title = f"Simulated / real GPU memory, {what}: {len(rows)} points, {time.perf_counter() - t0:.0f} s"
    parts = [f"# {title}", f"{report.machine()}; orchestrator {report.revision()}; {report.now()}"]
    for k, v in sums.items():
        parts.append(f"## By {k}\n\n" + report.markdown_table(v, list(v[0])))
    parts.append("## Worst five\n\n" + report.markdown_table(worst, COLUMNS))
    if not args.raw:
        parts.append(f"## What the fit points give (orchestrator/calibration.py)\n\n{fitted(rows)}")
    parts.append("## Every point\n\n" + report.markdown_table(rows, COLUMNS))
    out = Path(args.out)
    report.write_csv(out / f"{name}.csv", rows, COLUMNS)
    report.write_markdown(out / f"{name}.md", "\n\n".join(parts))
    for k, v in sums.items():
        print(f"\nby {k}\n" + report.markdown_table(v, list(v[0])))
    if not args.raw:
        print(f"\nfitted: {fitted(rows)}")


if __name__ == "__main__":
    main()
