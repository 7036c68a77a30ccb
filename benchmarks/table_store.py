"""Table store: what writing one finished row costs as the table grows (issue 15, item 4).

Writes ``--rows`` rows (default 20,000) one at a time into one table, rows shaped as a sweep writes
them (``table.decision_row`` of one simulated decision, torchvision mobilenet_v3_small at 64 px on a
T4, and every fifth an ``table.error_row``, copied under distinct keys), and reports milliseconds per
write at 100, 1,000, 5,000 and 20,000 rows in the table, and the total:

- **journal** (this checkout): ``table.write_rows`` for every row (one fsynced append to the journal,
  a fold into the CSV when one is due), then the final ``table.fold`` a sweep ends with. Every write
  is timed; at each size, the median, mean and worst of the 100 writes up to it (folds included);
- **rewrite** (the path before: read the CSV, merge, rewrite it, for every row): the package as it
  was at ``--before`` (``git archive``, run in a subprocess). Writing 20,000 rows that way takes
  hours, so at each size a table is filled to it in one write and a few single-row writes are timed;
  the total is the integral of the per-write cost between the sizes (linear in between).

    python -m benchmarks.table_store                 # 20,000 rows
    python -m benchmarks.table_store --rows 2000     # quicker: sizes up to 2,000
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from orchestrator import journal, table
from orchestrator.simdevice import SimulatedBackend
from orchestrator.engine import decide_on
from orchestrator.spec import Workload

from . import report

log = logging.getLogger(__name__)

SIZES = (100, 1000, 5000, 20000)
BEFORE = "6de64d0"
"""The last commit whose ``table.write_rows`` rewrote the CSV for every write."""
WINDOW = 100
COLUMNS = ["rows_in_table", "rewrite_ms", "journal_ms_median", "journal_ms_mean", "journal_ms_max",
           "journal_folds", "rewrite_s_so_far", "journal_s_so_far"]


def make_rows(n: int) -> list[dict]:
    """``n`` rows under distinct keys, copied from one real decision (and one error row)."""
    w = Workload(model="torchvision:mobilenet_v3_small", imgsz=64)
    backend = SimulatedBackend("T4")
    ok = table.decision_row(decide_on(backend, w, 0.8))
    error = table.error_row(w, backend.info(), 0.8, "RuntimeError: an example of an error row")
    return [dict(error if i % 5 == 4 else ok, model=f"bench:m{i // 100:04d}", imgsz=32 * (i % 100 + 1),
                 batch_size=0 if i % 5 == 4 else ok["batch_size"] - i % 7) for i in range(n)]


def fsync_floor(folder: Path, line_bytes: int, n: int = 1000) -> float:
    """Median seconds of a bare append + fsync of one line on this disk: what no journal write can beat."""
    path = folder / "fsync_probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, b"x" * (line_bytes - 1) + b"\n")
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times)


def journal_run(rows: list[dict], folder: Path) -> dict:
    """Every row written for real, one write each: per-write seconds, folds, the final fold, a read."""
    path = folder / "journal.csv"
    seconds, folds = [], []
    for row in rows:
        t0 = time.perf_counter()
        table.write_rows(path, [row])
        seconds.append(time.perf_counter() - t0)
        folds.append(not table.journal_path(path).exists())  # this write folded the journal into the CSV
    t0 = time.perf_counter()
    read_rows = len(table.read(path))
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table.fold(path)
    fold_s = time.perf_counter() - t0
    csv_rows = sum(1 for _ in open(path)) - 1
    if not read_rows == csv_rows == len(rows):
        raise RuntimeError(f"read {read_rows} rows, the CSV holds {csv_rows}, {len(rows)} were written")
    return {"seconds": seconds, "folds": folds, "read_s": read_s, "fold_s": fold_s}


REWRITE = textwrap.dedent("""
    import json, statistics, sys, tempfile, time
    from pathlib import Path
    from orchestrator import table
    rows, sizes, repeats = json.load(open(sys.argv[1])), json.loads(sys.argv[2]), int(sys.argv[3])
    out = {}
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rewrite.csv"
            table.write_rows(path, rows[:size - 1])
            times = []
            for row in rows[size - 1:size - 1 + repeats]:
                t0 = time.perf_counter()
                table.write_rows(path, [row])
                times.append(time.perf_counter() - t0)
            out[size] = statistics.median(times)
    print(json.dumps(out))
""")


def rewrite_run(rows: list[dict], sizes: list[int], before: str, repeats: int) -> dict[int, float]:
    """Median seconds of one single-row write at each size, with the package as it was at ``before``."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", before, "orchestrator"], cwd=root, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows, default=lambda v: v.item()))
        env = dict(os.environ, PYTHONPATH=tmp)
        p = subprocess.run([sys.executable, "-c", REWRITE, str(rows_file), json.dumps(sizes), str(repeats)],
                           capture_output=True, text=True, env=env, cwd=tmp, check=True)
    return {int(k): v for k, v in json.loads(p.stdout).items()}


def integral(per_write: dict[int, float], n: int) -> float:
    """Seconds for writes 1..n (n one of the sizes): the cost at the first size for the writes below it,
    linear in between."""
    sizes = sorted(s for s in per_write if s <= n)
    total = sizes[0] * per_write[sizes[0]]
    for a, b in zip(sizes, sizes[1:]):
        total += (b - a) * (per_write[a] + per_write[b]) / 2
    return total


