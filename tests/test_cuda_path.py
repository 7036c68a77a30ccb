"""The CUDA path without a GPU (issue 12).

The CUDA measurer (``cuda.StepMeasurer``) runs the real training step on real CPU tensors here,
reading a fake of the card's memory counters (``CpuCounters``: no peaks, a failed-allocation count
that a model bumps the way the caching allocator does). Models in ``tiny_models`` raise the exact
errors CUDA, cuBLAS and cuDNN raise. What needs a card is checked by benchmarks/calibrate_cuda.py.
"""
import argparse
import dataclasses
import gc
import os
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import tiny_models
from orchestrator import cli, cuda, devices, engine, fleet, job, models, nvml, simdevice, step, sweeploop, table, targets
from orchestrator.decision import decide
from orchestrator.devicetypes import DeviceInfo, Measurement
from orchestrator.cuda import StepMeasurer
from orchestrator.scheduler import Outcome
from orchestrator.spec import Workload
from orchestrator.units import GiB, MiB

CPU = torch.device("cpu")


class CpuCounters:
    """A fake of a card's memory counters for a measurer on the CPU: peaks and memory outside the
    allocator read 0; failed allocations are ``tiny_models.ALLOCATOR_OOMS`` (the allocator's num_ooms)."""

    def reset(self):
        gc.collect()

    def reset_peaks(self):
        pass

    def peaks(self):
        return 0, 0

    def outside_bytes(self):
        return 0

    def ooms(self):
        return tiny_models.ALLOCATOR_OOMS[0]

    def release(self):
        gc.collect()


def measurer(model: str, **fields) -> StepMeasurer:
    return StepMeasurer(CPU, Workload(model=f"tiny_models:{model}", imgsz=32, **fields), CpuCounters())


def decide_with(m: StepMeasurer, max_batch: int = 64):
    return decide(lambda b: m(b).reserved_bytes, GiB, max_batch=max_batch)


# -- item 1: probes leave the weights as they found them; a skipped optimizer step is loud


def test_weights_after_a_decision_equal_those_before():
    """A decision (real fp16 AdamW steps, out-of-memory in validation after two optimizer steps) leaves
    every weight and buffer (BatchNorm's running statistics included) exactly as built."""
    w = Workload(model="tiny_models:tiny_oom_above_12", imgsz=32, precision="fp16", optimizer="AdamW")
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in models.build(w).module.state_dict().items()}
    torch.manual_seed(0)
    m = StepMeasurer(CPU, w, CpuCounters())
    d = decide_with(m)
    assert (d.status, d.batch_size) == ("ok", 6)  # 7 trains, then validates 14 images: out of memory
    assert [p.batch for p in d.probes if p.oom] == [8, 7]
    after = m.built.module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_skipped_optimizer_step_fails_the_probe_loudly():
    """fp16 gradients that overflow make the grad scaler skip the step, which creates no optimizer state:
    the probe raises instead of reporting a peak that lacks the state."""
    with pytest.raises(step.SkippedStep, match=r"optimizer step 1 .*grad scaler found inf/NaN.*bf16 or fp32"):
        measurer("tiny_overflows_fp16", precision="fp16", optimizer="AdamW")


def test_every_optimizer_step_of_a_probe_leaves_optimizer_state():
    """The check runs after each optimizer step: with SGD and AdamW every parameter with a gradient has
    state (a probe that gets through ``step.train`` had all of its steps)."""
    for optimizer in ("SGD", "AdamW"):
        w = Workload(model="tiny_models:tiny", imgsz=32, precision="fp16", optimizer=optimizer, nbs=1)
        built = models.build(w)
        assert step.train(built, w, 2, CPU) == step.STEPS
        opt = step.make_optimizer(optimizer, built.module)
        for p in built.module.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(step.SkippedStep, match="it created no state"):
            step.check_stepped(opt, None, None, 0)


# -- item 3: out-of-memory that code inside the step catches is out of memory


def test_out_of_memory_caught_inside_the_step_is_out_of_memory():
    """From batch 8 the step's own code catches a failed allocation and falls back: those batches are
    out of memory (the answer is 7), not a success at a batch that only ran through the fallback."""
    d = decide_with(measurer("tiny_swallows_oom_from_8", precision="fp32"))
    assert d.batch_size == 7
    assert [p.batch for p in d.probes if p.oom] == [8]
    assert "caught by the code that made them" in d.probes[3].oom_message


