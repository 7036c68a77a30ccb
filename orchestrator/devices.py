"""Device backends: the one seam between the decision and the hardware.

A backend (``devicetypes.Backend``) names its device, says how many bytes it has and how many are used
outside our allocator, and measures a workload's training step at a batch size (peak bytes reserved,
or ``OutOfMemory``): ``simdevice.SimulatedBackend`` for a catalog card, ``cuda.CudaBackend`` for a GPU.
"""
from __future__ import annotations

from .devicetypes import Backend


def make_backend(gpu: str | None = None, index: int | None = None) -> Backend:
    """A simulated backend for a catalog name, else the real CUDA device ``index`` (None: the current one)."""
    if gpu:
        from .simdevice import SimulatedBackend

        return SimulatedBackend(gpu)
    from .cuda import CudaBackend

    return CudaBackend(index)
