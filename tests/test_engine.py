"""The engine on simulated cards: decision quality against ground truth, and the API's contract."""
import statistics

import pytest

import orchestrator
from orchestrator.decision import OutOfMemory
from orchestrator.simdevice import SimulatedBackend
from orchestrator.engine import decide_on
from orchestrator.spec import SpecError, Workload

GRID_MODELS = [("torchvision:resnet18", (224, 320)), ("torchvision:mobilenet_v3_small", (224, 320)),
               ("ultralytics:yolov8n.yaml", (320, 640))]
CARDS = ("T4", "A10G", "A100-80GB")


def true_limit(measure, budget, cap=4096):
    """Ground truth, found without looking at the decision: bisection over [1, cap] with the same
    measurement; the batch returned fits and the one above it does not (or it is the cap)."""
    def fits(b):
        try:
            return measure(b).reserved_bytes <= budget
        except OutOfMemory:
            return False

    if fits(cap):
        return cap
    lo, hi = 0, cap  # fits(lo) or lo == 0; not fits(hi)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def test_decision_quality_on_simulated_cards(profiles):
    """3 models x 2 sizes x 3 cards: the chosen batch fits, is never above the true limit and is
    within the README's 2% of it; median cost <= 8 measurements.

    The true limit is found independently of the decision (``true_limit``), so the decision can be
    wrong in either direction here. Where allocator segments make the peak non-monotonic near the
    limit (mobilenet_v3_small at 320 px on the A10G: 847 fits, 848 does not, 849 and 850 fit), a
    bisection can land on either side of a failing batch: a decision above the bisection's limit
    must then fit (checked) and be within 2 % of it.
    """
    steps, ratios = [], []
    for model, sizes in GRID_MODELS:
        for imgsz in sizes:
            w = Workload(model=model, imgsz=imgsz)
            prof = profiles(w)
            for card in CARDS:
                backend = SimulatedBackend(card)
                backend.add_profile(prof)
                r = decide_on(backend, w, 0.8, max_batch=4096)
                d = r.decision
                truth = true_limit(backend.measurer(w), d.budget_bytes)
                assert d.status == "ok"
                assert d.peak_bytes <= d.budget_bytes
                assert backend.measurer(w)(d.batch_size).reserved_bytes <= d.budget_bytes
                assert 0.98 * truth <= d.batch_size <= 1.02 * truth, (w.label(), card, d.batch_size, truth)
                steps.append(d.measurements)
                ratios.append(d.batch_size / truth)
    print(f"\nmeasurements per decision: median {statistics.median(steps)}, max {max(steps)}; "
          f"chosen/true min {min(ratios):.3f}")
    assert statistics.median(steps) <= 8


def test_api_returns_verified_decision():
    """orchestrator.autobatch on a simulated card: ok, the chosen batch was measured, the fit is stored."""
    r = orchestrator.autobatch("torchvision:mobilenet_v3_small", 224, 0.5, gpu="T4", optimizer="AdamW")
    d = r.decision
    assert d.status == "ok" and d.batch_size > 8
    assert d.batch_size in [p.batch for p in d.probes]
    assert d.bytes_per_sample > 0 and d.r2 > 0.99
    assert r.device.backend == "simulated" and r.device.name == "Tesla T4"
    assert d.budget_bytes == int(0.5 * r.device.total_bytes) - r.device.outside_bytes


def test_model_larger_than_card_is_no_fit():
    """A step that does not fit at batch 1 is a no-fit result, not an error and not a default."""
    r = orchestrator.autobatch("torchvision:resnet50", 3072, 0.8, gpu="T4", precision="fp32", optimizer="AdamW")
    assert (r.decision.status, r.decision.batch_size) == ("no-fit", 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="torchvision:nope", imgsz=224, gpu="T4"), "not a torchvision classifier"),
    (dict(model="resnet50", imgsz=224, gpu="T4"), "must be SOURCE:NAME"),
    (dict(model="torchvision:resnet18", imgsz=0, gpu="T4"), "imgsz=0 must be a positive integer"),
    (dict(model="ultralytics:yolov8n.yaml", imgsz=100, gpu="T4"), "multiple of .* stride 32: use 96 or 128"),
    (dict(model="torchvision:resnet18", imgsz=224, fraction=1.5, gpu="T4"), r"fraction=1.5 must be in \(0, 1\]"),
    (dict(model="torchvision:resnet18", imgsz=224, gpu="P100"), "unknown GPU 'P100': known cards are"),
    (dict(model="ultralytics:yolov99z.yaml", imgsz=640, gpu="T4"), "not a yaml that ultralytics ships"),
    (dict(model="tiny_models:not_a_module", imgsz=64, gpu="T4"), "not a torch.nn.Module"),
])
def test_bad_input_is_one_clear_error(kwargs, match):
    with pytest.raises(SpecError, match=match):
        orchestrator.autobatch(**kwargs)