def test_with_cudnn_benchmark_caught_failures_are_logged_not_counted(caplog):
    """cudnn.benchmark's autotuner fails allocations on purpose: with it on they are logged, not OOM."""
    m = measurer("tiny_swallows_oom_from_8", precision="fp32", cudnn_benchmark=True)
    with caplog.at_level("INFO", logger="orchestrator.cuda"):
        d = decide_with(m, max_batch=16)
    assert d.batch_size == 16 and m.caught_ooms > 0
    assert any("autotuner" in r.getMessage() for r in caplog.records)


# -- item 4: the out-of-memory classifier, on the texts PyTorch, cuBLAS and cuDNN raise

OOM = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.74 GiB"),
    torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul( ltHandle, ...)`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),  # cuDNN 8
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),  # cuDNN 9
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
]
MAYBE = [
    RuntimeError(tiny_models.CUDNN_NOT_SUPPORTED),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED_SHAPE"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    RuntimeError("GET was unable to find an engine to execute this computation"),
    RuntimeError("FIND was unable to find an engine to execute this computation"),
]
NOT_OOM = [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x10 and 12x4)"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"),
    torch.AcceleratorError(tiny_models.ILLEGAL_ADDRESS),
    ValueError("out of memory"),
]


@pytest.mark.parametrize("exc", OOM, ids=lambda e: str(e)[:48])
def test_out_of_memory_texts(exc):
    assert step.oom_kind(exc) == "oom"


@pytest.mark.parametrize("exc", MAYBE, ids=lambda e: str(e)[:48])
def test_cudnn_failures_that_may_be_memory(exc):
    assert step.oom_kind(exc) == "maybe" and step.is_oom(exc)


@pytest.mark.parametrize("exc", NOT_OOM, ids=lambda e: str(e)[:48])
def test_other_errors_are_errors(exc):
    assert step.oom_kind(exc) is None


def test_a_cudnn_failure_at_batch_1_that_repeats_is_an_error_not_no_fit():
    """cuDNN NOT_SUPPORTED at batch 1, again after the cache is emptied, with no allocation failing:
    the model or library is at fault, so it is an error (an error row), never ``no-fit``."""
    with pytest.raises(RuntimeError, match=r"CUDNN_STATUS_NOT_SUPPORTED.*again at batch 1 with the cache emptied"):
        measurer("tiny_cudnn_not_supported", precision="fp32")


def test_a_cudnn_failure_that_depends_on_the_batch_is_out_of_memory():
    """The same failure only from batch 8 on (batch 1 ran): out of memory, and the answer is 7."""
    d = decide_with(measurer("tiny_cudnn_not_supported_from_8", precision="fp32", val_scale=0))
    assert d.batch_size == 7 and d.probes[3].oom and "CUDNN_STATUS_NOT_SUPPORTED" in d.probes[3].oom_message


# -- item 7: the deterministic field: in the key and the table, applied around each probe


def test_deterministic_is_a_workload_field_in_the_key_flags_and_job_files(tmp_path):
    """Default as YOLO's trainer (True); its own key column; --no-deterministic; a list in a job file; a
    table written before it existed reads its rows as not deterministic (they were measured so)."""
    assert Workload(model="m:f").deterministic is True and "deterministic" in table.KEY
    p = argparse.ArgumentParser()
    cli.add_workload_flags(p, many=False)
    assert cli.workload_from_args(p.parse_args(["--model", "m:f", "--no-deterministic"])).deterministic is False
    j = job.from_dict({"sweep": {"models": ["m:f"], "imgsz": [64], "deterministic": [True, False]}}, "t")
    assert sorted(w.deterministic for w in j.sweep.workloads()) == [False, True]
    info = simdevice.SimulatedBackend("T4").info()
    keys = {table.row_key(info, Workload(model="m:f", deterministic=d), 0.8) for d in (True, False)}
    assert len(keys) == 2
    out = tmp_path / "t.csv"
    pd.DataFrame([{"gpu_name": "Tesla T4", "gpu_total_bytes": 1, "model": "m:f", "imgsz": 64, "fraction": 0.8,
                   "batch_size": 8, "status": "ok"}]).to_csv(out, index=False)
    assert table.read(out)["deterministic"].tolist() == [False]


TRACED = Workload(model="tiny_models:tiny", imgsz=64, deterministic=False)


def test_deterministic_travels_into_the_row(profiles):
    """A decision's row carries the field it was measured with."""
    w = TRACED
    backend = simdevice.SimulatedBackend("T4")
    backend.add_profile(profiles(w))
    row = table.decision_row(engine.decide_on(backend, w, 0.8))
    assert row["deterministic"] is False and row["status"] == "ok"


def test_the_measurer_applies_the_trainers_settings_and_puts_the_process_back(monkeypatch):
    """Inside each probe: deterministic algorithms, cudnn.deterministic, CUBLAS_WORKSPACE_CONFIG=:4096:8
    (YOLO's deterministic=True) or none of them; cudnn.benchmark as asked; afterwards, as before."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    outside = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
               torch.backends.cudnn.benchmark)
    for det in (True, False):
        tiny_models.SEEN_SETTINGS.clear()
        measurer("tiny_records_settings", precision="fp32", deterministic=det, cudnn_benchmark=True)
        assert tiny_models.SEEN_SETTINGS and all(s == {
            "deterministic": det, "cudnn_deterministic": det, "cudnn_benchmark": True,
            "cublas": ":4096:8" if det else None} for s in tiny_models.SEEN_SETTINGS)
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark) == outside
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


# -- item 2: memory outside the allocator grows during a decision


class GrowingContextCard:
    """A fake device whose context grows by 1 GiB once a batch of 64 or more has run (lazy kernel
    loading); its step needs 64 MiB per sample."""

    def __init__(self):
        self.outside = GiB // 2

    def info(self):
        return DeviceInfo(name="Growing", total_bytes=10 * GiB, outside_bytes=self.outside, backend="cuda")

    def measurer(self, workload):
        card = self

        class Measure:
            setup_seconds = 0.0

            @property
            def outside_bytes(self):
                return card.outside

            def __call__(self, batch):
                if batch >= 64:
                    card.outside = GiB // 2 + GiB
                return Measurement(batch * 64 * MiB, batch * 64 * MiB, card.outside)

        return Measure()


def test_the_answer_is_checked_against_the_budget_recomputed_with_the_most_outside_seen():
    """The budget read after the warm-up is 7.5 GiB (answer 120); the context then grows by 1 GiB, so
    the answer is decided again within 6.5 GiB (104), reusing the probes; the row says 1.5 GiB outside."""
    r = engine.decide_on(GrowingContextCard(), Workload(model="m:f"), 0.8)
    d = r.decision
    assert r.device.outside_bytes == GiB // 2 + GiB
    assert d.budget_bytes == int(0.8 * 10 * GiB) - r.device.outside_bytes
    assert d.batch_size == 104 and d.peak_bytes <= d.budget_bytes
    assert len({p.batch for p in d.probes}) == d.measurements  # each measurement listed once


# -- item 5: a sticky CUDA error replaces the actor and retries its combination once


def test_sticky_cuda_error_replaces_the_actor_and_retries_once(ray_session, tmp_path):
    """A model whose step hits an illegal memory access poisons its process's CUDA context (every later
    step in that process fails too): the process (here the profile worker tracing it) is replaced and the
    combination retried once, then it is an error row; the next combination runs on a fresh one and is ok."""
    data = {"sweep": {"models": ["tiny_models:tiny_illegal_address", "tiny_models:tiny"], "imgsz": [64],
                      "out": str(tmp_path / "t.csv")},
            "fleet": {"mode": "simulate", "simulate": "T4", "actor_timeout_s": 60, "max_attempts": 3}}
    stats, df = fleet.run_sweep(job.from_dict(data, "test"))
    rows = {r["model"]: r for _, r in df.iterrows()}
    bad = rows["tiny_models:tiny_illegal_address"]
    assert bad["status"] == "error" and bad["attempts"] == 2
    assert "DeviceFault: AcceleratorError: CUDA error: an illegal memory access was encountered" in bad["error"]
    assert "gave up after 2 attempts" in bad["error"]
    assert rows["tiny_models:tiny"]["status"] == "ok"
    assert stats.profile_worker_restarts == 2 and stats.actor_restarts == 0


class PoisonedCounters(CpuCounters):
    """After a sticky CUDA error every CUDA call in the process fails: the counters' own calls too."""

    def release(self):
        raise torch.AcceleratorError("CUDA error: unspecified launch failure (raised by the clean-up)")

    outside_bytes = release


def test_the_step_s_own_sticky_error_survives_a_failing_clean_up():
    """When the step hits a sticky error, putting the weights back, emptying the cache and reading memory
    fail as well; the error raised is the step's own, which the actor turns into a DeviceFault."""
    w = Workload(model="tiny_models:tiny_illegal_address", imgsz=32, precision="fp32")
    try:
        with pytest.raises(torch.AcceleratorError) as raised:
            StepMeasurer(CPU, w, PoisonedCounters())
    finally:
        tiny_models.POISONED.clear()  # this test process is not really poisoned
    assert "illegal memory access" in str(raised.value) and "clean-up" not in str(raised.value)
    assert cuda.device_fault(raised.value) is not None


def test_only_context_poisoning_errors_are_device_faults():
    assert cuda.device_fault(torch.AcceleratorError(tiny_models.ILLEGAL_ADDRESS)) is not None
    assert cuda.device_fault(RuntimeError("CUDA error: device-side assert triggered\n...")) is not None
    assert cuda.device_fault(torch.AcceleratorError("CUDA error: out of memory")) is None
    assert cuda.device_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


# -- item 6: without an index, the backend measures the current device


def fake_cuda(monkeypatch, current: int, asked: list):
    """A fake torch.cuda with 4 devices whose current one is ``current`` (what a launcher's
    ``torch.cuda.set_device(LOCAL_RANK)`` leaves); records the device each query names."""
    props = SimpleNamespace(name="NVIDIA L4", total_memory=22_491 * MiB, major=8, minor=9, uuid="5a1c0ffe")

    def record(value):
        return lambda device=None: asked.append(torch.device(device)) or value

    for name, value in {"is_available": True, "device_count": 4}.items():
        monkeypatch.setattr(torch.cuda, name, lambda v=value: v)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_properties", record(props))
    monkeypatch.setattr(torch.cuda, "mem_get_info", record((20_000 * MiB, 22_491 * MiB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", record(0))


def test_without_an_index_the_current_device_is_measured(monkeypatch):
    """On rank 2 (current device 2) the backend, autobatch's and lookup's, asks about cuda:2 only."""
    asked = []
    fake_cuda(monkeypatch, 2, asked)
    assert devices.make_backend(None).device == torch.device("cuda", 2)
    assert cuda.CudaBackend(index=1).device == torch.device("cuda", 1)
    asked.clear()
    target = targets.current_device()
    assert target.name == "NVIDIA L4" and target.card == "L4"
    assert asked and set(asked) == {torch.device("cuda", 2)}


# -- item 8: neighbours on the card


def test_rows_measured_next_to_other_processes_are_measured_again():
    """An ok row measured while other processes held more than the threshold is not skipped on re-run."""
    base = {"gpu_name": "NVIDIA L4", "gpu_total_bytes": 1, **Workload(model="m:f", imgsz=64).as_dict(),
            "fraction": 0.8, "batch_size": 8, "status": "ok"}
    df = table.merge(table.empty(), [{**base, "neighbour_bytes": 0},
                                     {**base, "imgsz": 96, "neighbour_bytes": 2 * GiB}])
    assert [k[3] for k in table.done_keys(df)] == [64]


def test_every_device_says_which_device_disagreed_and_why(profiles):
    """The merge of several devices' answers names each device and what it had left, and why the smallest
    is smallest (here: other processes held memory on it)."""
    backend = simdevice.SimulatedBackend("T4")
    backend.add_profile(profiles(TRACED))
    a, b = engine.decide_on(backend, TRACED, 0.8), engine.decide_on(backend, TRACED, 0.03)
    b.device = dataclasses.replace(b.device, uuid="GPU-2", neighbours=1, neighbour_bytes=3 * GiB)
    text = sweeploop._disagreement(Outcome("k", b, "", 1, (a.decision.batch_size, b.decision.batch_size), (a, b)))
    assert f"{b.decision.batch_size} on " in text and "GPU-2" in text and "1 other process held 3.00 GiB" in text
    assert text.endswith("Smallest because: other processes held 3.00 GiB on GPU-2 while it was measured")


# -- item 9: MIG slices are devices of their own


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", ("NVIDIA A100-SXM4-40GB", "3g.20gb", 20)),
    ("NVIDIA A100-SXM4-80GB MIG 1g.10gb+me", ("NVIDIA A100-SXM4-80GB", "1g.10gb+me", 10)),
    ("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb", ("NVIDIA H100 80GB HBM3", "1c.3g.40gb", 40)),
    ("NVIDIA A100-SXM4-40GB", None),
    ("Tesla T4", None),
])
def test_mig_names(name, expected):
    assert nvml.parse_mig(name) == expected


def test_a_mig_slice_is_its_own_type_and_never_the_whole_card():
    """A slice reporting its own memory is a device type of its own (no catalog card); one reporting the
    whole card's memory is refused."""
    slice_name = "NVIDIA A100-SXM4-40GB MIG 3g.20gb"
    assert nvml.mig_profile(slice_name, 19_968 * MiB) == "3g.20gb"
    assert nvml.mig_profile("NVIDIA A100-SXM4-40GB", 40_326 * MiB) == ""
    with pytest.raises(RuntimeError, match=r"MIG 3g.20gb slice of NVIDIA A100-SXM4-40GB but reports 39.4 GiB"):
        nvml.mig_profile(slice_name, 40_326 * MiB)
    from orchestrator import catalog

    assert catalog.by_device_name(slice_name, 19_968 * MiB) is None
