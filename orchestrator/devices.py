"""Device backends: the one seam between the decision and the hardware.

A backend names its device, says how many bytes it has and how many are used
outside our allocator, and measures a workload's training step at a batch size
(peak bytes reserved, or ``OutOfMemory``). Only this module touches ``torch.cuda``.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import re
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from . import allocator, catalog, cudacost, ddp, models, simulated, step
from . import decision as core
from .decision import OutOfMemory
from .spec import Workload
from .units import GiB, MiB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """What a device reports about itself (plain data: it crosses Ray's wire)."""

    name: str
    total_bytes: int
    outside_bytes: int
    """Used outside our allocator: the CUDA context, other processes."""
    backend: str  # "cuda" | "simulated"
    capability: str = ""
    driver: str = ""
    """The NVIDIA driver and the newest CUDA it supports (NVML), e.g. ``550.54.15 (CUDA 12.4)``."""
    cuda: str = ""
    """The CUDA version torch was built with (``torch.version.cuda``), not the driver's (see ``driver``)."""
    torch: str = torch.__version__
    host: str = ""
    card: str = ""  # catalog key, when known
    pid: int = 0  # the process that owns the device (a Ray actor in a sweep)
    node: str = ""  # Ray node id, in a sweep
    uuid: str = ""
    """The device's UUID as NVML names it (``GPU-...``; ``MIG-...`` for a MIG slice), when known."""
    mig: str = ""
    """The MIG profile (``3g.20gb``) when the device is a MIG slice, which is a device type of its own."""
    neighbours: int = 0
    """Other processes using the device when it was read (NVML)."""
    neighbour_bytes: int = 0
    """Device memory those processes held: part of ``outside_bytes``, so the budget is what they left."""

    def budget_bytes(self, fraction: float) -> int:
        """Bytes our allocator may reserve so that whole-device usage stays <= fraction x total."""
        return int(fraction * self.total_bytes) - self.outside_bytes

    @property
    def type_key(self) -> tuple[str, int]:
        """Devices of one type share name and total memory rounded to whole GiB."""
        return (self.name, round(self.total_bytes / GiB))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Measurement:
    """One measured training step (bytes)."""

    reserved_bytes: int
    """Peak reserved by the caching allocator during the step, validation included: what decides whether it fits."""
    allocated_bytes: int
    """Peak held by live tensors during the step (reserved less the allocator's cache and rounding)."""
    outside_bytes: int
    """Device memory used outside the allocator after the step (CUDA context, kernels, other processes)."""
    val_reserved_bytes: int = 0
    """Peak reserved during the validation pass (0: the workload has none)."""


class Measurer(Protocol):
    """Measures one workload's training step at a batch size; raises ``OutOfMemory`` when it does not fit."""

    setup_seconds: float
    """Time spent preparing: simulated, tracing the workload (shared by every card); CUDA, build and warm-up."""
    outside_bytes: int
    """The most device memory seen outside the allocator after any probe so far: it grows as kernels load."""

    def __call__(self, batch: int) -> Measurement: ...


class Backend(Protocol):
    """The seam between the decision and the hardware: ``SimulatedBackend`` or ``CudaBackend``."""

    def info(self) -> DeviceInfo: ...

    def measurer(self, workload: Workload) -> Measurer: ...


class SimulatedBackend:
    """A catalog card, measured by fake-tensor traces replayed through the allocator model."""

    def __init__(self, card_key: str):
        self.card = catalog.card(card_key)
        self._profiles: dict[Workload, simulated.Profile] = {}

    def info(self) -> DeviceInfo:
        c = self.card
        return DeviceInfo(
            name=c.name, total_bytes=c.total_bytes, outside_bytes=c.context_bytes, backend="simulated",
            capability=f"{c.capability[0]}.{c.capability[1]}", host=socket.gethostname(), card=c.key,
        )

    def add_profile(self, prof: simulated.Profile) -> None:
        """Reuse traces made elsewhere (another actor, another card): they are card-independent."""
        self._profiles[prof.workload] = prof

    def profile(self, workload: Workload) -> simulated.Profile:
        if workload not in self._profiles:
            self._profiles[workload] = simulated.profile(workload)
        return self._profiles[workload]

    def measurer(self, workload: Workload) -> Measurer:
        return _SimulatedMeasurer(self.profile(workload), self.card)


class _SimulatedMeasurer:
    """Replays a profile's trace at each batch through the allocator model of one card.

    Outside the allocator: the card's CUDA context and, under DDP, NCCL's communicator for the
    workload's ranks (``ddp.comm_bytes``); the trace holds the reducer's buckets (``step.ReducerSurrogate``)."""

    def __init__(self, prof: simulated.Profile, card: catalog.Card, outside_bytes: int | None = None):
        """``outside_bytes``: what a real device reported instead (a prediction for it: NCCL included)."""
        self.prof, self.card = prof, card
        self.outside_bytes = (card.context_bytes + ddp.comm_bytes(prof.workload.world_size, card.nccl_channels)
                              if outside_bytes is None else outside_bytes)
        self.capacity = card.total_bytes - self.outside_bytes

    @property
    def setup_seconds(self) -> float:
        return self.prof.trace_seconds

    def __call__(self, batch: int) -> Measurement:
        # a profile with CUDA's costs holds its cuBLAS workspaces itself (cudacost); one without gets the card's
        held = [] if self.prof.cuda_costs else [self.card.workspace_bytes]
        return replay_run(self.prof, self.prof.events(batch), self.capacity, self.outside_bytes, held, self.card.key)


def replay_run(prof: simulated.Profile, events: list[int], capacity: int, outside_bytes: int, held=(),
               name: str = "card") -> Measurement:
    """``events`` (a trace of ``prof``) on a card whose allocator may reserve ``capacity``: the peaks a
    training run shows; OutOfMemory when they exceed it. With CUDA's costs, the reserved peaks are those of
    a run's many steps (``cudacost.over_a_run``, fitted)."""
    try:
        stats = allocator.replay(events, capacity, held=held)
    except allocator.AllocatorOutOfMemory as e:
        raise OutOfMemory(f"simulated {name}: {e}") from None
    val = max(stats.phase_peaks[1::2], default=0)  # phases: training, validation, training, ...
    reserved = stats.peak_reserved
    if prof.cuda_costs:
        reserved, val = cudacost.over_a_run(reserved), cudacost.over_a_run(val)
        if reserved > capacity:
            raise OutOfMemory(f"simulated {name}: {reserved} B reserved over a training run "
                              f"({stats.peak_reserved} B in its simulated steps) of {capacity} B")
    return Measurement(reserved, stats.peak_allocated, outside_bytes, val)


GENERIC_WORKSPACE = {9: 32 * MiB}
"""cuBLAS workspace by compute capability's major version, for a card not in the catalog (else 8 MiB)."""


def stand_in(info: DeviceInfo) -> catalog.Card:
    """The card the simulator replays a profile on for a device that reports ``info``: its own total and
    memory outside the allocator, and its catalog entry's workspace (a generic one for an unknown card)."""
    known = catalog.CATALOG.get(info.card) or catalog.by_device_name(info.name, info.total_bytes)
    major = int(info.capability.split(".")[0]) if info.capability[:1].isdigit() else 0
    workspace = known.workspace_bytes if known else GENERIC_WORKSPACE.get(major, 8 * MiB)
    capability = known.capability if known else (major, 0)
    return catalog.Card(key=info.card or info.name, name=info.name, total_bytes=info.total_bytes,
                        capability=capability, context_bytes=info.outside_bytes, workspace_bytes=workspace,
                        sold_gb=known.sold_gb if known else 0,
                        nccl_channels=known.nccl_channels if known else catalog.Card.nccl_channels)


def predict(prof: simulated.Profile, info: DeviceInfo, fraction: float, max_batch: int) -> core.Decision:
    """The simulator's decision for the device that reports ``info`` (see ``stand_in``): milliseconds of
    replays of a profile traced on the CPU, which a real device then verifies (``core.Prior``)."""
    m = _SimulatedMeasurer(prof, stand_in(info), outside_bytes=info.outside_bytes)
    return core.decide(lambda b: m(b).reserved_bytes, info.budget_bytes(fraction), max_batch=max_batch)


def prior_of(prediction: core.Decision | None) -> core.Prior | None:
    """Where a real device's search starts from a prediction; None without one, or when it has no slope
    (a no-fit prediction: the search starts at batch 1, which settles that in one measurement)."""
    if prediction is None or prediction.status != "ok" or not (prediction.bytes_per_sample or 0) > 0:
        return None
    return core.Prior(prediction.batch_size, prediction.bytes_per_sample)


class DeviceFault(RuntimeError):
    """The process's CUDA context is unusable: an illegal memory access, a device-side assert or another
    sticky CUDA error. Every later CUDA call in the process fails the same way; only a new process
    recovers (in a sweep: the actor is replaced and the combination retried once)."""


# cudaGetErrorString's text of CUDA's sticky errors, for a torch older than torch.AcceleratorError
_STICKY_MESSAGES = (
    "an illegal memory access was encountered", "device-side assert triggered", "unspecified launch failure",
    "an illegal instruction was encountered", "misaligned address", "invalid program counter",
    "hardware stack error", "the launch timed out and was terminated", "uncorrectable ecc error encountered",
    "operation not supported on global/shared address space",
)


def device_fault(exc: BaseException) -> DeviceFault | None:
    """``exc`` as a ``DeviceFault`` when it is a CUDA error that poisons the process's context
    (``torch.AcceleratorError`` other than out of memory, or one of CUDA's sticky messages), else None."""
    if isinstance(exc, DeviceFault):
        return exc
    if not isinstance(exc, RuntimeError) or step.oom_kind(exc) is not None:
        return None
    accelerator_error = getattr(torch, "AcceleratorError", ())
    text = str(exc).strip()
    if isinstance(exc, accelerator_error) or any(m in text.lower() for m in _STICKY_MESSAGES):
        return DeviceFault(f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}")
    return None


# -- MIG: a slice of a card is a device of its own

_MIG_NAME = re.compile(r"^(?P<card>.+?)\s+MIG\s+(?P<profile>(?:\d+c\.)?\d+g\.(?P<gb>\d+)gb(?:\+\w+)*)\s*$",
                       re.IGNORECASE)


def parse_mig(name: str) -> tuple[str, str, int] | None:
    """(card, profile, slice GB) for a MIG slice's device name, e.g. ``NVIDIA A100-SXM4-40GB MIG 3g.20gb``
    -> ``("NVIDIA A100-SXM4-40GB", "3g.20gb", 20)``; None for a whole card."""
    m = _MIG_NAME.match(name.strip())
    return (m["card"], m["profile"], int(m["gb"])) if m else None


def mig_profile(name: str, total_bytes: int) -> str:
    """The MIG profile of a device named ``name`` ("" for a whole card), checked against the memory the
    device reports: a slice must never be measured as the whole card; RuntimeError if it would be."""
    mig = parse_mig(name)
    if mig is None:
        return ""
    card, profile, gb = mig
    if total_bytes > 1.25 * gb * 1e9:  # "20gb" slices report about 19.6 GiB
        raise RuntimeError(
            f"{name!r} is a MIG {profile} slice of {card} but reports {total_bytes / GiB:.1f} GiB, the whole "
            f"card's memory: measuring it would answer for memory the slice does not have. Give each Ray "
            "worker one MIG device (CUDA_VISIBLE_DEVICES=MIG-<uuid>) or plan with a simulated fleet")
    return profile


# -- NVML: the driver's view of the device, by UUID (indices differ between NVML and CUDA_VISIBLE_DEVICES)

@functools.cache
def _nvml():
    """pynvml (nvidia-ml-py), initialised; None where there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: NVML facts are reported as unknown
        return None
    return pynvml


def nvml_handle(uuid: str):
    """NVML's handle of the device with ``uuid`` (``GPU-...`` or ``MIG-...``), or None."""
    nvml = _nvml()
    if nvml is None or not uuid:
        return None
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        return None


def nvml_uuid(props) -> str:
    """The NVML UUID of the CUDA device whose ``torch.cuda.get_device_properties`` are ``props``: torch gives
    the bare UUID; NVML prefixes ``GPU-`` for a card and ``MIG-`` for a MIG slice."""
    bare = str(getattr(props, "uuid", "") or "")
    if not bare:
        return ""
    candidates = ("MIG-", "GPU-") if parse_mig(props.name) else ("GPU-", "MIG-")
    known = [p + bare for p in candidates if nvml_handle(p + bare) is not None]
    return (known or [candidates[0] + bare])[0]


def neighbours(uuid: str, own_bytes: int) -> tuple[int, int] | None:
    """(count, bytes) of the other processes using the device ``uuid``, or None when NVML cannot say.

    This process is found by its PID; in a container with its own PID namespace NVML lists host PIDs,
    and this process is taken to be the one whose usage is closest above ``own_bytes`` (what our
    allocator reserves). A process whose usage NVML does not report counts with 0 bytes.
    """
    nvml, handle = _nvml(), nvml_handle(uuid)
    if handle is None:
        return None
    procs = {}
    for listing in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            procs.update({p.pid: p.usedGpuMemory or 0 for p in listing(handle)})
        except Exception:
            continue
    own = os.getpid()
    if own not in procs and procs:
        above = [pid for pid, used in procs.items() if used >= own_bytes] or list(procs)
        own = min(above, key=lambda pid: procs[pid] - own_bytes)
    others = [used for pid, used in procs.items() if pid != own]
    return len(others), sum(others)


def driver_version() -> str:
    """``550.54.15 (CUDA 12.4)``: the driver and the newest CUDA it supports; "" without NVML."""
    nvml = _nvml()
    if nvml is None:
        return ""
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        version = version.decode() if isinstance(version, bytes) else version
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        return f"{version} (CUDA {cuda // 1000}.{cuda % 1000 // 10})"
    except Exception:  # informational only
        return ""


class CudaBackend:
    """A real CUDA device, measured with torch.cuda's allocator statistics."""

    def __init__(self, index: int | None = None):
        """``index`` None: this process's current device (``torch.cuda.current_device()``, which a
        launcher sets per rank), so that rank k measures its own card and leaves no context on GPU 0.
        RuntimeError without CUDA, or for a MIG slice that reports the whole card's memory."""
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available: use a simulated card (--gpu T4) or run on a GPU machine")
        torch.cuda.init()
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        props = torch.cuda.get_device_properties(self.device)
        self.uuid = nvml_uuid(props)
        self.mig = mig_profile(props.name, props.total_memory)
        if self.mig:
            log.info("%s (%s) is a MIG slice: measured as a device type of its own", props.name, self.uuid)

    def info(self) -> DeviceInfo:
        props = torch.cuda.get_device_properties(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        count, near_bytes = neighbours(self.uuid, reserved) or (0, 0)
        return DeviceInfo(
            name=props.name, total_bytes=total, outside_bytes=total - free - reserved, backend="cuda",
            capability=f"{props.major}.{props.minor}", driver=driver_version(), cuda=torch.version.cuda or "",
            host=socket.gethostname(), card=getattr(catalog.by_device_name(props.name, total), "key", ""),
            uuid=self.uuid, mig=self.mig, neighbours=count, neighbour_bytes=near_bytes,
        )

    def measurer(self, workload: Workload) -> Measurer:
        """Build the model on the device and run one unmeasured step at batch 1 (see ``StepMeasurer``).

        Under DDP (``world_size`` > 1) the step runs under the real DistributedDataParallel on a one-rank
        NCCL group (``one_rank_group``): the reducer's buckets are measured, and the communicator's own
        memory with them; the receive buffers for the other ranks, which one process cannot make, are
        added from the model (``other_ranks_bytes``, with the catalog's channels for this card)."""
        props = torch.cuda.get_device_properties(self.device)
        return step_measurer(self.device, workload, CudaCounters(self.device), props.name, props.total_memory)


def other_ranks_bytes(workload: Workload, name: str, total_bytes: int) -> int:
    """Device memory NCCL holds for the other ranks of ``workload``'s DDP job, which one process cannot make:
    their receive buffers (``ddp.peer_bytes``) with the catalog's channels for the card that reports ``name``
    and ``total_bytes`` (the catalog's most for a card it does not know); 0 without DDP."""
    if workload.world_size == 1:
        return 0
    card = catalog.by_device_name(name, total_bytes)
    channels = card.nccl_channels if card else max(c.nccl_channels for c in catalog.CATALOG.values())
    return ddp.peer_bytes(workload.world_size, channels)


def step_measurer(device: torch.device, workload: Workload, counters, name: str, total_bytes: int) -> StepMeasurer:
    """The measurer of ``workload`` on the real ``device`` (a card reporting ``name`` and ``total_bytes``),
    reading ``counters`` (``CudaCounters`` on a GPU): under DDP, on the one-rank group (``one_rank_group``),
    with the other ranks' buffers (``other_ranks_bytes``) added to what the device shows."""
    if workload.world_size > 1:
        one_rank_group(device)
    return StepMeasurer(device, workload, counters, extra_outside_bytes=other_ranks_bytes(workload, name, total_bytes))


def one_rank_group(device: torch.device) -> None:
    """Make this process a one-rank DDP job on ``device`` (NCCL on CUDA, gloo on the CPU), once: the
    measured step then runs the real DistributedDataParallel. A process already in a job of several
    ranks is refused: every probe would be a collective the other ranks do not run."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"this process is rank {dist.get_rank()} of a {dist.get_world_size()}-rank job: a DDP workload is "
                "measured on a one-rank group of its own; measure before init_process_group, or on a simulated "
                "card (gpu='T4')")
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


class CudaCounters:
    """The device's memory counters a ``StepMeasurer`` reads: torch.cuda's allocator statistics,
    ``mem_get_info`` and the allocator's count of failed allocations."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        """Free the cache (a probe starts from the allocator's lowest state) and reset the peaks."""
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def reset_peaks(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> tuple[int, int]:
        """(peak reserved, peak allocated) since the last reset, the device's work finished."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device), torch.cuda.max_memory_allocated(self.device)

    def outside_bytes(self) -> int:
        """Device memory in use that our allocator did not reserve: the context, kernels, other processes."""
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free - torch.cuda.memory_reserved(self.device)

    def ooms(self) -> int:
        """Allocations the caching allocator has failed (raised out of memory for) in this process."""
        return torch.cuda.memory_stats(self.device).get("num_ooms", 0)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


DETERMINISTIC_CUBLAS = ":4096:8"
"""CUBLAS_WORKSPACE_CONFIG in YOLO's deterministic mode (ultralytics ``init_seeds``)."""


@contextlib.contextmanager
def trainer_settings(workload: Workload, device: torch.device):
    """The process-wide settings a trainer makes, as ``workload`` says, for one probe; the previous
    settings afterwards (``autobatch`` may run inside the trainer's own process).

    ``cudnn.benchmark``, and ultralytics' ``init_seeds(deterministic=...)``: with ``deterministic``,
    ``use_deterministic_algorithms(True, warn_only=True)``, ``cudnn.deterministic``, no NaN fill of new
    tensors and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``; without it, none of these. cuBLAS's workspace size
    is read when torch gives a cuBLAS handle its workspace, and torch keeps workspaces for the life of
    the process: when the setting changes, the kept ones are dropped, so the probe's first matmul
    allocates the workload's own (inside the measured step, where the trainer has it too).
    """
    det = workload.deterministic
    fill = getattr(torch.utils, "deterministic", None)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             getattr(fill, "fill_uninitialized_memory", None), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    torch.backends.cudnn.benchmark = workload.cudnn_benchmark
    torch.backends.cudnn.deterministic = det
    torch.use_deterministic_algorithms(det, warn_only=True)
    if fill is not None:
        fill.fill_uninitialized_memory = not det
    _cublas_workspace_config(DETERMINISTIC_CUBLAS if det else None, device)

    def put_back():
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if fill is not None:
            fill.fill_uninitialized_memory = saved[4]
        _cublas_workspace_config(saved[5], device)

    with _cleanup_after(put_back), warnings.catch_warnings():
        # warn_only: each op without a deterministic kernel would warn, in every probe
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
        yield


def _cublas_workspace_config(value: str | None, device: torch.device) -> None:
    """Set CUBLAS_WORKSPACE_CONFIG (None: unset); when it changes, drop torch's cuBLAS workspaces so that
    none is used with a size it was not allocated with."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") == value:
        return
    if value is None:
        del os.environ["CUBLAS_WORKSPACE_CONFIG"]
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = value
    if device.type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch.cuda.synchronize(device)
        torch._C._cuda_clearCublasWorkspaces()


@contextlib.contextmanager
def _cleanup_after(cleanup):
    """Run ``cleanup()`` after the block. When the block raised, the block's error is the one that
    propagates: a sticky CUDA error fails any clean-up on the device too, and would hide the cause."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            cleanup()
        raise
    cleanup()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's parameters and buffers on the host, to put back after each probe."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@torch.no_grad()
def restore(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` back into the module's own tensors (in place: nothing new is allocated)."""
    own = module.state_dict()
    for k, v in state.items():
        own[k].copy_(v)


class StepMeasurer:
    """Measures ``step.train`` on a real device with its memory counters (``CudaCounters`` on a GPU).

    Construction builds a fresh model, keeps a copy of its initial weights and buffers on the host,
    moves it to the device and runs one unmeasured step at batch 1 (kernels load, so the context
    grows before ``info()`` is read). Each probe then:

    - runs with the trainer's process settings (``trainer_settings``: cudnn.benchmark, determinism);
    - starts from the initial weights and puts them back afterwards, whatever happened: ~30 real
      optimizer steps on random data would otherwise move them (fp16 overflows, skipped steps);
    - raises ``OutOfMemory`` when the step ran out of memory, including out-of-memory that code
      inside the step caught and worked around (ultralytics' assigner retries image by image,
      cuDNN tries another plan): the allocator's failure count grew. With ``cudnn_benchmark`` the
      autotuner fails allocations on purpose: those are logged, not counted;
    - a cuDNN failure that may or may not be memory (``step.oom_kind`` "maybe") is out of memory
      when an allocation failed or the batch is above 1; at batch 1 it is tried once more with the
      cache emptied, and failing again it is an error, not ``no-fit``;
    - records memory outside the allocator afterwards (plus ``extra_outside_bytes``, what the process
      cannot see: NCCL's buffers for other ranks under DDP); ``outside_bytes`` keeps the most seen.
    """

    def __init__(self, device: torch.device, workload: Workload, counters: CudaCounters, extra_outside_bytes: int = 0):
        t0 = time.perf_counter()
        self.device, self.workload, self.counters = device, workload, counters
        # device memory outside the allocator that this process cannot see, added to every reading
        # (under DDP: NCCL's receive buffers for the other ranks)
        self.extra_outside_bytes = extra_outside_bytes
        self.built = models.build(workload)
        self.initial = snapshot(self.built.module)
        self.built.module.to(device)
        self.outside_bytes = 0
        self.caught_ooms = 0  # allocations that failed and were caught inside the step with cudnn.benchmark on
        try:
            self(1)
        except OutOfMemory:
            pass  # the decision's own batch-1 probe will say no-fit
        self.setup_seconds = time.perf_counter() - t0

    def __call__(self, batch: int) -> Measurement:
        with trainer_settings(self.workload, self.device):
            with _cleanup_after(self._settle):
                return self._probe(batch, again=batch == 1)

    def _settle(self) -> None:
        self.counters.release()
        self.outside_bytes = max(self.outside_bytes, self.counters.outside_bytes() + self.extra_outside_bytes)

    def _probe(self, batch: int, again: bool) -> Measurement:
        failed_before = self.counters.ooms()
        try:
            measured = self._step(batch)
        except Exception as e:
            kind = step.oom_kind(e)
            if kind is None:
                raise
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        else:
            kind, msg = None, ""
        # from here on outside the except block: the traceback (and the tensors its frames hold) is gone
        caught = self.counters.ooms() - failed_before
        if kind is None:
            if caught and not self.workload.cudnn_benchmark:
                raise OutOfMemory(f"{caught} allocation(s) ran out of memory inside the step at batch {batch} "
                                  "and were caught by the code that made them (a fallback ran instead)")
            if caught:
                self.caught_ooms += caught
                log.info("%s at batch %d: %d allocations failed and were caught inside the step (cudnn.benchmark's "
                         "autotuner tries workspaces that do not fit): not counted", self.workload.label(), batch,
                         caught)
            return measured
        if kind == "maybe" and not caught and batch == 1:
            if again:
                self.counters.release()
                return self._probe(batch, again=False)
            raise RuntimeError(f"{msg} (again at batch 1 with the cache emptied, and no allocation failed: "
                               "an error of this model or library, not out of memory)")
        raise OutOfMemory(msg)

    def _step(self, batch: int) -> Measurement:
        c = self.counters
        c.reset()
        phases: list[tuple[int, int]] = []  # (reserved, allocated) peaks: training, validation, training, ...

        def mark():  # a phase ends (the cache was just emptied): keep its peaks, measure the next alone
            phases.append(c.peaks())
            c.reset_peaks()

        with _cleanup_after(lambda: restore(self.built.module, self.initial)):
            step.train(self.built, self.workload, batch, self.device, mark=mark, epochs=step.run_epochs(self.workload))
            phases.append(c.peaks())
            outside = c.outside_bytes() + self.extra_outside_bytes
        reserved, allocated = max(p[0] for p in phases), max(p[1] for p in phases)
        val = max((p[0] for p in phases[1::2]), default=0)
        return Measurement(reserved, allocated, outside, val)


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_backend(gpu: str | None = None, index: int | None = None) -> Backend:
    """A simulated backend for a catalog name, else the real CUDA device ``index`` (None: the current one)."""
    if gpu:
        return SimulatedBackend(gpu)
    return CudaBackend(index)