def test_prediction_first_on_a_card_unlike_its_simulation(profiles):
    """A device that is not what the catalog says (CUDA context -15%..+15%, cuBLAS workspace x1.3) is
    decided from the simulator's prediction for it: the answer fits, is within 2% of that device's own
    limit (found independently), the row records the prediction, and it costs few measurements: 2 where
    the prediction is right, as on the unperturbed card."""
    import dataclasses

    steps, exact = [], []
    for model, sizes in GRID_MODELS[::2]:  # resnet18 and yolov8n: profiles the quality test traced too
        for imgsz in sizes:
            w = Workload(model=model, imgsz=imgsz)
            prof = profiles(w)
            for i, card in enumerate(CARDS):
                real = SimulatedBackend(card)
                c = real.card
                real.card = dataclasses.replace(c, context_bytes=round(c.context_bytes * (0.85 + 0.15 * i)),
                                                workspace_bytes=round(c.workspace_bytes * 1.3))
                real.add_profile(prof)
                r = decide_on(real, w, 0.8, max_batch=4096, profile=prof)
                d = r.decision
                truth = true_limit(real.measurer(w), d.budget_bytes)
                assert d.status == "ok" and d.peak_bytes <= d.budget_bytes
                assert 0.98 * truth <= d.batch_size <= 1.02 * truth, (w.label(), card, d.batch_size, truth)
                assert r.predicted_batch > 0
                steps.append(d.measurements)
                same = SimulatedBackend(card)
                same.add_profile(prof)
                r = decide_on(same, w, 0.8, max_batch=4096, profile=prof)
                exact.append(r.decision.measurements)
                assert r.decision.batch_size >= r.predicted_batch  # the prediction on its own card fits
    print(f"\nmeasurements from a prediction: perturbed median {statistics.median(steps)} max {max(steps)}; "
          f"exact {sorted(exact)}")
    assert statistics.median(steps) <= 3
    assert statistics.median(exact) == 2


def test_prediction_replays_the_profile_for_the_devices_own_memory(profiles):
    """``engine.predict`` for what a device reports: on a catalog card, exactly the simulated decision;
    a card not in the catalog gets its total and outside memory from the device and a generic cuBLAS
    workspace by compute capability (Hopper's 32 MiB, 8 MiB before)."""
    import dataclasses

    from orchestrator import engine
    from orchestrator.units import GiB, MiB

    w = Workload(model="tiny_models:tiny", imgsz=64, deterministic=False)
    prof = profiles(w)
    t4 = SimulatedBackend("T4")
    t4.add_profile(prof)
    assert engine.predict(prof, t4.info(), 0.8, 1024).batch_size == decide_on(t4, w, 0.8).decision.batch_size
    unknown = dataclasses.replace(t4.info(), name="NVIDIA H20", card="", total_bytes=96 * GiB,
                                  outside_bytes=600 * MiB, capability="9.0")
    card = engine.stand_in(unknown)
    assert (card.total_bytes, card.context_bytes, card.workspace_bytes) == (96 * GiB, 600 * MiB, 32 * MiB)
    assert engine.stand_in(dataclasses.replace(unknown, capability="8.6")).workspace_bytes == 8 * MiB
    a10g = dataclasses.replace(unknown, name="NVIDIA A10G", total_bytes=22_491 * MiB, capability="8.6")
    assert engine.stand_in(a10g).workspace_bytes == 8 * MiB and engine.stand_in(a10g).sold_gb == 24
