#!/usr/bin/env python3
"""Calibrate the simulated device against a real CUDA GPU (issue 7).

On a CUDA machine this script, on this process's current CUDA device,

0. runs issue 12's checks, one ``CHECK item N (...): PASS|FAIL`` line each (``--checks-only``
   stops there): (1) a decision leaves the weights as built, and a float16 step the grad scaler
   skips fails the probe; (2) memory outside the allocator is read after every probe and the
   answer fits the budget recomputed with the most seen, then trains within the fraction; (3) an
   out-of-memory caught inside the step counts as out of memory (with cudnn.benchmark: logged);
   (7) ``deterministic`` is applied in the step (flags, CUBLAS_WORKSPACE_CONFIG, the cuBLAS
   workspace torch allocates) and the process's settings come back afterwards;
1. records the card: name, total memory, device usage before CUDA init (NVML, matched by UUID),
   after init, after a first matmul (cuBLAS + its workspace) and a first conv
   forward/backward (cuDNN), driver, torch, CUDA and cuDNN versions;
2. runs the REAL training step (``orchestrator.step.train``: 2 steps, optimizer
   state, EMA, AMP with its scaler) for a matrix of models x precision x
   optimizer x batch and reads ``max_memory_allocated``, ``max_memory_reserved``
   and device-level usage (``total - mem_get_info()[0]``, sampled right after
   the step: a sample, not a peak -- see LIMITATIONS below);
3. runs the simulated backend for the same configurations with the card's
   catalog entry (or ``--card``) and prints real vs simulated with % errors;
4. runs the full decision (``engine.decide_on(CudaBackend(), ...)``) for 3
   workloads, then trains 20 steps at the chosen batch (and, time allowing, at
   the batch the *simulated* card chose) and checks: no OOM, and whole-device
   peak usage <= fraction x total;
5. writes ``calibration_<card>.csv``, ``calibration_decisions_<card>.csv`` and
   ``calibration_card_<card>.json`` under ``--out-dir`` (default
   benchmarks/results/), rewritten after every row so a killed run keeps what it
   measured.

The whole run keeps to ``--budget-s`` (default 420 s): configurations that no
longer fit the time are recorded as ``skipped`` rows. The simulated half runs in
``--jobs`` CPU worker processes alongside the GPU half.

Without CUDA the script exits with code 2 and one line. ``--simulate-only CARD``
runs only the simulated half (CPU, no GPU needed) for a catalog card.

LIMITATIONS (what the numbers mean)
- device-level usage is ``mem_get_info`` sampled after the step returned, not
  at the peak; the estimate of whole-device peak is
  ``max_memory_reserved + (device used - memory_reserved)`` at that sample,
  i.e. it assumes memory outside the caching allocator (context, kernel images,
  library handles) did not spike transiently during the step. With lazy module
  loading (CUDA_MODULE_LOADING=LAZY, the default) the context grows as new
  kernels load, so "outside" grows over the run.
- the simulated YOLO step runs ultralytics' own loss and assigner on real tensors
  shaped like the model's outputs, spliced into the fake trace; the real step runs
  the same loss on the card.
- the simulator adds cuDNN's contiguous copies and cuBLAS workspaces
  (``orchestrator.cudacost``) but not cuDNN convolution workspaces (under 1 % of a
  training peak in the calibration); where they are large the real reserved peak is
  above the simulated one.

Run on the device machine (no network there: orchestrator runs from the copied tree
via PYTHONPATH; ultralytics travels as a wheel in .whl/, carried; torch, torchvision,
numpy, opencv-python-headless, pyyaml, nvidia-ml-py are already installed there):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/calibrate_cuda.py --out-dir "$OUT"
    PYTHONPATH=/tmp/site:. python3 benchmarks/calibrate_cuda.py --checks-only --out-dir "$OUT"   # ~1 min
Here (no GPU):
    python benchmarks/calibrate_cuda.py --simulate-only H200 --quick --out-dir /tmp/calib
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib
import json
import os
import platform
import re
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a plain checkout (PYTHONPATH=.) without pip install -e
    sys.path.insert(0, str(REPO))

from orchestrator.units import GiB, MiB  # noqa: E402

# (model, imgsz, batches): batch sizes ascending; larger ones are skipped after an OOM
FULL_MODELS = [
    ("torchvision:resnet18", 224, (1, 8, 32, 64, 128, 256)),
    ("torchvision:resnet50", 224, (1, 8, 32, 64, 128)),
    ("torchvision:mobilenet_v3_large", 224, (1, 8, 32, 64, 128, 256)),
    ("ultralytics:yolov8n.yaml", 640, (1, 8, 32, 64)),
    ("ultralytics:yolov8s.yaml", 640, (1, 8, 32)),
]
QUICK_BATCHES = (1, 8, 32)
# (precision, optimizer), in the order they are measured (a budget cut drops the later ones)
FULL_CONFIGS = [("fp16", "SGD"), ("fp32", "AdamW"), ("fp32", "SGD"), ("fp16", "AdamW")]
QUICK_CONFIGS = FULL_CONFIGS[:2]
# decision workloads: (model, imgsz, precision, optimizer); each is also in the matrix, so its
# simulated profile is shared
FULL_DECISIONS = [
    ("torchvision:resnet50", 224, "fp32", "AdamW"),
    ("ultralytics:yolov8n.yaml", 640, "fp32", "AdamW"),
    ("ultralytics:yolov8s.yaml", 640, "fp16", "SGD"),
]
QUICK_DECISIONS = [("ultralytics:yolov8n.yaml", 640, "fp16", "SGD")]

MATRIX_FIELDS = [
    "card", "gpu_name", "total_bytes", "model", "imgsz", "precision", "optimizer", "ema", "batch",
    "real_status", "real_alloc_bytes", "real_reserved_bytes", "real_device_used_bytes", "real_outside_bytes",
    "real_device_peak_est_bytes", "real_alloc_start_bytes", "real_alloc_retries", "real_step_s", "real_msg",
    "sim_card", "sim_status", "sim_alloc_bytes", "sim_reserved_bytes", "sim_device_bytes", "sim_msg",
    "err_alloc_pct", "err_reserved_pct", "err_device_pct", "loss_note", "torch", "cuda", "cudnn",
]
DECISION_FIELDS = [
    "card", "gpu_name", "total_bytes", "model", "imgsz", "precision", "optimizer", "ema", "fraction",
    "source", "batch", "decision_status", "decision_clamped", "decision_peak_bytes", "budget_bytes",
    "outside_bytes_at_decision", "measurements", "probes", "decision_s", "sim_batch", "sim_peak_bytes",
    "sim_probes", "train_status", "steps_done", "steps", "train_max_alloc_bytes", "train_max_reserved_bytes",
    "train_sampled_used_max_bytes", "outside_before_bytes", "outside_after_bytes", "whole_peak_est_bytes",
    "limit_bytes", "within_fraction", "pass", "step_s_mean", "msg",
]


_T0 = time.monotonic()


def say(*parts) -> None:
    print(*parts, flush=True)


def log(msg: str) -> None:
    """A progress line, stamped with seconds since start."""
    print(f"{time.monotonic() - _T0:6.1f}s {msg}", flush=True)


def mib(n) -> str:
    return "-" if n in (None, "") else f"{int(n) / MiB:.1f}"


def pct(sim, real) -> float | str:
    if sim in (None, "") or real in (None, "", 0):
        return ""
    return round(100.0 * (int(sim) - int(real)) / int(real), 2)


def short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "gpu"


class Clock:
    """Time left in the run's budget."""

    def __init__(self, budget_s: float, t0: float | None = None):
        self.t0 = time.monotonic() if t0 is None else t0
        self.end = self.t0 + budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, until: float | None = None) -> float:
        return (self.end if until is None else until) - time.monotonic()


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Atomically (temp file + rename): a run killed mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- simulated half (CPU)

