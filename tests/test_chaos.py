"""Chaos: a simulated sweep while random busy Ray worker processes are SIGKILLed at random times."""
import os
import random

import pytest

from benchmarks.chaos import Monkey, batches, make_job, sweep
from orchestrator import engine, fleet
from orchestrator.devices import make_backend

GRID = ({"models": ["tiny_models:tiny", "tiny_models:tiny_wide"], "imgsz": [384, 512]},)  # 248..664: below max_batch
CARDS = "T4, A10G"


def undisturbed(j, profiles) -> dict:
    """(card, model, imgsz) -> the batch size an undisturbed sweep of ``j`` answers: each card's decision
    replaying each workload's profile, as its device actor does (``DeviceActor.decide``), in this process."""
    out = {}
    for card in fleet.simulated_counts(j.fleet):
        backend = make_backend(card)
        for w in j.sweep.workloads():
            backend.add_profile(profiles(w))
            out[(card, w.model, w.imgsz)] = engine.decide_on(backend, w, j.sweep.fraction,
                                                             max_batch=j.sweep.max_batch).decision.batch_size
    return out


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
    assert {k: calm[k] for k in ok} == ok, context
    assert len(set(calm.values())) > 2  # the answers differ by card and workload (none capped at max_batch)
    assert stats.rows == 8
