"""A model of PyTorch's CUDA caching allocator (native, default settings).

Pure Python, no torch. ``replay`` feeds it a sequence of tensor storage
allocations and frees and returns the peak bytes *reserved* from the device,
which is what decides whether a training step fits. Rules, from
c10/cuda/CUDACachingAllocator.cpp:

- requests are rounded up to 512 B;
- requests <= 1 MiB come from a small pool of 2 MiB segments; larger ones from a
  large pool, whose new segments are 20 MiB for requests < 10 MiB and the request
  rounded up to 2 MiB otherwise;
- a free cached block is reused best-fit (smallest that is large enough) and split
  when the remainder is >= 512 B (small pool) or > 1 MiB (large pool);
- freed blocks merge with free neighbours in the same segment;
- when a new segment would exceed the capacity, every wholly free cached segment
  is released and the allocation retried; then it is out of memory.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

from .units import MiB

MIN_BLOCK = 512
SMALL_SIZE = 1 * MiB
SMALL_SEGMENT = 2 * MiB
LARGE_SEGMENT = 20 * MiB
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB


class AllocatorOutOfMemory(Exception):
    """The modelled device has no room for a new segment, even after releasing the cache."""


def round_size(nbytes: int) -> int:
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Block:
    __slots__ = ("seg", "offset", "size", "free", "prev", "next")

    def __init__(self, seg, offset, size):
        self.seg, self.offset, self.size = seg, offset, size
        self.free = True
        self.prev = self.next = None

    def sort_key(self):
        return (self.size, self.seg, self.offset)


@dataclass
class Stats:
    peak_reserved: int = 0
    peak_allocated: int = 0
    reserved: int = 0
    allocated: int = 0
    segments: int = 0
    phase_peak_reserved: int = 0
    """Peak reserved since the last phase mark (a 0 event), e.g. the validation pass after training."""
    phase_peaks: list = field(default_factory=list)
    """``phase_peak_reserved`` of each phase that a mark (or the end of ``replay``) closed."""


class CachingAllocator:
    """One device's allocator; ``capacity_bytes`` is what it may reserve in total (None: unbounded)."""

    def __init__(self, capacity_bytes: int | None = None):
        self.capacity = capacity_bytes
        self.stats = Stats()
        self._pools: dict[bool, list[tuple]] = {True: [], False: []}  # small? -> sorted free keys
        self._by_key: dict[tuple, _Block] = {}
        self._segments: dict[int, tuple[int, bool, _Block]] = {}  # id -> (size, small, first block)
        self._next_seg = 0

    def malloc(self, nbytes: int) -> _Block:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(small, size) or self._new_segment(small, size)
        self._take(block)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = _Block(block.seg, block.offset + size, remaining)
            rest.prev, rest.next = block, block.next
            if block.next:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._give(rest)
        block.free = False
        self.stats.allocated += block.size
        self.stats.peak_allocated = max(self.stats.peak_allocated, self.stats.allocated)
        return block

    def free(self, block: _Block) -> None:
        self.stats.allocated -= block.size
        for nb in (block.prev, block.next):
            if nb is not None and nb.free:
                self._take(nb)
                if nb is block.prev:
                    nb.size += block.size
                    nb.next = block.next
                    if block.next:
                        block.next.prev = nb
                    block = nb
                else:
                    block.size += nb.size
                    block.next = nb.next
                    if nb.next:
                        nb.next.prev = block
        self._give(block)

    def release_cache(self) -> None:
        """Return every wholly free segment to the device (torch.cuda.empty_cache)."""
        for seg_id, (size, small, first) in list(self._segments.items()):
            if first.free and first.next is None and first.size == size:
                self._take(first)
                del self._segments[seg_id]
                self.stats.reserved -= size
                self.stats.segments -= 1

    def _best_fit(self, small: bool, size: int) -> _Block | None:
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            return None
        return self._by_key[pool[i]]

    def _new_segment(self, small: bool, size: int) -> _Block:
        seg_size = segment_size(size)
        if self.capacity is not None and self.stats.reserved + seg_size > self.capacity:
            self.release_cache()
            if self.stats.reserved + seg_size > self.capacity:
                raise AllocatorOutOfMemory(
                    f"tried to reserve {seg_size} B with {self.stats.reserved} B reserved of {self.capacity} B"
                )
        seg_id = self._next_seg
        self._next_seg += 1
        block = _Block(seg_id, 0, seg_size)
        self._segments[seg_id] = (seg_size, small, block)
        self.stats.reserved += seg_size
        self.stats.segments += 1
        self.stats.peak_reserved = max(self.stats.peak_reserved, self.stats.reserved)
        self.stats.phase_peak_reserved = max(self.stats.phase_peak_reserved, self.stats.reserved)
        self._give(block)
        return block

    def _give(self, block: _Block) -> None:
        block.free = True
        key = block.sort_key()
        self._by_key[key] = block
        bisect.insort(self._pools[self._segments[block.seg][1]], key)

    def _take(self, block: _Block) -> None:
        key = block.sort_key()
        pool = self._pools[self._segments[block.seg][1]]
        del pool[bisect.bisect_left(pool, key)]
        del self._by_key[key]


def replay(sizes: Iterable[int], capacity_bytes: int | None = None, held: Iterable[int] = ()) -> Stats:
    """Run an event sequence: a positive size allocates a new block, ``-(i + 1)`` frees allocation ``i``,
    ``0`` starts a new phase (``Stats.phase_peaks``) with ``torch.cuda.empty_cache()``.

    Allocation ``i`` is the i-th positive entry of ``sizes``. ``held`` are allocated
    first and never freed (e.g. the cuBLAS workspace); they do not shift the indices.
    Raises AllocatorOutOfMemory when the capacity is exceeded.
    """
    alloc = CachingAllocator(capacity_bytes)
    for nbytes in held:
        alloc.malloc(nbytes)
    blocks: list[_Block | None] = []
    stats = alloc.stats
    for ev in sizes:
        if ev > 0:
            blocks.append(alloc.malloc(ev))
        elif ev == 0:  # the trainer empties the cache before validating (ultralytics, reserved > 50%)
            stats.phase_peaks.append(stats.phase_peak_reserved)
            alloc.release_cache()
            stats.phase_peak_reserved = stats.reserved
        else:
            i = -ev - 1
            alloc.free(blocks[i])
            blocks[i] = None
    stats.phase_peaks.append(stats.phase_peak_reserved)
    return stats