def _sim_worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # fake tensors compute nothing; don't oversubscribe the GPU process


def sim_profiles(model: str, imgsz: int, configs: list[tuple[str, str]]) -> dict:
    """Card-independent simulated profiles of one model for each (precision, optimizer).

    Returns {(precision, optimizer): ("ok", Profile, seconds) | ("error", message, seconds)}.
    Runs in a worker process (or inline); the model is built once and shared by the traces.
    """
    from orchestrator import simulated
    from orchestrator.models import build
    from orchestrator.spec import Workload

    out = {}
    t0 = time.perf_counter()
    try:
        built = build(Workload(model=model, imgsz=imgsz))
    except Exception as e:  # noqa: BLE001 -- becomes an error row
        msg = short(e)
        return {cfg: ("error", f"build: {msg}", time.perf_counter() - t0) for cfg in configs}
    for prec, opt in configs:
        t1 = time.perf_counter()
        try:
            prof = simulated.profile(Workload(model=model, imgsz=imgsz, precision=prec, optimizer=opt), built=built)
            out[(prec, opt)] = ("ok", prof, time.perf_counter() - t1)
        except Exception as e:  # noqa: BLE001
            out[(prec, opt)] = ("error", short(e), time.perf_counter() - t1)
    return out


class SimRunner:
    """Profiles per model, computed in spawned CPU workers (or inline with jobs=0)."""

    def __init__(self, models, configs, jobs: int):
        self.models, self.configs, self.jobs = models, configs, jobs
        self.results: dict[str, dict] = {}
        self.pending: dict[str, object] = {}
        self.pool = None
        if jobs > 0:
            import multiprocessing as mp

            # workers must not touch the GPU: hide it while they start (spawn copies the environment)
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
            try:
                self.pool = mp.get_context("spawn").Pool(min(jobs, len(models)), initializer=_sim_worker_init)
            finally:
                if saved is None:
                    del os.environ["CUDA_VISIBLE_DEVICES"]
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
            for model, imgsz, _ in models:
                self.pending[model] = self.pool.apply_async(sim_profiles, (model, imgsz, configs))

    def run_inline(self, clock: Clock, until: float | None = None) -> None:
        for model, imgsz, _ in self.models:
            if model in self.results:
                continue
            if clock.left(until) <= 0:
                log(f"[sim] skipped {model}: time budget")
                continue
            log(f"[sim] tracing {model}@{imgsz} ...")
            self.results[model] = sim_profiles(model, imgsz, self.configs)

    def collect(self, timeout_s: float) -> None:
        """Gather finished worker results, waiting at most ``timeout_s`` in all."""
        import multiprocessing as mp

        end = time.monotonic() + max(0.0, timeout_s)
        for model, res in list(self.pending.items()):
            try:
                self.results[model] = res.get(timeout=max(0.01, end - time.monotonic()))
                del self.pending[model]
            except mp.TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001 -- a worker crash: every config of the model is an error
                self.results[model] = {cfg: ("error", f"worker: {short(e)}", 0.0) for cfg in self.configs}
                del self.pending[model]

    def get(self, model: str, cfg) -> tuple:
        r = self.results.get(model)
        if r is None:
            return ("skipped", "simulated profile not ready within the time budget", 0.0)
        return r.get(cfg, ("skipped", "not profiled", 0.0))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def simulate_row(card, prof, batch: int) -> dict:
    """Simulated peak reserved (the backend's measurer, incl. workspace) and peak allocated."""
    from orchestrator.decision import OutOfMemory

    backend = _sim_backend(card)
    backend.add_profile(prof)
    try:
        m = backend.measurer(prof.workload)(batch)
    except OutOfMemory as e:
        return {"sim_status": "oom", "sim_msg": str(e)[:200]}
    return {"sim_status": "ok", "sim_alloc_bytes": m.allocated_bytes, "sim_reserved_bytes": m.reserved_bytes,
            "sim_device_bytes": m.reserved_bytes + m.outside_bytes}


def _sim_backend(card):
    from orchestrator.simdevice import SimulatedBackend

    backend = SimulatedBackend("T4")  # any key; the card is replaced (it may be an ad-hoc, uncatalogued card)
    backend.card = card
    return backend


def sim_decision(card, prof, fraction: float, max_batch: int) -> dict:
    from orchestrator import engine

    backend = _sim_backend(card)
    backend.add_profile(prof)
    d = engine.decide_on(backend, prof.workload, fraction, max_batch=max_batch).decision
    return {"sim_status": d.status, "sim_batch": d.batch_size, "sim_peak_bytes": d.peak_bytes, "sim_probes": probes_text(d.probes)}


def probes_text(probes) -> str:
    return " ".join(f"{p.batch}:{'OOM' if p.peak_bytes is None else round(p.peak_bytes / MiB)}" for p in probes)


# --------------------------------------------------------------------------- real half (CUDA)

