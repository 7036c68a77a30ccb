"""The device seam's types: what a device reports (``DeviceInfo``), what a measured step gives
(``Measurement``), and the two protocols a backend implements (``Backend``, ``Measurer``). Plain data
that crosses Ray's wire; no torch here, so that the fleet and the table can use them without it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

from .spec import Workload
from .units import GiB


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
    torch: str = ""
    """The torch version of the process that measured (filled by the backend)."""
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
