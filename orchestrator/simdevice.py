"""The simulated backend: a catalog card, measured by replaying a workload's fake-tensor trace
(``simulated.profile``) through the caching-allocator model (``allocator``)."""
from __future__ import annotations

import socket

import torch

from . import allocator, catalog, cudacost, ddp, simulated
from .devicetypes import DeviceInfo, Measurement, Measurer
from .errors import OutOfMemory
from .spec import Workload


class SimulatedBackend:
    """A catalog card, measured by fake-tensor traces replayed through the allocator model."""

    def __init__(self, card_key: str):
        self.card = catalog.card(card_key)
        self._profiles: dict[Workload, simulated.Profile] = {}

    def info(self) -> DeviceInfo:
        c = self.card
        return DeviceInfo(
            name=c.name, total_bytes=c.total_bytes, outside_bytes=c.context_bytes, backend="simulated",
            capability=f"{c.capability[0]}.{c.capability[1]}", torch=torch.__version__,
            host=socket.gethostname(), card=c.key,
        )

    def add_profile(self, prof: simulated.Profile) -> None:
        """Reuse traces made elsewhere (another actor, another card): they are card-independent."""
        self._profiles[prof.workload] = prof

    def profile(self, workload: Workload) -> simulated.Profile:
        if workload not in self._profiles:
            self._profiles[workload] = simulated.profile(workload)
        return self._profiles[workload]

    def measurer(self, workload: Workload) -> Measurer:
        return SimulatedMeasurer(self.profile(workload), self.card)


class SimulatedMeasurer:
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
    try:  # with the allocator settings the workload's trainer runs with (PYTORCH_CUDA_ALLOC_CONF)
        stats = allocator.replay(events, capacity, held=held, conf=prof.workload.alloc_conf)
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
