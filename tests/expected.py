"""What an undisturbed sweep answers, computed in this process: what the fleet tests compare a disturbed
sweep's rows with."""
from orchestrator import cluster, engine
from orchestrator.devices import make_backend


def undisturbed(j, profiles) -> dict:
    """(card, model, imgsz) -> the batch size an undisturbed sweep of ``j`` answers: each card's decision
    replaying each workload's profile, as its device actor does (``DeviceActor.decide``), in this process."""
    out = {}
    for card in cluster.simulated_counts(j.fleet):
        backend = make_backend(card)
        for w in j.sweep.workloads():
            backend.add_profile(profiles(w))
            r = engine.decide_on(backend, w, j.sweep.fraction, max_batch=j.sweep.max_batch)
            out[(card, w.model, w.imgsz)] = r.decision.batch_size
    return out
