"""Device backends: the one seam between the decision and the hardware.

A backend names its device, says how many bytes it has and how many are used
outside our allocator, and measures a workload's training step at a batch size
(peak bytes reserved, or ``OutOfMemory``). Only this module touches ``torch.cuda``.
"""
from __future__ import annotations

import gc
import logging
import socket
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import allocator, catalog, models, simulated, step
from .autobatch import OutOfMemory
from .spec import Workload

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
        return (self.name, round(self.total_bytes / 2**30))

    def as_dict(self) -> dict:
        return asdict(self)


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

    def measurer(self, workload: Workload) -> Callable[[int], int]:
        prof = self.profile(workload)
        c = self.card
        capacity = c.total_bytes - c.context_bytes

        def measure(batch: int) -> int:
            # the cuBLAS workspace is allocated through the caching allocator on first matmul
            try:
                return allocator.replay(prof.events(batch), capacity, held=[c.workspace_bytes]).peak_reserved
            except allocator.AllocatorOutOfMemory as e:
                raise OutOfMemory(f"simulated {c.key}: {e}") from None

        return measure


class CudaBackend:
    """A real CUDA device, measured with torch.cuda's allocator statistics."""

    def __init__(self, index: int = 0):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available: use a simulated card (--gpu T4) or run on a GPU machine")
        self.device = torch.device("cuda", index)
        torch.cuda.init()

    def info(self) -> DeviceInfo:
        props = torch.cuda.get_device_properties(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside = total - free - torch.cuda.memory_reserved(self.device)
        return DeviceInfo(
            name=props.name, total_bytes=total, outside_bytes=outside, backend="cuda",
            capability=f"{props.major}.{props.minor}", driver=_driver_version(), cuda=torch.version.cuda or "",
            host=socket.gethostname(), card=getattr(catalog.by_device_name(props.name, total), "key", ""),
        )

    def measurer(self, workload: Workload) -> Callable[[int], int]:
        """Build the model on the device, run one unmeasured step at batch 1, return ``measure``.

        The warm-up loads cuDNN/cuBLAS kernels, which grows the CUDA context, so that
        ``info()`` read afterwards counts it in ``outside_bytes``.
        """
        built = simulated.build(workload)
        built.module.to(self.device)

        def measure(batch: int) -> int:
            previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = workload.cudnn_benchmark
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                step.train(built, workload, batch, self.device)
                torch.cuda.synchronize(self.device)
                return torch.cuda.max_memory_reserved(self.device)
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

        try:
            measure(1)
        except OutOfMemory:
            pass  # the decision's own batch-1 probe will say no-fit
        return measure


def _driver_version() -> str:
    try:
        import pynvml  # shipped by nvidia-ml-py, which ray[default] installs

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # the driver version is informational only
        return ""


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_backend(gpu: str | None = None, index: int = 0):
    """A simulated backend for a catalog name, else the real CUDA device ``index``."""
    if gpu:
        return SimulatedBackend(gpu)
    return CudaBackend(index)

