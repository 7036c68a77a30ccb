"""Device backends: the one seam between the decision and the hardware.

A backend names its device, says how many bytes it has and how many are used
outside our allocator, and measures a workload's training step at a batch size
(peak bytes reserved, or ``OutOfMemory``). Only this module touches ``torch.cuda``.
"""
from __future__ import annotations

import gc
import logging
import socket
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from . import allocator, catalog, models, simulated, step
from .decision import OutOfMemory
from .spec import Workload
from .units import GiB

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
    cuda: str = ""
    torch: str = torch.__version__
    host: str = ""
    card: str = ""  # catalog key, when known
    pid: int = 0  # the process that owns the device (a Ray actor in a sweep)
    node: str = ""  # Ray node id, in a sweep

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
    """Replays a profile's trace at each batch through the allocator model of one card."""

    def __init__(self, prof: simulated.Profile, card: catalog.Card):
        self.prof, self.card = prof, card
        self.capacity = card.total_bytes - card.context_bytes

    @property
    def setup_seconds(self) -> float:
        return self.prof.trace_seconds

    def __call__(self, batch: int) -> Measurement:
        # the cuBLAS workspace is allocated through the caching allocator on first matmul
        try:
            stats = allocator.replay(self.prof.events(batch), self.capacity, held=[self.card.workspace_bytes])
        except allocator.AllocatorOutOfMemory as e:
            raise OutOfMemory(f"simulated {self.card.key}: {e}") from None
        val = stats.phase_peaks[1] if len(stats.phase_peaks) > 1 else 0
        return Measurement(stats.peak_reserved, stats.peak_allocated, self.card.context_bytes, val)


class CudaBackend:
    """A real CUDA device, measured with torch.cuda's allocator statistics."""

    def __init__(self, index: int | None = None):
        """``index`` None: this process's current device (``torch.cuda.current_device()``, which a
        launcher sets per rank), so that rank k measures its own card and leaves no context on GPU 0."""
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available: use a simulated card (--gpu T4) or run on a GPU machine")
        torch.cuda.init()
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)

    def info(self) -> DeviceInfo:
        props = torch.cuda.get_device_properties(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside = total - free - torch.cuda.memory_reserved(self.device)
        return DeviceInfo(
            name=props.name, total_bytes=total, outside_bytes=outside, backend="cuda",
            capability=f"{props.major}.{props.minor}", driver=_driver_version(), cuda=torch.version.cuda or "",
            host=socket.gethostname(), card=getattr(catalog.by_device_name(props.name, total), "key", ""),
        )

    def measurer(self, workload: Workload) -> Measurer:
        """Build the model on the device and run one unmeasured step at batch 1 (see ``_CudaMeasurer``)."""
        return _CudaMeasurer(self, workload)


class _CudaMeasurer:
    """Measures ``step.train`` on a CUDA device with the allocator's peak statistics.

    Construction builds the model on the device and runs one unmeasured step at
    batch 1: that loads cuDNN/cuBLAS kernels, which grows the CUDA context, so that
    ``info()`` read afterwards counts it in ``outside_bytes``.
    """

    def __init__(self, backend: CudaBackend, workload: Workload):
        t0 = time.perf_counter()
        self.device, self.workload = backend.device, workload
        self.built = models.build(workload)
        self.built.module.to(self.device)
        try:
            self(1)
        except OutOfMemory:
            pass  # the decision's own batch-1 probe will say no-fit
        self.setup_seconds = time.perf_counter() - t0

    def __call__(self, batch: int) -> Measurement:
        device = self.device
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.workload.cudnn_benchmark
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            train_peaks = []

            def mark():  # training ends, validation starts: keep training's peaks, measure validation's alone
                torch.cuda.synchronize(device)
                train_peaks[:] = [torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)]
                torch.cuda.reset_peak_memory_stats(device)

            step.train(self.built, self.workload, batch, device, mark=mark)
            torch.cuda.synchronize(device)
            free, total = torch.cuda.mem_get_info(device)
            reserved, allocated = torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)
            val = reserved if train_peaks else 0
            reserved, allocated = max([reserved] + train_peaks[:1]), max([allocated] + train_peaks[1:])
            return Measurement(reserved, allocated, total - free - torch.cuda.memory_reserved(device), val)
        except Exception as e:
            if not step.is_oom(e):
                raise
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            torch.backends.cudnn.benchmark = previous
            gc.collect()
            torch.cuda.empty_cache()
        # raised outside the except block so the traceback (and the tensors its frames hold) is gone
        raise OutOfMemory(msg)


def _driver_version() -> str:
    try:
        import pynvml  # shipped by nvidia-ml-py, which ray[default] installs

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # the driver version is informational only
        return ""


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_backend(gpu: str | None = None, index: int | None = None) -> Backend:
    """A simulated backend for a catalog name, else the real CUDA device ``index`` (None: the current one)."""
    if gpu:
        return SimulatedBackend(gpu)
    return CudaBackend(index)

