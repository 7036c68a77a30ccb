"""The simulated device: fake-tensor traces against real runs, synthesis, OOM and decisions."""
import pytest

from orchestrator import allocator, catalog, cudacost, fastfake, models, simulated, tracker
from orchestrator.decision import OutOfMemory, decide
from orchestrator.simdevice import SimulatedBackend
from orchestrator.spec import Workload


@pytest.mark.parametrize("precision,optimizer,ema", [("fp32", "SGD", False), ("fp16", "AdamW", True)])
def test_fake_trace_equals_real_cpu_run(precision, optimizer, ema):
    """The fake-tensor step peaks at exactly the live tensor bytes of the same step on real CPU tensors."""
    w = Workload(model="torchvision:resnet18", imgsz=64, precision=precision, optimizer=optimizer, ema=ema)
    built = models.build(w)
    fake = simulated.trace(built, w, 4)
    real = simulated.trace(built, w, 4, fake=False, surrogate=True)
    assert simulated.tensor_peak(fake) == simulated.tensor_peak(real) > 0


def test_reserved_at_least_allocated_at_least_tensors(profiles):
    """Allocator rounding and caching only add: reserved >= allocated >= live tensor bytes."""
    prof = profiles(Workload(model="torchvision:mobilenet_v3_small", imgsz=224, precision="fp16", optimizer="SGD", ema=True))
    for b in (1, 8, 33):
        ev = prof.events(b)
        st = allocator.replay(ev)
        assert st.peak_reserved >= st.peak_allocated >= simulated.tensor_peak(ev) > 0


def test_synthesized_trace_equals_direct_trace(profiles):
    """Traces at batch sizes never run are synthesized exactly: checked against a direct fake run."""
    w = Workload(model="ultralytics:yolov8n.yaml", imgsz=320, precision="fp16", optimizer="SGD", ema=True)
    prof = profiles(w)
    assert prof.affine, "YOLO traces should be affine in batch size"
    direct = simulated.trace(models.build(w), w, 13, cuda_costs=prof.cuda_costs)
    assert prof.events(13) == direct


def test_simulated_oom_drives_no_fit():
    """A workload larger than the card is a no-fit decision (batch 1 OOMs), not an error."""
    w = Workload(model="torchvision:resnet50", imgsz=3072, precision="fp32", optimizer="AdamW", ema=True)
    backend = SimulatedBackend("T4")
    measure = backend.measurer(w)
    with pytest.raises(OutOfMemory):
        measure(64)
    d = decide(lambda b: measure(b).reserved_bytes, backend.info().budget_bytes(0.8))
    assert d.status in ("ok", "no-fit")
    assert d.status == "no-fit" or d.peak_bytes <= d.budget_bytes


def test_unknown_card_lists_known_ones():
    with pytest.raises(ValueError, match="known cards are T4"):
        catalog.card("T5")


def test_catalog_has_the_fleet_cards():
    """The catalog names every card the issue lists, with plausible totals."""
    for key in ("T4", "L4", "A10G", "V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB",
                "H100-80GB", "H200", "RTX-3090", "RTX-4090"):
        c = catalog.card(key)
        assert 14 * 2**30 < c.total_bytes < 150 * 2**30
        assert 0 < c.context_bytes < 2**30


@pytest.mark.parametrize("model,imgsz", [("torchvision:resnet18", 32)])
def test_real_training_step_runs_on_cpu(model, imgsz):
    """The step the CUDA backend runs (real loss, real GradScaler) runs for real on the CPU (YOLO's:
    tests/test_trainer_step.py, against the simulated step)."""
    import torch

    from orchestrator import step

    w = Workload(model=model, imgsz=imgsz, precision="fp16", optimizer="AdamW", ema=True)
    built = models.build(w)
    step.train(built, w, 2, torch.device("cpu"))
    assert all(p.grad is None for p in built.module.parameters())  # zero_grad(set_to_none=True) ran


