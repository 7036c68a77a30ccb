"""Chaos: a simulated sweep while random busy Ray worker processes are SIGKILLed at random times."""
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside the package
from benchmarks.chaos import Monkey, batches, make_job, summarize, sweep  # noqa: E402

from expected import undisturbed  # noqa: E402

GRID = ({"models": ["tiny_models:tiny", "tiny_models:tiny_wide"], "imgsz": [384, 512]},)  # 248..664: below max_batch
CARDS = "T4, A10G"


@pytest.mark.slow
def test_sweep_with_random_sigkills_accounts_for_every_combination(ray_session, tmp_path, profiles):
    """4 workloads on 2 card types (8 combinations); a random busy device actor or profile worker is SIGKILLed
    4 times, at random gaps, the first while an actor starts. Every combination asked for is one row: measured
    (ok/no-fit) or an error that says why; every ok row's batch size is the undisturbed answer."""
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    j = make_job(GRID, CARDS, tmp_path / "t.csv", actor_timeout_s=60)
    gaps = [rng.uniform(0.0, 1.0)] + [rng.uniform(0.3, 3.0) for _ in range(3)]
    stats, df, kills, seconds = sweep(j, Monkey(os.getpid(), gaps, seed, first_starting=True))
    context = f"seed {seed} (CHAOS_SEED={seed} repeats the kill times), kills {kills}, {seconds:.0f} s:\n" \
              f"{df[['card', 'model', 'imgsz', 'status', 'batch_size', 'attempts', 'error']].to_string()}"
    assert kills and kills[0][2].endswith(".__init__"), context  # the first kill hit an actor starting
    asked = {(card, w.model, w.imgsz) for card in ("T4", "A10G") for w in j.sweep.workloads()}
    got = [(r["card"], r["model"], r["imgsz"]) for _, r in df.iterrows()]
    assert len(got) == len(asked) == 8 and set(got) == asked, context  # each once, none missing
    for _, r in df.iterrows():
        assert r["status"] in ("ok", "no-fit") or (r["status"] == "error" and len(str(r["error"])) > 10), context
    calm = undisturbed(j, profiles)
    ok = batches(df)
    assert ok, context  # 4 kills cannot take every card type and every profile: some rows are measured
    assert {k: calm[k] for k in ok} == ok, context
    assert len(set(calm.values())) > 2  # the answers differ by card and workload (none capped at max_batch)
    assert stats.rows == 8


def test_benchmark_summary_counts_missing_rows_and_changed_batches(tmp_path):
    """The chaos benchmark's row: a combination without a row is missing, an error row is counted with its
    reason, and one ok batch that moved makes the run unequal to the undisturbed one."""
    j = make_job(GRID, CARDS, tmp_path / "t.csv")
    calm = {(c, w.model, w.imgsz): 100 + i for i, (c, w) in
            enumerate((c, w) for c in ("T4", "A10G") for w in j.sweep.workloads())}
    rows = [{"card": c, "model": m, "imgsz": s, "status": "ok", "batch_size": b, "attempts": 1, "error": ""}
            for (c, m, s), b in list(calm.items())[:6]]
    rows[0]["status"], rows[0]["error"], rows[0]["attempts"] = "error", "actor died; gave up after 3 attempts", 3
    stats = SimpleNamespace(not_measured_rows=0, actor_restarts=2, profile_worker_restarts=1, profile_fallbacks=0)
    out = summarize(1, 7, j, stats, pd.DataFrame(rows), [(12.0, 1, "DeviceActor.__init__")], 9.0, calm)
    assert (out["rows"], out["ok"], out["error"], out["missing"], out["kills"]) == (6, 5, 1, 2, 1)
    assert out["ok_equal_undisturbed"] and out["decision_attempts"] == "1:5 3:1"
    assert out["errors"] == "actor died; gave up after 3 attempts" and out["killed"] == "DeviceActor.__init__@12s"
    rows[1]["batch_size"] += 1
    assert not summarize(1, 7, j, stats, pd.DataFrame(rows), [], 9.0, calm)["ok_equal_undisturbed"]
