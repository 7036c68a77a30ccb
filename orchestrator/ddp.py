"""What DistributedDataParallel costs each rank, as numbers (no torch): the reducer's gradient buckets
inside the allocator, and NCCL's communicator buffers outside it.

The step is measured under DDP as trainers configure it: ultralytics 8.4.x wraps
``DistributedDataParallel(model, device_ids=[RANK], find_unused_parameters=True)`` with PyTorch's
defaults otherwise: ``bucket_cap_mb=25`` (first bucket 1 MiB), ``gradient_as_bucket_view=False``,
``static_graph=False``. Those defaults are not workload fields: trainers rarely change them, and
only ``gradient_as_bucket_view=True`` would change memory much (one copy of the gradients less).
Buffers are broadcast at every forward (PyTorch's default, which Lightning, accelerate and Ray
Train keep; ultralytics turns it off): a temporary of the buffers' size, freed before the
activations grow, so it costs the peak nothing either way and the step keeps it (the cautious side).

Per rank, inside the allocator (``step.ReducerSurrogate`` allocates them in a simulated trace;
a real process group runs the real reducer):

- construction broadcasts parameters and buffers from rank 0 in flat chunks of up to
  ``BROADCAST_BUCKET_BYTES``, at most two in flight (c10d ``broadcast_coalesced``): a temporary;
- the reducer's buckets: with ``gradient_as_bucket_view=False`` each parameter's gradient has a copy
  in a flat bucket, allocated at construction and alive for the whole run (``assign_buckets``);
  with ``find_unused_parameters=True`` the buckets are never rebuilt (``Reducer::rebuild_buckets``
  only runs for static graphs or without it), so there is no moment with two sets alive;
- ``find_unused_parameters``'s used-parameter map: one int32 per parameter on the device.

Outside the allocator: NCCL's communicator (``comm_bytes``), which one process cannot see for N ranks.
"""
from __future__ import annotations

from .units import MiB

FIRST_BUCKET_BYTES = 1 * MiB
"""``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``: the first bucket (the first parameters, whose gradients
come last) is small so that the last all-reduce can start early."""
BUCKET_CAP_BYTES = 25 * MiB
"""``bucket_cap_mb`` default (``torch.nn.parallel.distributed._DEFAULT_BUCKET_CAP_MB``, in MiB)."""
BROADCAST_BUCKET_BYTES = 250 * MiB
"""``DistributedDataParallel.broadcast_bucket_size``: chunk of the coalesced broadcasts (construction, buffers)."""


def assign_buckets(tensors: list[tuple[object, int]], limits: list[int]) -> list[list[int]]:
    """Indices of ``tensors`` ((dtype key, bytes) in parameter order) grouped as c10d's
    ``compute_bucket_assignment_by_size`` groups them: per dtype, a bucket closes once it holds at least
    its limit (the first bucket of each dtype ``limits[0]``, the next ``limits[1]``, ... the last limit
    repeating); buckets still open at the end follow; all sorted by their first index. DDP hands the
    reducer this list reversed, and the reducer allocates one flat tensor per bucket in that order."""
    open_: dict[object, list[int]] = {}
    size: dict[object, int] = {}
    limit_at: dict[object, int] = {}
    done: list[list[int]] = []
    for i, (key, nbytes) in enumerate(tensors):
        open_.setdefault(key, []).append(i)
        size[key] = size.get(key, 0) + nbytes
        at = limit_at.setdefault(key, 0)
        if size[key] >= limits[at]:
            done.append(open_.pop(key))
            size[key] = 0
            limit_at[key] = min(at + 1, len(limits) - 1)
    done += [b for b in open_.values() if b]
    return sorted(done, key=lambda b: b[0])


def reducer_buckets(tensors: list[tuple[object, int]]) -> list[list[int]]:
    """The reducer's buckets of the parameters ``tensors`` under the trainer's DDP (find_unused_parameters, default
    caps), in the order the reducer allocates them."""
    return list(reversed(assign_buckets(tensors, [FIRST_BUCKET_BYTES, BUCKET_CAP_BYTES])))