def nvml_used_by_uuid() -> dict[str, tuple[int, int]] | str:
    """{NVML UUID: (used, total) bytes} for every device and MIG slice NVML lists, or why NVML failed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i)]
            try:
                count = pynvml.nvmlDeviceGetMaxMigDeviceCount(handles[0])
            except pynvml.NVMLError:
                count = 0
            for k in range(count):
                try:
                    handles.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handles[0], k))
                except pynvml.NVMLError:
                    continue
            for h in handles:
                uuid = pynvml.nvmlDeviceGetUUID(h)
                m = pynvml.nvmlDeviceGetMemoryInfo(h)
                out[uuid.decode() if isinstance(uuid, bytes) else uuid] = (m.used, m.total)
        return out
    except Exception as e:  # noqa: BLE001 -- informational
        return short(e)


def card_info(torch, args) -> dict:
    """Device usage before CUDA init (NVML), after init, after cuBLAS and cuDNN load; versions."""
    info: dict = {"host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "env": {k: os.environ.get(k) for k in (
                      "CUDA_MODULE_LOADING", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG",
                      "CUDA_VISIBLE_DEVICES")}}
    for mod in ("torchvision", "ultralytics"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- informational
            info[mod] = None
    nvml_before = nvml_used_by_uuid()  # before CUDA init: NVML creates no CUDA context
    torch.cuda.init()
    dev = torch.device("cuda", torch.cuda.current_device())  # the device a trainer's rank would use
    props = torch.cuda.get_device_properties(dev)
    # NVML numbers devices its own way (CUDA_VISIBLE_DEVICES and MIG renumber them): match by UUID
    from orchestrator import nvml

    uuid = nvml.nvml_uuid(props)
    info.update(uuid=uuid, mig=nvml.parse_mig(props.name) is not None, driver=nvml.driver_version())
    if isinstance(nvml_before, str):
        info["nvml_error"] = nvml_before
    elif uuid in nvml_before:
        info.update(nvml_total_bytes=nvml_before[uuid][1], nvml_used_before_init_bytes=nvml_before[uuid][0],
                    nvml_device_count=len(nvml_before))
    else:
        info["nvml_error"] = f"{uuid or 'the device'} is not among NVML's devices {sorted(nvml_before)}"

    def used():
        torch.cuda.synchronize(dev)
        free, total = torch.cuda.mem_get_info(dev)
        return {"used": total - free, "reserved": torch.cuda.memory_reserved(dev),
                "allocated": torch.cuda.memory_allocated(dev)}

    free, total = torch.cuda.mem_get_info(dev)  # creates the primary context
    info.update(name=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                props_total_bytes=props.total_memory, total_bytes=total, after_init=used())
    x = torch.empty(1, device=dev)
    info["after_first_alloc"] = used()
    a, b = torch.randn(1024, 1024, device=dev), torch.randn(1024, 1024, device=dev)
    c = a @ b
    info["after_matmul_fp32"] = used()
    with torch.autocast("cuda", dtype=torch.float16):
        c = a @ b
    info["after_matmul_fp16"] = used()
    inp = torch.randn(8, 64, 56, 56, device=dev, requires_grad=True)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dev)
    conv(inp).sum().backward()
    info["after_conv_fwd_bwd"] = used()
    with torch.autocast("cuda", dtype=torch.float16):
        conv(inp).float().sum().backward()
    info["after_conv_fp16"] = used()
    del x, a, b, c, inp, conv
    gc.collect()
    torch.cuda.empty_cache()
    rest = used()
    info["at_rest"] = rest
    # what stays allocated with no tensors alive: the cuBLAS/cuBLASLt workspaces (held by torch)
    info["workspace_allocated_bytes"] = rest["allocated"]
    info["outside_bytes_at_rest"] = rest["used"] - rest["reserved"]
    info["cudnn"] = torch.backends.cudnn.version()
    return info


def real_step(torch, measure, batch: int, dev) -> dict:
    """One measurement through the CUDA backend's own measurer (what the engine decides with):
    ``step.train`` (2 steps) at ``batch``, its peak allocated/reserved and the bytes outside the allocator."""
    from orchestrator.decision import OutOfMemory

    alloc_start = torch.cuda.memory_allocated(dev)
    retries0 = torch.cuda.memory_stats(dev).get("num_alloc_retries", 0)
    t0 = time.perf_counter()
    failure = None
    try:
        m = measure(batch)
    except OutOfMemory as e:
        failure = ("oom", short(e))
    except Exception as e:  # noqa: BLE001 -- an error row
        failure = ("error", short(e))
    seconds = round(time.perf_counter() - t0, 3)
    if failure:  # outside the except block: the traceback (and the tensors its frames held) is gone
        gc.collect()
        torch.cuda.empty_cache()
        return {"real_status": failure[0], "real_msg": failure[1], "real_step_s": seconds,
                "real_alloc_start_bytes": alloc_start}
    free, total = torch.cuda.mem_get_info(dev)
    return {
        "real_status": "ok", "real_alloc_bytes": m.allocated_bytes, "real_reserved_bytes": m.reserved_bytes,
        "real_device_used_bytes": total - free, "real_outside_bytes": m.outside_bytes,
        "real_device_peak_est_bytes": m.reserved_bytes + m.outside_bytes, "real_alloc_start_bytes": alloc_start,
        "real_alloc_retries": torch.cuda.memory_stats(dev).get("num_alloc_retries", 0) - retries0,
        "real_step_s": seconds,
    }


def train_steps(torch, workload, batch: int, steps: int, fraction: float, deadline: float, dev) -> dict:
    """Train ``steps`` steps at ``batch`` with persistent optimizer/EMA/scaler, as a trainer does.

    Samples device usage after each step; whole-device peak estimate is
    max(sampled used, max_memory_reserved + outside bytes before/after).
    """
    from orchestrator import step
    from orchestrator.cuda import trainer_settings
    from orchestrator.models import build

    out = {"steps": steps, "steps_done": 0}
    built = build(workload)
    built.module.to(dev)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    outside0 = total - free - torch.cuda.memory_reserved(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    state = {"used_max": total - free, "times": []}
    t_start = time.perf_counter()

    def after_step(i: int) -> bool:
        torch.cuda.synchronize(dev)
        f, _ = torch.cuda.mem_get_info(dev)
        state["used_max"] = max(state["used_max"], total - f)
        now = time.perf_counter()
        state["times"].append(now - state.get("t_last", t_start))
        state["t_last"] = now
        out["steps_done"] = i + 1
        mean = sum(state["times"]) / len(state["times"])
        return i + 1 < steps and time.monotonic() + mean * (steps - i - 1) > deadline

    def loop():  # its own frame: after an OOM, its tensors die with it
        with trainer_settings(workload, dev):  # cudnn.benchmark and determinism, as the measurer had them
            done = step.train(built, workload, batch, dev, steps=steps, after_step=after_step)
        return "ok" if done == steps else "partial"

    try:
        status = loop()
        if status == "partial":
            out["msg"] = "stopped early: time budget"
    except Exception as e:  # noqa: BLE001 -- OOM is the finding; anything else is an error row
        status, out["msg"] = ("oom" if step.is_oom(e) else "error"), short(e)
    gc.collect()
    torch.cuda.synchronize(dev)
    free, _ = torch.cuda.mem_get_info(dev)
    outside1 = total - free - torch.cuda.memory_reserved(dev)
    max_reserved = torch.cuda.max_memory_reserved(dev)
    whole = max(state["used_max"], max_reserved + max(outside0, outside1))
    limit = int(fraction * total)
    times = state["times"]
    out.update(
        train_status=status, train_max_alloc_bytes=torch.cuda.max_memory_allocated(dev),
        train_max_reserved_bytes=max_reserved, train_sampled_used_max_bytes=state["used_max"],
        outside_before_bytes=outside0, outside_after_bytes=outside1, whole_peak_est_bytes=whole,
        limit_bytes=limit, within_fraction=whole <= limit,
        step_s_mean=round(sum(times) / len(times), 3) if times else "",
    )
    out["pass"] = status == "ok" and out["steps_done"] == steps and whole <= limit
    del built
    gc.collect()
    torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- issue 12: pass/fail on the card
# Each check prints one line "CHECK item N (what): PASS|FAIL detail". Models used only here are
# factories of this module (``benchmarks.calibrate_cuda:NAME``), built fresh per configuration.

CHECK_MAX_BATCH = 256  # keeps each check's decision to a few seconds on any card


def overflows_fp16():
    """resnet18 whose logits overflow float16: the grad scaler skips every step."""
    import torchvision

    class Overflows(torchvision.models.ResNet):
        def forward(self, x):
            return super().forward(x) * 1e6

    return Overflows(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])


def swallows_oom_from_8():
    """resnet18 whose training forward, from batch 8, asks for twice the card and catches the
    out-of-memory, as ultralytics' assigner does before retrying image by image."""
    import torch
    import torchvision

    class Swallows(torchvision.models.ResNet):
        def forward(self, x):
            if self.training and x.shape[0] >= 8:
                try:
                    torch.empty(2 * torch.cuda.get_device_properties(x.device).total_memory, dtype=torch.uint8,
                                device=x.device)
                except torch.OutOfMemoryError:
                    pass  # the fallback runs instead
            return super().forward(x)

    return Swallows(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])