def test_oom_classifier():
    """Only out-of-memory counts as data; other runtime errors are errors."""
    import torch

    from orchestrator.step import is_oom

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("HIP out of memory"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if ..."))
    assert is_oom(RuntimeError("GET was unable to find an engine to execute this computation"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


def test_measured_peak_includes_workspace_without_shifting_frees(profiles):
    """The card's cuBLAS workspace adds to the replayed peak; it must not change which block each free releases."""
    w = Workload(model="torchvision:mobilenet_v3_small", imgsz=224, precision="fp16", optimizer="SGD", ema=True)
    backend = SimulatedBackend("H100-80GB")
    backend.add_profile(profiles(w))
    for b in (1, 16, 100):
        bare = allocator.replay(profiles(w).events(b)).peak_reserved
        measured = backend.measurer(w)(b).reserved_bytes
        assert bare <= measured <= cudacost.over_a_run(bare)


def test_trace_that_is_not_affine_is_traced_at_every_batch(caplog):
    """A model whose allocations grow with batch squared breaks the affine event model: the profile says
    so, and every batch outside the profiled ones is traced directly, never synthesized."""
    w = Workload(model="tiny_models:tiny_quadratic", imgsz=32, nbs=1, val_scale=0)  # one shape of step
    with caplog.at_level("WARNING", logger="orchestrator.simulated"):
        prof = simulated.profile(w)
    assert not prof.affine and "not affine" in caplog.text
    direct = simulated.trace(models.build(w), w, 13, cuda_costs=prof.cuda_costs)
    assert 13**2 * 4096 * 4 in direct  # the quadratic buffer, at its true size
    assert prof.events(13) == direct and prof.traced == len(simulated.PROFILE_BATCHES) + 1


def test_an_affine_step_is_traced_at_three_batches_and_synthesizes_the_fourth():
    """Where batch 1 is affine with 2 and 3, the profile stops there; batch 4 (traced before) is
    synthesized, equal to a direct trace."""
    w = Workload(model="tiny_models:tiny", imgsz=32, nbs=1, val_scale=0)
    prof = simulated.profile(w)
    assert prof.affine and prof.traced == 3 and 4 not in prof.regimes[1].base
    assert prof.events(4) == simulated.trace(models.build(w), w, 4, cuda_costs=prof.cuda_costs)


@pytest.mark.parametrize("model,imgsz,fields", [
    ("torchvision:resnet18", 64, dict(precision="fp16", optimizer="SGD")),  # batch norm, in-place optimizer
    ("ultralytics:yolov8n.yaml", 128, dict(precision="bf16", optimizer="AdamW", world_size=2)),  # spliced loss, DDP
])
def test_trace_shortcuts_change_no_event(model, imgsz, fields):
    """The shortcuts that make traces cheap (``fastfake``'s outputs built from metadata seen before, also at
    another batch; in-place foreach ops skipped; the loss's events reused across traces) give exactly the
    events of running every op through FakeTensorMode, in both shapes of step, at batches traced in order."""
    w = Workload(model=model, imgsz=imgsz, **fields)
    built = models.build(w)
    cache = fastfake.OutputCache()
    for batch, accumulate in ((1, 2), (2, 2), (3, 2), (2, 1), (5, 1)):
        fast = simulated.trace(built, w, batch, accumulate=accumulate, cache=cache)
        assert fast == simulated.trace(built, w, batch, accumulate=accumulate, shortcuts=False), (batch, accumulate)
    assert cache.hits > cache.misses  # the shortcuts were taken


def test_tracker_counts_a_copy_made_by_a_view_op_and_not_a_view():
    """Under inference_mode aten.to reaches the tracker undecomposed, an op its schema calls a view, and
    copies: an allocation. A true view (of a tensor the trace never saw) allocates nothing."""
    import torch

    recorder = tracker.StorageTracker()
    x = torch.zeros(1000)
    with torch.inference_mode(), recorder:
        y = x.to(torch.float16)
        v = x.view(10, 100)
    assert recorder.events == [2000] and y.dtype == torch.float16 and v.shape == (10, 100)