def broadcast_chunks(tensors: list[tuple[object, int]]) -> list[list[int]]:
    """The flat chunks a coalesced broadcast (``dist._broadcast_coalesced``) allocates, in order."""
    return assign_buckets(tensors, [BROADCAST_BUCKET_BYTES])


# -- NCCL's communicator: device memory outside PyTorch's allocator, per rank
#
# Figures, and where they come from:
# - NCCL keeps, per channel and per peer it receives from, one FIFO per protocol: Simple NCCL_BUFFSIZE (default
#   4 MiB, NCCL docs "Environment Variables", NCCL_BUFFSIZE), LL128 120 x 640 threads x 8 steps x 8 B = 4.69 MiB
#   and LL 8 lines x 512 threads x 8 steps x 16 B = 0.5 MiB (DEFAULT_LL128_BUFFSIZE / DEFAULT_LL_BUFFSIZE in
#   NCCL's src/include/device.h): 9.2 MiB, allocated in 2 MiB granules (cuMem) as 10 MiB; NCCL issue #1685 logs
#   exactly these 10485760-byte allocations per channel per peer on 8 x H100.
# - "each channel has its own buffer for collective operations (ring/tree)" (sjeaugey, NCCL issue #1450); memory
#   "is linearly tied to the number of channels", a ring "only has 2 connections regardless of the scale", trees
#   add peers, and "beyond 2 nodes it should no longer increase" (NCCL issues #864, #986). DDP only all-reduces
#   and broadcasts (ring and tree), no all-to-all, whose per-peer buffers would grow with every rank (#1685).
#   So a rank receives from min(N - 1, 3) peers per channel: its ring neighbour, then its tree parent and child.
# - Channels: what NCCL picks for the interconnect, a card fact (``catalog.Card.nccl_channels``): a few on PCIe,
#   16-32 over NVLink (32 on 8 x H100 in #1685).
# - Fixed: the communicator's own device state (work FIFO, per-channel device structures, proxy) and NCCL's
#   kernels, loaded on the first collective: ``COMM_FIXED_BYTES``, an estimate. Check, 8 x H100 (32 channels):
#   128 + 32 x 3 x 10 MiB = 1.06 GiB; NCCL issue #1685 reports 1.06 GB of non-PyTorch memory per GPU there.
# - NeMo issue #2988 (speech, 1 -> 2 -> 5 GPUs: batch 68 -> 67 -> 62) shows the growth with ranks this models.
# Assumption: the same per-rank figure whether the N ranks share a node or not (a ring or tree peer over the
# network also gets receive buffers per channel, on the GPU with GPUDirect RDMA); NVLink SHARP (NVLS) buffers on
# NVSwitch systems are not modelled (NCCL_NVLS_ENABLE=0 avoids them). Estimates until calibrated on real ranks.

CONN_BYTES = 10 * MiB
"""Receive buffers of one peer on one channel: Simple 4 MiB + LL128 4.69 MiB + LL 0.5 MiB, in 2 MiB granules."""
PEERS_PER_CHANNEL = 3
"""Most peers a rank receives from on one channel under ring and tree collectives."""
COMM_FIXED_BYTES = 128 * MiB
"""The communicator's own device state and NCCL's kernels, whatever the peers (estimate)."""


def peer_bytes(world_size: int, channels: int) -> int:
    """NCCL's receive buffers on each rank of a ``world_size``-rank job: 0 for one rank (no peers)."""
    return channels * min(world_size - 1, PEERS_PER_CHANNEL) * CONN_BYTES


def comm_bytes(world_size: int, channels: int) -> int:
    """NCCL's device memory on each rank, outside PyTorch's allocator; 0 without DDP (``world_size`` 1)."""
    if world_size <= 1:
        return 0
    return COMM_FIXED_BYTES + peer_bytes(world_size, channels)
