"""A fleet that loses workers mid-sweep (issue 22): a simulated sweep while busy Ray worker processes are
SIGKILLed, against the same sweep undisturbed.

The job is the issue's: 5 models x 2 image sizes on ``T4, A10G, L4, A100-80GB`` (40 combinations). It is
swept once undisturbed, then ``--runs`` times while a thread of this process SIGKILLs a busy Ray worker
process (a device actor or a profile worker running a call, its constructor included, chosen at random)
every ``--every`` seconds, ``--kills`` times in all (the first ``--every`` seconds after the sweep begins;
a kill whose time has come waits for a busy process, the next one is ``--every`` seconds after it, and
the sweep may end before all kills land: ``kills`` says how many did).
Each sweep runs in this process (``fleet.run_sweep``, its own local Ray), so the Ray workers are this
process's descendants and nothing else on the machine is touched.

Per run: rows, statuses, whether every ``ok`` row's batch size equals the undisturbed run's, the
``SweepStats`` counters (device actor restarts, profile worker restarts, profiles traced on a device
actor) and the decisions' attempts as the rows record them.

    python -m benchmarks.chaos                   # the issue's measurement, 5 disturbed runs
    python -m benchmarks.chaos --runs 1 --quick  # 2 small models x 2 sizes on 2 cards, kills every 3 s

``Monkey`` and ``busy_workers`` are also the suite's chaos test's (``tests/test_chaos.py``).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil  # noqa: E402

log = logging.getLogger(__name__)

GRID = ({"models": ["ultralytics:yolov8n.yaml", "ultralytics:yolov8s.yaml"], "imgsz": [320, 640]},
        {"models": ["torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v3_large"],
         "imgsz": [224, 288]})
CARDS = "T4, A10G, L4, A100-80GB"
QUICK_GRID = ({"models": ["torchvision:resnet18", "torchvision:mobilenet_v3_small"], "imgsz": [224, 288]},)
QUICK_CARDS = "T4, A10G"
COLUMNS = ["run", "seed", "kills", "killed", "rows", "ok", "no_fit", "error", "not_measured", "missing",
           "ok_equal_undisturbed", "actor_restarts", "profile_worker_restarts", "profile_fallbacks",
           "decision_attempts", "wall_s", "errors"]

_BUSY = re.compile(r"^ray::(DeviceActor|ProfileWorker)\.(\w+)")


def busy_workers(root: int, starting: bool = False) -> list[tuple[psutil.Process, str]]:
    """Descendants of process ``root`` that are Ray workers of the fleet running a call (Ray titles a
    worker ``ray::Class.method`` while it runs one, ``ray::Class.__init__`` while the actor starts):
    (process, title). ``starting``: only actors in their constructor."""
    out = []
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return out
    for p in children:
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        m = _BUSY.match(title)
        if m and (not starting or m.group(2) == "__init__"):
            out.append((p, f"{m.group(1)}.{m.group(2)}"))
    return out


class Monkey:
    """A thread that SIGKILLs a random busy fleet worker (a descendant of ``root``) ``gaps[i]`` seconds after
    kill i-1 (the first: after ``start()``); the first kill takes an actor in its constructor when
    ``first_starting``. A kill whose time has come waits for a busy worker not killed already.
    ``kills``: (seconds after ``start()``, pid, what) of each kill."""

    def __init__(self, root: int, gaps: list[float], seed: int, first_starting: bool = False):
        self.root, self.gaps, self.rng = root, list(gaps), random.Random(seed)
        self.first_starting = first_starting
        self.kills: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Monkey":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int, str]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.kills

    def _run(self) -> None:
        killed: set[int] = set()  # a killed process lingers a moment under its title: never picked twice
        last = self._t0
        for i, gap in enumerate(self.gaps):
            if self._stop.wait(max(0.0, last + gap - time.monotonic())):
                return
            while not self._stop.is_set():
                busy = [(p, what) for p, what in busy_workers(self.root, starting=self.first_starting and i == 0)
                        if p.pid not in killed]
                if busy:
                    proc, what = self.rng.choice(busy)
                    killed.add(proc.pid)
                    try:
                        proc.kill()
                    except psutil.Error:  # gone meanwhile: pick again
                        continue
                    last = time.monotonic()
                    self.kills.append((round(last - self._t0, 1), proc.pid, what))
                    log.info("killed %s (pid %d) at %.1f s", what, proc.pid, last - self._t0)
                    break
                self._stop.wait(0.02)


def make_job(grid, cards: str, out: Path, **fleet_kw):
    from orchestrator import job

    return job.from_dict({"sweep": {"grid": [dict(g) for g in grid], "out": str(out)},
                          "fleet": {"mode": "simulate", "simulate": cards, **fleet_kw}}, "chaos")


def batches(df) -> dict[tuple, int]:
    """(card, model, imgsz) -> batch size of the ``ok`` rows."""
    return {(r["card"], r["model"], int(r["imgsz"])): int(r["batch_size"]) for _, r in df.iterrows()
            if r["status"] == "ok"}


def sweep(j, monkey: Monkey | None = None):
    """``fleet.run_sweep(j)`` with ``monkey`` loose for its length: (stats, table, kills, seconds)."""
    from orchestrator import fleet

    t0 = time.perf_counter()
    if monkey is not None:
        monkey.start()
    try:
        stats, df = fleet.run_sweep(j)
    finally:
        kills = monkey.stop() if monkey is not None else []
    return stats, df, kills, time.perf_counter() - t0


def summarize(run, seed, j, stats, df, kills, seconds, calm: dict) -> dict:
    """One row of the results: what the disturbed table holds against the undisturbed one."""
    asked = {(card, w.model, w.imgsz) for card in _cards(j) for w in j.sweep.workloads()}
    got = {(r["card"], r["model"], int(r["imgsz"])) for _, r in df.iterrows()}
    status = collections.Counter(df["status"])
    ok = batches(df)
    errors = sorted({str(e) for e in df.loc[df["status"] == "error", "error"]})
    attempts = collections.Counter(int(a) for a in df["attempts"])
    return {"run": run, "seed": seed, "kills": len(kills),
            "killed": ", ".join(f"{what}@{t:g}s" for t, _, what in kills),
            "rows": len(df), "ok": status["ok"], "no_fit": status["no-fit"], "error": status["error"],
            "not_measured": stats.not_measured_rows, "missing": len(asked - got),
            "ok_equal_undisturbed": all(calm.get(k) == b for k, b in ok.items()),
            "actor_restarts": stats.actor_restarts, "profile_worker_restarts": stats.profile_worker_restarts,
            "profile_fallbacks": stats.profile_fallbacks,
            "decision_attempts": " ".join(f"{a}:{n}" for a, n in sorted(attempts.items())),
            "wall_s": round(seconds, 1), "errors": " | ".join(e[:160] for e in errors)}


def _cards(j) -> list[str]:
    from orchestrator import cluster

    return list(cluster.simulated_counts(j.fleet))


def main(argv=None) -> int:
    from . import report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="disturbed runs (default 5)")
    p.add_argument("--kills", type=int, default=6, help="SIGKILLs per run (default 6)")
    p.add_argument("--every", type=float, default=12.0, help="seconds between kills (default 12)")
    p.add_argument("--seed", type=int, default=22, help="run k's monkey uses seed + k")
    p.add_argument("--quick", action="store_true", help="2 small models x 2 sizes on 2 cards, kills every 3 s")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="file stem (default chaos, chaos_quick with --quick)")
    args = p.parse_args(argv)
    report.setup_logging()
    logging.getLogger(__name__).setLevel(logging.INFO)
    grid, cards = (QUICK_GRID, QUICK_CARDS) if args.quick else (GRID, CARDS)
    every = 3.0 if args.quick and args.every == 12.0 else args.every
    name = args.name or ("chaos_quick" if args.quick else "chaos")
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    j = make_job(grid, cards, tmp / "undisturbed.csv")
    stats, df, _, seconds = sweep(j)
    calm = batches(df)
    rows = [summarize("undisturbed", "", j, stats, df, [], seconds, calm)]
    print(rows[-1], flush=True)
    for k in range(1, args.runs + 1):
        jk = make_job(grid, cards, tmp / f"run{k}.csv")
        monkey = Monkey(os.getpid(), [every] * args.kills, args.seed + k)
        stats, df, kills, seconds = sweep(jk, monkey)
        rows.append(summarize(k, args.seed + k, jk, stats, df, kills, seconds, calm))
        print(rows[-1], flush=True)
    disturbed = rows[1:]
    held = sum(r["rows"] == rows[0]["rows"] and r["ok"] == rows[0]["ok"] and r["ok_equal_undisturbed"]
               for r in disturbed)
    command = ("python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    n = len(j.sweep.workloads()) * len(_cards(j))
    text = "\n".join([
        "# Chaos: a simulated sweep while busy Ray workers are SIGKILLed",
        "",
        f"Run {report.now()} on {report.machine()}, revision {report.revision()}. Command: `{command}`.",
        f"Job: {n} combinations ({len(j.sweep.workloads())} workloads on `{cards}`); each disturbed run "
        f"SIGKILLs a random busy device actor or profile worker {every:g} s after the previous kill (the first "
        f"{every:g} s after the sweep began), {args.kills} times at most; a kill whose time has come waits for a "
        "busy worker, and the sweep may end first: `kills` is how many landed.",
        "",
        report.markdown_table(rows, COLUMNS),
        "",
        f"- **{held} of {len(disturbed)}** disturbed runs wrote every row of the undisturbed run with the same "
        "statuses, and every `ok` batch size equal to the undisturbed run's.",
        "- **killed**: what each kill hit (`Class.method` the process was running, `__init__`: the actor was "
        "starting) and when (seconds after the sweep began, Ray's start included).",
        "- **actor_restarts**: device actors replaced (deaths while starting included); "
        "**profile_worker_restarts**: profile workers replaced; **profile_fallbacks**: profiles traced on a "
        "device actor after their workers died `max_attempts` times; **decision_attempts**: "
        "`attempts:rows` as the rows record them.",
    ])
    print(text)
    report.write_markdown(args.out / f"{name}.md", text)
    report.write_csv(args.out / f"{name}.csv", rows, COLUMNS)
    return 0 if held == len(disturbed) else 1


if __name__ == "__main__":
    sys.exit(main())