SEEN = []


def records_settings():
    """A small MLP that records, in each forward, the determinism settings and the bytes the first
    matmul of a probe allocates beyond its output (the cuBLAS workspace torch gives the handle)."""
    import torch

    class Records(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            a, b = torch.ones(8, 8, device=x.device), torch.ones(8, 8, device=x.device)
            before = torch.cuda.memory_allocated(x.device)
            c = a @ b
            workspace = torch.cuda.memory_allocated(x.device) - before - 512  # the 8x8 output: one 512 B block
            del a, b, c
            SEEN.append({"deterministic": torch.are_deterministic_algorithms_enabled(),
                         "cudnn_deterministic": torch.backends.cudnn.deterministic,
                         "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "workspace": workspace})
            return self.fc(x.flatten(1))

    return Records()


def check(results: list, item: str, what: str, passed: bool, detail: str) -> None:
    results.append({"item": item, "what": what, "pass": bool(passed), "detail": detail})
    say(f"CHECK item {item} ({what}): {'PASS' if passed else 'FAIL'} {detail}")


def _workload(model: str, imgsz: int = 64, **fields):
    from orchestrator.spec import Workload

    return Workload(model=model, imgsz=imgsz, **fields)


def check_weights(torch, backend, results) -> None:
    """Item 1: a decision leaves the weights as built; a skipped fp16 step fails the probe loudly."""
    from orchestrator import decision, models, step

    wl = _workload("torchvision:resnet18", precision="fp16", optimizer="AdamW")
    torch.manual_seed(0)
    ref = {k: v.clone() for k, v in models.build(wl).module.state_dict().items()}
    torch.manual_seed(0)
    m = backend.measurer(wl)
    d = decision.decide(lambda b: m(b).reserved_bytes, int(0.5 * torch.cuda.mem_get_info(backend.device)[1]),
                        max_batch=CHECK_MAX_BATCH)
    after = {k: v.detach().cpu() for k, v in m.built.module.state_dict().items()}
    moved = [k for k in ref if not torch.equal(ref[k], after[k])]
    check(results, "1", "weights unchanged by a decision", d.status == "ok" and not moved,
          f"{d.measurements} probes ({probes_text(d.probes)}), answer {d.batch_size}; "
          f"{len(moved)} of {len(ref)} tensors changed{': ' + ', '.join(moved[:3]) if moved else ''}")
    m = None  # the model goes before the next one is built
    gc.collect()
    torch.cuda.empty_cache()
    try:
        backend.measurer(_workload("benchmarks.calibrate_cuda:overflows_fp16", precision="fp16"))
        check(results, "1", "skipped fp16 step fails loudly", False, "the overflowing model's probe passed")
    except step.SkippedStep as e:
        check(results, "1", "skipped fp16 step fails loudly", True, short(e)[:120])


class _Recording:
    """A backend that records what its measurers report (the engine builds its measurer itself)."""

    def __init__(self, backend):
        self.backend, self.measurements, self.measurer_ = backend, [], None

    def info(self):
        return self.backend.info()

    def measurer(self, workload):
        inner = self.backend.measurer(workload)
        self.measurer_ = inner
        self.warm_outside = self.backend.info().outside_bytes
        rec = self

        class Measure:
            setup_seconds = inner.setup_seconds

            @property
            def outside_bytes(self):
                return inner.outside_bytes

            def __call__(self, batch):
                m = inner(batch)
                rec.measurements.append((batch, m))
                return m

        return Measure()


def check_outside(torch, backend, fraction, steps, deadline, results) -> None:
    """Item 2: memory outside the allocator read after every probe; the answer fits the budget recomputed
    with the most seen, and trains within fraction x total."""
    from orchestrator import engine

    wl = _workload("torchvision:resnet50", 224, precision="fp16", cudnn_benchmark=True)
    rec = _Recording(backend)
    r = engine.decide_on(rec, wl, fraction, max_batch=CHECK_MAX_BATCH)
    d, total = r.decision, r.device.total_bytes
    most = max([rec.warm_outside, rec.measurer_.outside_bytes] + [m.outside_bytes for _, m in rec.measurements])
    fits = d.status == "ok" and d.peak_bytes + r.device.outside_bytes <= fraction * total
    rec.measurer_ = None
    gc.collect()
    torch.cuda.empty_cache()
    trained = train_steps(torch, wl, d.batch_size, steps, fraction, deadline, backend.device) if fits else {}
    passed = fits and r.device.outside_bytes >= most and trained.get("pass", False)
    check(results, "2", "outside memory read after every probe", passed,
          f"outside after warm-up {mib(rec.warm_outside)} MiB, most seen {mib(most)} MiB, row says "
          f"{mib(r.device.outside_bytes)} MiB; answer {d.batch_size} peak {mib(d.peak_bytes)} + outside <= "
          f"{fraction} x total: {fits}; {trained.get('steps_done', 0)} steps at it, whole-device peak "
          f"{mib(trained.get('whole_peak_est_bytes'))} MiB <= {mib(fraction * total)}: {trained.get('pass')}")


def check_swallowed(torch, backend, results) -> None:
    """Item 3: out-of-memory caught inside the step is out of memory; with cudnn.benchmark it is logged."""
    from orchestrator import decision

    for bench in (False, True):
        m = backend.measurer(_workload("benchmarks.calibrate_cuda:swallows_oom_from_8", precision="fp32",
                                       cudnn_benchmark=bench, val_scale=0))
        d = decision.decide(lambda b: m(b).reserved_bytes, int(0.8 * torch.cuda.mem_get_info(backend.device)[1]),
                            max_batch=16)
        if not bench:
            oom8 = [p for p in d.probes if p.batch == 8 and p.oom]
            check(results, "3", "OOM caught inside the step counts", d.batch_size == 7 and bool(oom8),
                  f"answer {d.batch_size} (expected 7); probes {probes_text(d.probes)}; "
                  f"{oom8[0].oom_message[:90] if oom8 else 'batch 8 was not out of memory'}")
        else:
            check(results, "3", "with cudnn.benchmark caught OOMs are logged", d.batch_size == 16 and m.caught_ooms > 0,
                  f"answer {d.batch_size} (expected 16), {m.caught_ooms} caught allocation failures logged")
        m = None  # the model goes before the next one is built
        gc.collect()
        torch.cuda.empty_cache()


def check_deterministic(torch, backend, results) -> None:
    """Item 7: each probe runs with the workload's determinism and cuBLAS workspace; the process's own
    settings come back afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    props = torch.cuda.get_device_properties(backend.device)
    # torch's default without CUBLAS_WORKSPACE_CONFIG: ":4096:2:16:8", 32 MiB on sm_90
    default = 4096 * 8 * 1024 if (props.major, props.minor) == (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8
    seen = importlib.import_module("benchmarks.calibrate_cuda").SEEN  # the factory's module, not __main__
    for det in (True, False):
        m = backend.measurer(_workload("benchmarks.calibrate_cuda:records_settings", 32, precision="fp32",
                                       deterministic=det))
        torch.cuda.synchronize(backend.device)
        torch._C._cuda_clearCublasWorkspaces()  # so that the probe's first matmul allocates one we can see
        seen.clear()
        m(4)
        first = seen[0] if seen else {}
        want = {"deterministic": det, "cudnn_deterministic": det, "cublas": ":4096:8" if det else None,
                "workspace": 4096 * 8 * 1024 if det else default}
        got = {k: first.get(k) for k in want}
        check(results, "7", f"deterministic={det} applied in the step", got == want, f"saw {got}, want {want}")
        m = None  # the model goes before the next one is built
        gc.collect()
        torch.cuda.empty_cache()
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    check(results, "7", "process settings restored", after == before, f"before {before}, after {after}")
    from orchestrator import engine

    answers = {}
    for det in (True, False):
        r = engine.decide_on(backend, _workload("torchvision:resnet18", 224, deterministic=det), 0.8,
                             max_batch=CHECK_MAX_BATCH)
        answers[det] = f"{r.decision.batch_size} (peak {mib(r.decision.peak_bytes)} MiB)"
        gc.collect()
        torch.cuda.empty_cache()
    say(f"  item 7 info: resnet18@224 fp16 answers deterministic {answers[True]}, not {answers[False]}")


def run_checks(torch, backend, args, clock) -> list[dict]:
    """Items 1, 2, 3 and 7 of issue 12 on this card: one PASS/FAIL line each (an exception is a FAIL)."""
    results: list[dict] = []
    for item, fn, fn_args in (("1", check_weights, ()), ("3", check_swallowed, ()), ("7", check_deterministic, ()),
                              ("2", check_outside, (args.fraction, 5, clock.end))):
        t0 = time.perf_counter()
        try:
            fn(torch, backend, *fn_args, results)
        except Exception as e:  # noqa: BLE001 -- a check that cannot run failed
            check(results, item, "ran", False, short(e))
        gc.collect()
        torch.cuda.empty_cache()
        log(f"[check] item {item} in {time.perf_counter() - t0:.1f}s")
    failed = [r for r in results if not r["pass"]]
    say(f"checks: {len(results) - len(failed)} PASS, {len(failed)} FAIL"
        + (f" ({', '.join(sorted({r['item'] for r in failed}))})" if failed else ""))
    return results


# --------------------------------------------------------------------------- tables

def print_matrix(rows: list[dict]) -> None:
    head = (f"{'model':<32} {'px':>4} {'prec':<4} {'opt':<5} {'b':>4} | {'real alloc':>10} {'sim alloc':>10} {'err%':>6} |"
            f" {'real resv':>10} {'sim resv':>10} {'err%':>6} | {'real dev':>10} {'sim dev':>10} {'err%':>6} | status")
    say("\nCalibration, MiB (real = measured on the card, sim = simulated backend; err% = (sim - real) / real)")
    say(head)
    say("-" * len(head))
    for r in rows:
        status = r.get("real_status", "") or "-"
        if r.get("sim_status") not in (None, "", "ok"):
            status += f"/sim:{r['sim_status']}"
        say(f"{r['model'].split(':', 1)[1][:32]:<32} {r['imgsz']:>4} {r['precision']:<4} {r['optimizer']:<5} {r['batch']:>4} |"
            f" {mib(r.get('real_alloc_bytes')):>10} {mib(r.get('sim_alloc_bytes')):>10} {str(r.get('err_alloc_pct', '')):>6} |"
            f" {mib(r.get('real_reserved_bytes')):>10} {mib(r.get('sim_reserved_bytes')):>10}"
            f" {str(r.get('err_reserved_pct', '')):>6} |"
            f" {mib(r.get('real_device_peak_est_bytes')):>10} {mib(r.get('sim_device_bytes')):>10}"
            f" {str(r.get('err_device_pct', '')):>6} | {status}")
    errs = [abs(r["err_reserved_pct"]) for r in rows if r.get("err_reserved_pct") not in (None, "")]
    if errs:
        within = sum(e <= 5.0 for e in errs)
        say(f"reserved: {within}/{len(errs)} configurations within 5% of real; worst {max(errs):.1f}%, "
            f"median {sorted(errs)[len(errs) // 2]:.1f}%")


def print_decisions(rows: list[dict]) -> None:
    if not rows:
        return
    say("\nDecisions on the real card, then training at the chosen batch (MiB)")
    head = (f"{'workload':<44} {'source':<8} {'batch':>6} {'sim b':>6} {'steps':>5} {'max resv':>10} "
            f"{'whole peak':>10} {'limit':>10} pass")
    say(head)
    say("-" * len(head))
    for r in rows:
        wl = f"{r['model'].split(':', 1)[1]}@{r['imgsz']} {r['precision']} {r['optimizer']}"
        steps = f"{r.get('steps_done', '')}/{r.get('steps', '')}" if r.get("steps") else "-"
        say(f"{wl:<44} {r['source']:<8} {str(r.get('batch', '')):>6} {str(r.get('sim_batch', '')):>6} {steps:>5} "
            f"{mib(r.get('train_max_reserved_bytes')):>10} {mib(r.get('whole_peak_est_bytes')):>10} "
            f"{mib(r.get('limit_bytes')):>10} {r.get('pass', '')} {r.get('train_status', '') or ''} {r.get('msg', '') or ''}")


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer configurations (batches 1/8/32, 2 configs, 1 decision)")
    p.add_argument("--checks-only", action="store_true",
                   help="only issue 12's pass/fail checks (items 1, 2, 3, 7; about a minute on a card)")
    p.add_argument("--budget-s", type=float, default=420.0, help="time budget for the whole run (default 420)")
    p.add_argument("--decision-reserve-s", type=float, default=None,
                   help="seconds of the budget kept for the decisions (default 200, --quick 80)")
    p.add_argument("--card", help="catalog card to simulate (default: the catalog entry matching the real card)")
    p.add_argument("--simulate-only", metavar="CARD", help="run only the simulated half for catalog CARD (no GPU)")
    p.add_argument("--fraction", type=float, default=0.8, help="decision budget: share of the card (default 0.8)")
    p.add_argument("--max-batch", type=int, default=4096, help="decision cap (default 4096)")
    p.add_argument("--steps", type=int, default=20, help="training steps at the chosen batch (default 20)")
    p.add_argument("--models", help="comma-separated subset of the matrix's models (substring match)")
    p.add_argument("--jobs", type=int, default=None,
                   help="CPU worker processes for the simulated half (default min(5, cores - 2); 0 = inline)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="where the CSVs go")
    return p.parse_args(argv)


def main(argv=None) -> int:
    t_start = time.monotonic()
    args = parse_args(argv)
    clock = Clock(args.budget_s, t_start)
    import torch

    if not args.simulate_only and not torch.cuda.is_available():
        print("calibrate_cuda: no CUDA device available (torch.cuda.is_available() is False); "
              "run this on a GPU machine, or use --simulate-only CARD for the simulated half", file=sys.stderr)
        return 2

    from orchestrator import catalog

    models = [(m, s, QUICK_BATCHES if args.quick else b) for m, s, b in FULL_MODELS]
    if args.models:
        wanted = [w.strip() for w in args.models.split(",") if w.strip()]
        models = [t for t in models if any(w in t[0] for w in wanted)]
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    decisions = [d for d in (QUICK_DECISIONS if args.quick else FULL_DECISIONS) if any(d[0] == m[0] for m in models)]
    reserve = args.decision_reserve_s if args.decision_reserve_s is not None else (80.0 if args.quick else 200.0)
    if not decisions:
        reserve = 0.0
    jobs = args.jobs if args.jobs is not None else max(0, min(5, (os.cpu_count() or 1) - 2))
    out_dir = Path(args.out_dir)

    if args.simulate_only:
        try:
            card = catalog.card(args.simulate_only)
        except ValueError as e:
            print(f"calibrate_cuda: {e}", file=sys.stderr)
            return 2
        return run_simulate_only(args, clock, card, models, configs, decisions, jobs, out_dir)

    # start the CPU half first, before this process initialises CUDA
    sim = SimRunner(models, configs, 0 if args.checks_only else jobs)
    try:
        return run_cuda(args, clock, torch, sim, models, configs, decisions, reserve, out_dir)
    finally:
        sim.close()


def _base_row(card_key, gpu_name, total, model, imgsz, prec, opt, batch=None) -> dict:
    r = {"card": card_key, "gpu_name": gpu_name, "total_bytes": total, "model": model, "imgsz": imgsz,
         "precision": prec, "optimizer": opt, "ema": True}
    if batch is not None:
        r["batch"] = batch
    return r


def _fill_sim(row: dict, card, sim_result, batch: int) -> None:
    status, payload, _ = sim_result
    row["sim_card"] = card.key
    if status != "ok":
        row.update(sim_status=status, sim_msg=payload)
        return
    try:
        row.update(simulate_row(card, payload, batch))
    except Exception as e:  # noqa: BLE001
        row.update(sim_status="error", sim_msg=short(e))
    row["err_alloc_pct"] = pct(row.get("sim_alloc_bytes"), row.get("real_alloc_bytes"))
    row["err_reserved_pct"] = pct(row.get("sim_reserved_bytes"), row.get("real_reserved_bytes"))
    row["err_device_pct"] = pct(row.get("sim_device_bytes"), row.get("real_device_peak_est_bytes"))


def run_simulate_only(args, clock, card, models, configs, decisions, jobs, out_dir) -> int:
    import torch

    log(f"[sim-only] card {card.key} ({card.name}, {card.total_bytes / GiB:.2f} GiB, context "
        f"{card.context_bytes / MiB:.0f} MiB, workspace {card.workspace_bytes / MiB:.0f} MiB); "
        f"{len(models)} models x {len(configs)} configs; jobs={jobs}; torch {torch.__version__}")
    sim = SimRunner(models, configs, jobs)
    try:
        if jobs > 0:
            sim.collect(clock.left())
        else:
            sim.run_inline(clock)
    finally:
        sim.close()
    rows, drows = [], []
    for model, imgsz, batches in models:
        for prec, opt in configs:
            res = sim.get(model, (prec, opt))
            if res[0] == "ok":
                log(f"[sim] {model}@{imgsz} {prec} {opt}: profile in {res[2]:.1f}s "
                    f"({'affine' if res[1].affine else 'traced per batch'})")
            for b in batches:
                row = _base_row(card.key, card.name, card.total_bytes, model, imgsz, prec, opt, b)
                _fill_sim(row, card, res, b)
                rows.append(row)
    for model, imgsz, prec, opt in decisions:
        row = _base_row(card.key, card.name, card.total_bytes, model, imgsz, prec, opt)
        row.update(fraction=args.fraction, source="sim")
        res = sim.get(model, (prec, opt))
        if res[0] == "ok":
            try:
                t0 = time.perf_counter()
                row.update(sim_decision(card, res[1], args.fraction, args.max_batch))
                row["batch"] = row["sim_batch"]
                row["decision_status"] = row.pop("sim_status")
                row["decision_s"] = round(time.perf_counter() - t0, 2)
            except Exception as e:  # noqa: BLE001
                row["msg"] = short(e)
        else:
            row["msg"] = f"{res[0]}: {res[1]}"
        drows.append(row)
    key = slug(card.key)
    write_csv(out_dir / f"calibration_{key}_simulated.csv", MATRIX_FIELDS, rows)
    write_csv(out_dir / f"calibration_decisions_{key}_simulated.csv", DECISION_FIELDS, drows)
    print_matrix(rows)
    print_decisions(drows)
    say(f"\nwrote {out_dir}/calibration_{key}_simulated.csv and calibration_decisions_{key}_simulated.csv "
        f"in {clock.elapsed():.0f}s")
    bad = [r for r in rows if r.get("sim_status") not in ("ok", "oom")]  # out of memory is a measurement
    return 1 if bad else 0


def run_cuda(args, clock, torch, sim, models, configs, decisions, reserve, out_dir) -> int:
    from orchestrator import catalog, engine
    from orchestrator.cuda import CudaBackend
    from orchestrator.spec import Workload

    info = card_info(torch, args)
    total = info["total_bytes"]
    log(f"[card] {info['name']} cc {info['capability']}, total {total / GiB:.2f} GiB, driver {info.get('driver')}, "
        f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}")
    for k in ("after_init", "after_first_alloc", "after_matmul_fp32", "after_matmul_fp16", "after_conv_fwd_bwd",
              "after_conv_fp16", "at_rest"):
        u = info[k]
        log(f"[card] {k:<20} used {mib(u['used']):>9} MiB  reserved {mib(u['reserved']):>8}  "
            f"allocated {mib(u['allocated']):>8}  outside {mib(u['used'] - u['reserved']):>8}")
    if "nvml_used_before_init_bytes" in info:
        log(f"[card] NVML used before CUDA init: {mib(info['nvml_used_before_init_bytes'])} MiB")
    if args.card:
        card = catalog.card(args.card)
        source = "--card"
    else:
        card = catalog.by_device_name(info["name"], total)
        source = "catalog match"
        if card is None:  # an uncatalogued card: simulate it with its measured constants
            card = catalog.Card("adhoc-" + slug(info["name"]), info["name"], total,
                                tuple(int(x) for x in info["capability"].split(".")),
                                max(0, info["outside_bytes_at_rest"]), info["workspace_allocated_bytes"] or 8 * MiB,
                                sold_gb=round(total / 1e9))
            source = "not in catalog: ad-hoc card from measured context/workspace"
    info["sim_card"] = {"key": card.key, "source": source, "total_bytes": card.total_bytes,
                        "context_bytes": card.context_bytes, "workspace_bytes": card.workspace_bytes}
    log(f"[card] simulating as {card.key} ({source}): context {mib(card.context_bytes)} MiB "
        f"(measured outside at rest {mib(info['outside_bytes_at_rest'])}), workspace {mib(card.workspace_bytes)} MiB "
        f"(measured {mib(info['workspace_allocated_bytes'])})")
    key = slug(card.key if source == "catalog match" else info["name"])
    paths = {"matrix": out_dir / f"calibration_{key}.csv", "dec": out_dir / f"calibration_decisions_{key}.csv",
             "card": out_dir / f"calibration_card_{key}.json"}
    write_json(paths["card"], info)

    # ---- issue 12's checks first: one run on a card settles them even if the budget runs out later
    backend = CudaBackend()  # the current device
    info["checks"] = run_checks(torch, backend, args, clock)
    write_json(paths["card"], info)
    checks_failed = any(not c["pass"] for c in info["checks"])
    if args.checks_only:
        say(f"wrote {paths['card']} in {clock.elapsed():.0f}s")
        return 1 if checks_failed else 0

    dev = backend.device
    gpu_name = info["name"]
    cal_end = clock.end - reserve
    rows: list[dict] = []

    def flush():
        write_csv(paths["matrix"], MATRIX_FIELDS, rows)

    # ---- real matrix, model-major, each model a fair slice of the time; a fresh model per configuration
    # (the backend's measurer builds it and runs one unmeasured warm-up step, as the engine does)
    for mi, (model, imgsz, batches) in enumerate(models):
        slice_end = time.monotonic() + clock.left(cal_end) / (len(models) - mi)
        for prec, opt in configs:
            wl = Workload(model=model, imgsz=imgsz, precision=prec, optimizer=opt)
            measure, build_msg = None, "skipped: time budget"
            if time.monotonic() <= slice_end:
                try:
                    measure = backend.measurer(wl)
                except Exception as e:  # noqa: BLE001
                    build_msg = f"build: {short(e)}"
            note = measure.built.loss_note if measure else ""
            failed_at = None
            for b in batches:
                row = _base_row(card.key, gpu_name, total, model, imgsz, prec, opt, b)
                row.update(loss_note=note, torch=info["torch"], cuda=info["cuda"], cudnn=info["cudnn"])
                if measure is None:
                    row.update(real_status="skipped" if "budget" in build_msg else "error", real_msg=build_msg)
                elif failed_at is not None:
                    row.update(real_status="skipped", real_msg=f"batch {failed_at} failed")
                elif time.monotonic() > slice_end:
                    row.update(real_status="skipped", real_msg="time budget")
                else:
                    row.update(real_step(torch, measure, b, dev))
                    if row["real_status"] != "ok":
                        failed_at = b
                    log(f"[real] {model}@{imgsz} {prec} {opt} b={b}: {row['real_status']} "
                        f"alloc {mib(row.get('real_alloc_bytes'))} resv {mib(row.get('real_reserved_bytes'))} "
                        f"outside {mib(row.get('real_outside_bytes'))} MiB ({row.get('real_step_s')}s)"
                        + (f" {row.get('real_msg')}" if row.get("real_msg") else ""))
                rows.append(row)
            flush()
            del measure
            gc.collect()
            torch.cuda.empty_cache()

    # ---- simulated half: worker results (they ran alongside), or inline now
    if sim.pool is not None:
        sim.collect(max(clock.left(cal_end), 0.0) + 15.0)
    else:
        sim.run_inline(clock, cal_end + 30.0)
    for row in rows:
        res = sim.get(row["model"], (row["precision"], row["optimizer"]))
        _fill_sim(row, card, res, row["batch"])
    flush()
    log(f"[sim] profiles ready for {len(sim.results)}/{len(models)} models at {clock.elapsed():.0f}s")

    # ---- decisions on the real card, then train at the chosen batch
    drows: list[dict] = []
    for model, imgsz, prec, opt in decisions:
        wl = Workload(model=model, imgsz=imgsz, precision=prec, optimizer=opt)
        row = _base_row(card.key, gpu_name, total, model, imgsz, prec, opt)
        row.update(fraction=args.fraction, source="real")
        res = sim.get(model, (prec, opt))
        if res[0] == "ok":
            try:
                row.update(sim_decision(card, res[1], args.fraction, args.max_batch))
                row.pop("sim_status", None)
            except Exception as e:  # noqa: BLE001
                row["msg"] = f"sim decision: {short(e)}"
        if clock.left() < 30:
            row.update(decision_status="skipped", msg="time budget")
            drows.append(row)
            write_csv(paths["dec"], DECISION_FIELDS, drows)
            continue
        log(f"[decide] {wl.label()} on {gpu_name}, fraction {args.fraction} ...")
        try:
            result = engine.decide_on(backend, wl, args.fraction, max_batch=args.max_batch)
            d = result.decision
            row.update(batch=d.batch_size, decision_status=d.status, decision_clamped=d.clamped,
                       decision_peak_bytes=d.peak_bytes, budget_bytes=d.budget_bytes,
                       outside_bytes_at_decision=result.device.outside_bytes, measurements=d.measurements,
                       probes=probes_text(d.probes), decision_s=round(result.seconds, 1))
            del result
        except Exception as e:  # noqa: BLE001
            row.update(decision_status="error", msg=short(e))
        gc.collect()
        torch.cuda.empty_cache()
        log(f"[decide] -> batch {row.get('batch')} ({row.get('decision_status')}) in {row.get('decision_s')}s; "
            f"probes {row.get('probes')}; simulated card chose {row.get('sim_batch')}")
        if row.get("decision_status") == "ok" and row.get("batch"):
            row.update(train_steps(torch, wl, row["batch"], args.steps, args.fraction, clock.end, dev))
            log(f"[train] {row['steps_done']}/{args.steps} steps at {row['batch']}: {row['train_status']}, "
                f"whole-device peak {mib(row['whole_peak_est_bytes'])} MiB <= {mib(row['limit_bytes'])}? "
                f"{row['within_fraction']}")
        drows.append(row)
        write_csv(paths["dec"], DECISION_FIELDS, drows)
    # time allowing: does the batch the simulated card chose train on the real card within the fraction?
    for real_row in list(drows):
        sb = real_row.get("sim_batch")
        if not sb or sb == real_row.get("batch") or real_row.get("decision_status") == "skipped":
            continue
        mean = real_row.get("step_s_mean") or 1.0
        if clock.left() < 15 + args.steps * float(mean) * 1.5:
            continue
        wl = Workload(model=real_row["model"], imgsz=real_row["imgsz"], precision=real_row["precision"], optimizer=real_row["optimizer"])
        row = _base_row(card.key, gpu_name, total, wl.model, wl.imgsz, wl.precision, wl.optimizer)
        row.update(fraction=args.fraction, source="sim", batch=sb, sim_batch=sb,
                   sim_peak_bytes=real_row.get("sim_peak_bytes"), sim_probes=real_row.get("sim_probes"))
        row.update(train_steps(torch, wl, sb, args.steps, args.fraction, clock.end, dev))
        log(f"[train] simulated choice {sb} for {wl.label()}: {row['steps_done']}/{args.steps} steps, "
            f"{row['train_status']}, whole-device peak {mib(row['whole_peak_est_bytes'])} MiB")
        drows.append(row)
        write_csv(paths["dec"], DECISION_FIELDS, drows)

    # late simulated profiles (workers still running during the decisions)
    if sim.pending:
        sim.collect(0.5)
        for row in rows:
            if row.get("sim_status") in (None, "", "skipped"):
                _fill_sim(row, card, sim.get(row["model"], (row["precision"], row["optimizer"])), row["batch"])
        flush()
    write_csv(paths["dec"], DECISION_FIELDS, drows)
    info["elapsed_s"] = round(clock.elapsed(), 1)
    write_json(paths["card"], info)
    print_matrix(rows)
    print_decisions(drows)
    outside = sorted(r["real_outside_bytes"] for r in rows if r.get("real_outside_bytes") not in (None, ""))
    if outside:
        say(f"\noutside the allocator after steps: median {mib(outside[len(outside) // 2])} MiB, "
            f"max {mib(outside[-1])} MiB (catalog context {mib(card.context_bytes)} MiB); "
            f"workspace held at rest {mib(info['workspace_allocated_bytes'])} MiB "
            f"(catalog {mib(card.workspace_bytes)} MiB)")
    say(f"wrote {paths['matrix']}, {paths['dec']}, {paths['card']} in {clock.elapsed():.0f}s")
    failed = [r for r in drows if r.get("source") == "real" and r.get("decision_status") == "ok" and not r.get("pass")]
    return 1 if failed or checks_failed else 0


if __name__ == "__main__":
    sys.exit(main())