def run(n: int, before: str = BEFORE, repeats: int = 5) -> tuple[list[dict], dict]:
    load_before = os.getloadavg()[0]
    rows = make_rows(n)
    sizes = [s for s in SIZES if s < n] + [n]
    log.info("journal: %d single-row writes", n)
    with tempfile.TemporaryDirectory() as tmp:
        floor_before = fsync_floor(Path(tmp), len(journal.encode(rows[0], table.COLUMNS)))
        after = journal_run(rows, Path(tmp))
        floor_after = fsync_floor(Path(tmp), len(journal.encode(rows[0], table.COLUMNS)))
    log.info("rewrite (%s): %d writes at each of %s rows", before, repeats, sizes)
    rewrite = rewrite_run(rows, sizes, before, repeats)
    out = []
    for size in sizes:
        window = after["seconds"][max(0, size - WINDOW):size]
        out.append({"rows_in_table": size, "rewrite_ms": round(rewrite[size] * 1000, 1),
                    "journal_ms_median": round(statistics.median(window) * 1000, 2),
                    "journal_ms_mean": round(statistics.mean(window) * 1000, 2),
                    "journal_ms_max": round(max(window) * 1000, 1),
                    "journal_folds": sum(after["folds"][max(0, size - WINDOW):size]),
                    "rewrite_s_so_far": round(integral(rewrite, size), 1),
                    "journal_s_so_far": round(sum(after["seconds"][:size]) + (after["fold_s"] if size == n else 0), 1)})
    totals = {"rows": n, "rewrite_total_s": out[-1]["rewrite_s_so_far"], "journal_total_s": out[-1]["journal_s_so_far"],
              "journal_folds": sum(after["folds"]), "final_fold_s": round(after["fold_s"], 2),
              "read_unfolded_s": round(after["read_s"], 2),
              "fold_s": round(sum(t for t, f in zip(after["seconds"], after["folds"]) if f) + after["fold_s"], 1),
              "fsync_ms": f"{floor_before * 1000:.2f} before, {floor_after * 1000:.2f} after",
              "fold_bytes": table.FOLD_BYTES,
              "fold_seconds": table.FOLD_SECONDS, "before": before, "repeats": repeats,
              "load_avg": f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
              "shared": max(load_before, os.getloadavg()[0]) > (os.cpu_count() or 1) / 2}
    return out, totals


def markdown(rows: list[dict], totals: dict, command: str, revision: str) -> str:
    n = totals["rows"]
    return "\n".join([
        "# Table store: the cost of writing one row as the table grows",
        "",
        f"Run {report.now()} on {report.machine()}; orchestrator {revision}. Command: `{command}`.",
        f"{n:,} rows written one at a time into one table (rows of one simulated decision and an error row, "
        f"copied under distinct keys). Load average (1 min) {totals['load_avg']}"
        + (": the machine was shared." if totals.get("shared") else "."),
        "",
        report.markdown_table(rows, COLUMNS),
        "",
        f"Total for {n:,} single-row writes: **rewrite {totals['rewrite_total_s']:,} s** (estimated: the integral of "
        f"the per-write cost above, each the median of {totals['repeats']} writes on a table of that size, code of "
        f"{totals['before']}); **journal {totals['journal_total_s']:,} s** (measured: every write, "
        f"{totals['journal_folds']} folds on the way, and the final fold of {totals['final_fold_s']} s: "
        f"{totals['fold_s']} s in the writes that folded). A bare append + fsync of one such line on the same disk "
        f"(median of 1,000): {totals['fsync_ms']} the run, in ms. "
        f"`table.read` with the last rows still in the journal: {totals['read_unfolded_s']} s.",
        "",
        "- **rewrite_ms**: one `write_rows` of one row on the code before the journal: read the CSV, merge, "
        "write a temp file, fsync, rename.",
        f"- **journal_ms_***: the {WINDOW} writes up to that size with this code: one fsynced append under the lock, "
        f"and a fold (the rewrite above, once for all the journal's rows) when the journal passes "
        f"{totals['fold_bytes']:,} bytes or a quarter of the CSV's size, or the CSV is {totals['fold_seconds']:g} s "
        "old; **journal_folds**: how "
        "many of those writes folded. The median is the append; the mean carries the folds.",
        "- **rewrite_s_so_far**, **journal_s_so_far**: seconds for all the writes up to that size (rewrite: "
        "estimated as above; journal: measured, the last row with the final fold).",
        "- An append's cost is mostly the fsync: it depends on the disk (a shared VM disk here), not on the table.",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="rows to write (default 20,000)")
    p.add_argument("--before", default=BEFORE, help=f"the commit whose rewrite path is measured (default {BEFORE})")
    p.add_argument("--repeats", type=int, default=5, help="single-row writes timed per size on the rewrite path")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--name", default="table_store", help="file stem (default table_store)")
    args = p.parse_args(argv)
    report.setup_logging()
    logging.getLogger(__name__).setLevel(logging.INFO)
    revision = report.revision()
    rows, totals = run(args.rows, args.before, args.repeats)
    command = ("python -m benchmarks.table_store " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    print(report.markdown_table(rows, COLUMNS))
    print(json.dumps(totals))
    paths = [report.write_markdown(args.out / f"{args.name}.md", markdown(rows, totals, command, revision)),
             report.write_csv(args.out / f"{args.name}.csv", rows, COLUMNS)]
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
