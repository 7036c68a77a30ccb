"""What a simulated fleet costs: wall time, peak memory of every process, and what reaches stdout.

Runs the CLI as a user does (a fresh ``python -m orchestrator`` process per case) and samples,
every 0.2 s, the memory of that process and all its descendants (Ray's GCS, raylet, workers and
actors): ``peak_rss_gib`` sums their RSS (shared pages, such as torch's libraries, counted once
per process: an upper bound), ``peak_pss_gib`` their PSS (shared pages split between the
processes that map them: what they cost together). ``foreign_stdout_lines`` counts stdout lines
that are not the command's own (Ray's warnings printed by its driver thread).

    python -m benchmarks.fleet_cost                         # this checkout
    python -m benchmarks.fleet_cost --root /tmp/main-copy --label main --name fleet_cost_main
    python -m benchmarks.fleet_cost --compare benchmarks/results/fleet_cost_main.csv

``--compare`` adds the rows of an earlier run (another checkout) to the table, and checks that the
default sweep's batch sizes are the same in both (the CSVs are kept under ``--keep``).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from . import report

ROOT = Path(__file__).resolve().parent.parent
BIG = "A100-80GB x64, H100-80GB x64"
SMALL = "A100-80GB, H100-80GB"
CASES = {  # name -> the CLI's arguments ({keep}: the folder the tables are kept in)
    "devices-24": ["devices", "--simulate", "T4 x16, A100-80GB x8"],
    "default": ["sweep", "--out", "{keep}/default.csv"],
    "small": ["sweep", "--simulate", SMALL, "--out", "{keep}/small.csv"],
    "big": ["sweep", "--simulate", BIG, "--out", "{keep}/big.csv"],
}
COLUMNS = ["label", "revision", "case", "command", "rc", "wall_s", "peak_rss_gib", "peak_pss_gib", "peak_processes",
           "stdout_lines", "foreign_stdout_lines", "first_foreign_line"]
KEY = ["gpu_name", "gpu_total_bytes", "model", "imgsz", "precision", "optimizer", "fraction"]


def _ours(line: str) -> bool:
    """A line the CLI itself prints (the pivot, the summary, the devices listing), not Ray's."""
    return not re.search(r"raylet|worker process|WARNING|\(pid=|\bray\b|Ray", line)


def _memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(RSS, PSS, processes) of ``proc`` and its descendants; processes that just exited are skipped."""
    rss = pss = n = 0
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    for p in family:
        try:
            full = p.memory_full_info()
        except psutil.Error:
            continue
        rss, pss, n = rss + full.rss, pss + getattr(full, "pss", full.rss), n + 1
    return rss, pss, n


def measure(args: list[str], cwd: Path) -> dict:
    """Run ``python -m orchestrator ARGS`` in ``cwd``; its wall time, peak memory and stdout."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", YOLO_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    root = psutil.Process(p.pid)
    peak = {"rss": 0, "pss": 0, "n": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss, n = _memory(root)
            peak["rss"], peak["pss"], peak["n"] = max(peak["rss"], rss), max(peak["pss"], pss), max(peak["n"], n)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = p.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    lines = [line for line in stdout.splitlines() if line.strip()]
    foreign = [line for line in lines if not _ours(line)]
    if p.returncode not in (0, 3):
        print(stderr[-2000:], file=sys.stderr)
    return {"rc": p.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(peak["rss"] / 2**30, 2),
            "peak_pss_gib": round(peak["pss"] / 2**30, 2), "peak_processes": peak["n"],
            "stdout_lines": len(lines), "foreign_stdout_lines": len(foreign),
            "first_foreign_line": foreign[0][:120] if foreign else ""}


def revision_of(root: Path) -> str:
    """The commit of ``root`` (a git checkout, or an export with its commit in a REVISION file)."""
    if (root / "REVISION").exists():
        return (root / "REVISION").read_text().strip()
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "orchestrator"], cwd=root, capture_output=True, text=True)
    return (out.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty.stdout.strip() else "")


def batches(path: Path) -> dict[tuple, int]:
    with open(path, newline="") as f:
        return {tuple(r[k] for k in KEY): int(r["batch_size"]) for r in csv.DictReader(f)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    p.add_argument("--label", default="this", help="name of this run in the table (e.g. main, fleet)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--keep", type=Path, default=Path("/tmp/fleet_cost"), help="where the tables are written")
    p.add_argument("--compare", type=Path, help="CSV of an earlier run to show beside this one")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", default="fleet_cost", help="file stem")
    args = p.parse_args(argv)
    keep = args.keep / args.label
    keep.mkdir(parents=True, exist_ok=True)
    revision = revision_of(args.root)
    rows = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        cli = [a.replace("{keep}", str(keep)) for a in CASES[case]]
        for a in cli:
            if a.endswith(".csv"):
                Path(a).unlink(missing_ok=True)
        row = {"label": args.label, "revision": revision, "case": case,
               "command": " ".join(repr(a) if " " in a else a for a in CASES[case]), **measure(cli, args.root)}
        print(row, flush=True)
        rows.append(row)
    notes = []
    if args.compare:
        with open(args.compare, newline="") as f:
            earlier = list(csv.DictReader(f))
        rows = earlier + rows
        other = args.keep / earlier[0]["label"] / "default.csv"
        mine = keep / "default.csv"
        if other.exists() and mine.exists():
            a, b = batches(other), batches(mine)
            diff = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
            notes.append(f"- Default sweep: {len(b)} rows here, {len(a)} in {earlier[0]['label']}; keys and "
                         f"batch sizes {'identical' if not diff else f'differ in {len(diff)} rows: {diff}'}.")
    command = ("python -m benchmarks.fleet_cost " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    text = "\n".join([
        "# Fleet cost: wall time, memory and stdout of simulated fleets",
        "",
        f"Run {report.now()} on {report.machine()}. Command: `{command}` (each case a fresh "
        "`python -m orchestrator` process; load from other jobs on the machine adds noise).",
        "",
        report.markdown_table(rows, COLUMNS),
        "",
        "- **peak_rss_gib**: the most, over 0.2 s samples, of the summed RSS of the CLI process and all its "
        "descendants (Ray's GCS, raylet, workers, actors); shared pages count once per process.",
        "- **peak_pss_gib**: the same with PSS (shared pages split between the processes that map them).",
        "- **foreign_stdout_lines**: stdout lines that are Ray's, not the command's output.",
        *notes,
    ])
    print(text)
    report.write_markdown(args.out / f"{args.name}.md", text)
    report.write_csv(args.out / f"{args.name}.csv", rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
