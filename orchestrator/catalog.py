"""GPU cards as data: what the driver reports, and what the simulator adds around it.

``total_bytes`` is ``torch.cuda.get_device_properties(i).total_memory`` as seen on
that card (nvidia-smi's MiB x 2**20; it varies a little with driver and ECC
settings). ``context_bytes`` is device memory the CUDA context and kernel images
take outside PyTorch's allocator, and ``workspace_bytes`` the cuBLAS workspace the
allocator holds once a matmul has run. Both are estimates until calibrated on real
hardware (see benchmarks/calibrate_cuda.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SpecError
from .units import MiB


NEIGHBOUR_WARN_BYTES = 256 * MiB
"""Other processes holding more than this on a device while it was measured: the decision warns, and a
re-run measures the row again (their memory was subtracted from the budget; they may be gone now)."""


@dataclass(frozen=True)
class Card:
    key: str  # the name users type: "A100-80GB"
    name: str  # torch.cuda.get_device_name() on that card
    total_bytes: int
    capability: tuple[int, int]
    context_bytes: int
    workspace_bytes: int
    sold_gb: int
    """The memory size the card is sold as ("24 GB"): what users type, not what the driver reports."""
    ray_type: str | None = None  # Ray's accelerator_type label (ray.util.accelerators)
    nccl_channels: int = 4
    """Channels NCCL runs collectives on between such cards (``NCCL_DEBUG=INFO`` prints "N coll channels"):
    sets its buffers' size under DDP (``ddp.comm_bytes``). Estimates: a few over PCIe, 16-32 over NVLink."""


def _card(key, name, total_mib, capability, context_mib, sold_gb, workspace_mib=8, ray_type=None, nccl_channels=4):
    return Card(key, name, total_mib * MiB, capability, context_mib * MiB, workspace_mib * MiB, sold_gb, ray_type,
                nccl_channels)


# Context sizes grow with the kernel images loaded for the architecture; Hopper's
# cuBLAS takes a 32 MiB workspace per handle where older parts take 8 MiB. NCCL channels:
# PCIe cards 4 (NCCL's 2 rings, doubled), NVLink parts more (32 on 8 x H100: NCCL issue #1685).
CATALOG: dict[str, Card] = {c.key: c for c in [
    _card("T4", "Tesla T4", 15_102, (7, 5), 360, 16, ray_type="T4"),
    _card("V100-16GB", "Tesla V100-SXM2-16GB", 16_160, (7, 0), 380, 16, ray_type="V100", nccl_channels=12),
    _card("V100-32GB", "Tesla V100-SXM2-32GB", 32_510, (7, 0), 380, 32, ray_type="V100", nccl_channels=12),
    _card("L4", "NVIDIA L4", 22_491, (8, 9), 420, 24, ray_type="L4"),
    _card("A10G", "NVIDIA A10G", 22_491, (8, 6), 420, 24, ray_type="A10G"),
    _card("RTX-3090", "NVIDIA GeForce RTX 3090", 24_260, (8, 6), 420, 24),
    _card("RTX-4090", "NVIDIA GeForce RTX 4090", 24_210, (8, 9), 420, 24),
    _card("A100-40GB", "NVIDIA A100-SXM4-40GB", 40_326, (8, 0), 430, 40, ray_type="A100-40G", nccl_channels=24),
    _card("A100-80GB", "NVIDIA A100-SXM4-80GB", 81_038, (8, 0), 430, 80, ray_type="A100-80G", nccl_channels=24),
    _card("H100-80GB", "NVIDIA H100 80GB HBM3", 81_090, (9, 0), 520, 80, 32, ray_type="H100", nccl_channels=32),
    _card("H200", "NVIDIA H200", 143_166, (9, 0), 520, 141, 32, ray_type="H200", nccl_channels=32),
]}


def sold_as(size_gb: float) -> list[Card]:
    """Catalog cards sold with ``size_gb`` GB of memory (e.g. 24: L4, A10G, RTX 3090, RTX 4090)."""
    return [c for c in CATALOG.values() if c.sold_gb == size_gb]


def card(key: str) -> Card:
    """The catalog entry for ``key`` (case-insensitive); ValueError names the known cards."""
    for k, c in CATALOG.items():
        if k.lower() == key.strip().lower():
            return c
    raise ValueError(f"unknown GPU {key!r}: known cards are {', '.join(CATALOG)}")


def by_device_name(name: str, total_bytes: int) -> Card | None:
    """The catalog card a real device matches (name and total within 2%), if any."""
    for c in CATALOG.values():
        if c.name.lower() == name.lower() and abs(c.total_bytes - total_bytes) <= 0.02 * c.total_bytes:
            return c
    return None


def parse_counts(text, where: str, example: str) -> list[tuple[str, int]]:
    """``'T4 x2, A100-80GB'`` -> ``[("T4", 2), ("A100-80GB", 1)]``: the one syntax for cards with counts (a
    simulated fleet, a DDP job's ranks). Items split at commas or semicolons (a list: one item each), names
    as written (not resolved here); SpecError naming ``where`` for an item that is not CARD or CARD xN with
    N >= 1, or for no item at all."""
    items = text if isinstance(text, list) else re.split(r"[,;]", str(text))
    out = []
    for item in (str(s).strip() for s in items):
        if not item:
            continue
        m = re.fullmatch(r"(.+?)(?:\s*[x*]\s*(-?\d+))?", item)
        name = m.group(1).strip()
        if re.search(r"\*|(^|\s)x(\s|$)", name):  # 'T4 x two': a count that is not a number
            raise SpecError(f"{where}: {item!r} must be CARD or CARD xN, e.g. {example!r}")
        count = int(m.group(2) or 1)
        if count < 1:
            raise SpecError(f"{where}: {item!r} count must be >= 1, e.g. '{name} x2'")
        out.append((name, count))
    if not out:
        raise SpecError(f"{where}: no card named; name catalog cards with counts, e.g. {example!r}")
    return out


def channels_for(card: Card | None) -> int:
    """NCCL channels for ``card``; for a card the catalog does not know, the catalog's most (the larger
    buffers: an answer that fits)."""
    return card.nccl_channels if card else max(c.nccl_channels for c in CATALOG.values())
