"""A model of PyTorch's CUDA caching allocator, with the settings of ``PYTORCH_CUDA_ALLOC_CONF`` that change a
training step's peak reserved bytes.

Pure Python, no torch. ``replay`` feeds it a sequence of tensor storage
allocations and frees and returns the peak bytes *reserved* from the device,
which is what decides whether a training step fits. Rules, from
c10/cuda/CUDACachingAllocator.cpp (read at pytorch/pytorch 001074d; the sizes are
the constants of c10/core/AllocatorConfig.h in torch 2.14.1):

- requests are rounded up to 512 B;
- requests <= 1 MiB come from a small pool of 2 MiB segments; larger ones from a
  large pool, whose new segments are 20 MiB for requests < 10 MiB and the request
  rounded up to 2 MiB otherwise;
- a free cached block is reused best-fit (smallest that is large enough) and split
  when the remainder is >= 512 B (small pool) or > 1 MiB (large pool);
- freed blocks merge with free neighbours in the same segment;
- when a new segment would exceed the capacity, every wholly free cached segment
  is released and the allocation retried; then it is out of memory.

``conf`` (an ``allocconf.AllocConf``: a ``PYTORCH_CUDA_ALLOC_CONF`` string, parsed as PyTorch's
c10/core/AllocatorConfig.cpp parses it) changes these rules; the default (``""``) is the rules above:

- ``expandable_segments:True`` (``ExpandableSegment``, Note [Expandable Segments]): each pool has one
  segment of reserved address space that grows by mapping physical pages, 2 MiB pages for the small
  pool and 20 MiB pages (``kLargeBuffer``) for the large pool. A request that no free block fits
  maps pages at the lowest address where free and unmapped space together fit it
  (``find_expandable_block``): normally the free block at the end of the mapped range plus
  ``ceil(missing / page)`` new pages (``try_allocate_expandable_block``, ``map_block``); so nothing
  is rounded to a segment size, only the mapped range to whole pages. Best fit prefers a free block
  that cannot grow into unmapped space over one that can (``get_free_block``'s ``expandable_size``),
  and every remainder of >= 512 B is split off, in both pools (``should_split``). Free blocks merge
  with free neighbours, never with unmapped ones. ``empty_cache`` (``release_cached_blocks``,
  ``unmap_block``) unmaps every whole page inside every free block, in the middle of the segment
  too; the partial pages at a free block's ends stay mapped. When mapping would exceed the capacity,
  the cache is released that way and the mapping retried, then it is out of memory. A segment's
  address space is 1 1/8 of the card's memory; the model never runs out of it (what is mapped is
  bounded by the capacity).
- ``max_split_size_mb:N`` (N >= 20): a cached block of N MiB or more is never split and serves only a
  request of N MiB or more that it exceeds by less than 20 MiB (``get_free_block``, with
  ``max_non_split_rounding_mb``'s default of 20 MiB); a request below N MiB is never served from such a
  block, and only a block below N MiB is split (``should_split``). When a new segment would exceed the
  capacity, cached unsplit blocks of N MiB or more are released first, the smallest one that covers
  the request, else the largest ones until they add up to it (``release_available_cached_blocks``,
  which since pytorch/pytorch#134338 never releases an expandable segment's blocks), and the
  allocation retried before the whole cache is released. With expandable segments the block rules
  apply to the segment's free blocks too (``get_free_block`` checks any block), so a request below N MiB
  cannot use a free range of N MiB or more inside the segment and maps pages at its end instead: the
  two together can reserve far more than either alone (pytorch/pytorch#193400, open, would exempt
  expandable blocks).
- ``garbage_collection_threshold:T`` (0 < T < 1) is accepted (a trainer may set it) and **not modelled**:
  the allocator runs its collection only when a per-process memory fraction is set
  (``malloc``: ``set_fraction && garbage_collection_threshold() > 0``), which neither ultralytics'
  trainer nor this package's step sets; so it does not change a training step's peak reserved, and a
  simulated row with it equals one without it.

Other keys PyTorch knows (``roundup_power2_divisions``, ``max_non_split_rounding_mb``, ``backend``,
``pinned_*``, ...) are refused by ``allocconf.parse_conf``: they are not modelled, so a row could not say
what they do.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

from .allocconf import DEFAULT_CONF, AllocConf, canonical, parse_conf  # noqa: F401 (re-exported)
from .units import MiB

MIN_BLOCK = 512
SMALL_SIZE = 1 * MiB
SMALL_SEGMENT = 2 * MiB
LARGE_SEGMENT = 20 * MiB
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB
NON_SPLIT_ROUNDING = LARGE_SEGMENT
"""How much larger than a request of ``max_split_size`` or more an unsplittable cached block may be and still
serve it (``max_non_split_rounding_mb``'s default, 20 MiB)."""
ADDRESS_SPACE = 1 << 60
"""An expandable segment's address space in the model: never the limit (the capacity is)."""


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


def _growable(block: _Block) -> int:
    """A free block's size, plus the unmapped space right after it (``get_free_block``'s ``expandable_size``)."""
    nxt = block.next
    return block.size + (nxt.size if nxt is not None and not nxt.mapped else 0)


def _room(block: _Block, size: int) -> bool:
    """Free and unmapped blocks from ``block`` on hold ``size`` (``has_available_address_space``)."""
    total = 0
    while total < size and block is not None and (block.free or not block.mapped):
        total += block.size
        block = block.next
    return total >= size


def _absorb(left: "_Block", right: "_Block") -> "_Block":
    """Merge ``right`` into its neighbour ``left`` (the same segment, adjacent); returns ``left``."""
    left.size += right.size
    left.next = right.next
    if right.next:
        right.next.prev = left
    return left


class _Block:
    __slots__ = ("seg", "offset", "size", "free", "prev", "next", "mapped")

    def __init__(self, seg, offset, size, mapped=True):
        self.seg, self.offset, self.size = seg, offset, size
        self.free = True
        self.prev = self.next = None
        self.mapped = mapped  # False: an expandable segment's address space without pages (never free)

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
    """One device's allocator; ``capacity_bytes`` is what it may reserve in total (None: unbounded);
    ``conf``: its ``PYTORCH_CUDA_ALLOC_CONF`` settings (PyTorch's defaults unless given)."""

    def __init__(self, capacity_bytes: int | None = None, conf: AllocConf = DEFAULT_CONF):
        self.capacity = capacity_bytes
        self.conf = conf
        self.stats = Stats()
        self._pools: dict[bool, list[tuple]] = {True: [], False: []}  # small? -> sorted free keys
        self._by_key: dict[tuple, _Block] = {}
        self._segments: dict[int, tuple[int, bool, _Block]] = {}  # id -> (size, small, first block)
        self._next_seg = 0
        self._expandable: dict[bool, int] = {}  # small? -> the pool's expandable segment
        self._unmapped: dict[int, dict[int, _Block]] = {}  # expandable segment -> offset -> unmapped block

    def malloc(self, nbytes: int) -> _Block:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        if self.conf.expandable_segments:
            block = self._best_fit_expandable(small, size) or self._grow(small, size)
        else:
            block = self._best_fit(small, size) or self._new_segment(small, size)
        self._take(block)
        remaining = block.size - size
        if self.conf.expandable_segments:
            split = remaining >= MIN_BLOCK
        elif self.conf.max_split_size is not None and not small:
            split = size < self.conf.max_split_size and remaining > SMALL_SIZE
        else:
            split = remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE
        if split:
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
                block = _absorb(nb, block) if nb is block.prev else _absorb(block, nb)
        self._give(block)

    def release_cache(self) -> None:
        """Return every wholly free segment to the device (torch.cuda.empty_cache); with expandable segments,
        every whole page inside a free block."""
        if self.conf.expandable_segments:
            for small in (False, True):  # release_cached_blocks: the large pool, then the small
                for key in list(self._pools[small]):
                    self._unmap(self._by_key[key])
            return
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
        return self._oversize_rule(size, self._by_key[pool[i]])

    def _oversize_rule(self, size: int, block: _Block) -> _Block | None:
        """``block`` unless ``max_split_size`` forbids it for a request of ``size`` (``get_free_block``)."""
        limit = self.conf.max_split_size
        if limit is not None and (block.size >= limit if size < limit else block.size >= size + NON_SPLIT_ROUNDING):
            return None
        return block

    def _new_segment(self, small: bool, size: int) -> _Block:
        seg_size = segment_size(size)
        if self.capacity is not None and self.stats.reserved + seg_size > self.capacity:
            if self.conf.max_split_size is not None and self._release_oversize(small, size) \
                    and self.stats.reserved + seg_size <= self.capacity:
                return self._segment(small, seg_size)
            self.release_cache()
            if self.stats.reserved + seg_size > self.capacity:
                raise AllocatorOutOfMemory(
                    f"tried to reserve {seg_size} B with {self.stats.reserved} B reserved of {self.capacity} B"
                )
        return self._segment(small, seg_size)

    def _segment(self, small: bool, seg_size: int) -> _Block:
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

    def _release_oversize(self, small: bool, size: int) -> bool:
        """``release_available_cached_blocks``: release the smallest cached unsplit block of at least
        ``max(size, max_split_size)``, else the largest blocks of ``max_split_size`` or more until they add
        up to that; True when they did (then the allocation is retried)."""
        limit = self.conf.max_split_size
        need = max(size, limit)
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (need, -1, -1))
        if i < len(pool):
            return self._release_whole(self._by_key[pool[i]])
        released = 0
        for key in reversed(list(pool)):  # the largest first
            block = self._by_key[key]
            if released >= need or block.size < limit:
                break
            if self._release_whole(block):
                released += block.size
        return released >= need

    def _release_whole(self, block: _Block) -> bool:
        """Give ``block`` back to the device if it is a whole segment (a block of ``max_split_size`` or more
        always is: such blocks are never split)."""
        size, small, _ = self._segments[block.seg]
        if block.prev is not None or block.next is not None or block.size != size:
            return False
        self._take(block)
        del self._segments[block.seg]
        self.stats.reserved -= size
        self.stats.segments -= 1
        return True

    # -- expandable segments: one per pool, pages mapped and unmapped (see the module docstring)

    def _expandable_segment(self, small: bool) -> int:
        seg = self._expandable.get(small)
        if seg is None:
            seg = self._next_seg
            self._next_seg += 1
            page = SMALL_SEGMENT if small else LARGE_SEGMENT
            space = _Block(seg, 0, ADDRESS_SPACE // page * page, mapped=False)
            space.free = False
            self._segments[seg] = (space.size, small, space)
            self._unmapped[seg] = {0: space}
            self._expandable[small] = seg
            self.stats.segments += 1
        return seg

    def _best_fit_expandable(self, small: bool, size: int) -> _Block | None:
        """Best fit, but of blocks that fit, one that can grow into unmapped space counts as that much
        larger (``get_free_block``: the walk while the next block's ``expandable_size`` is smaller)."""
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            return None
        block = self._by_key[pool[i]]
        while i + 1 < len(pool):
            nxt = self._by_key[pool[i + 1]]
            if _growable(nxt) >= _growable(block):
                break
            i, block = i + 1, nxt
        return self._oversize_rule(size, block)

    def _grow(self, small: bool, size: int) -> _Block:
        """A free block of at least ``size`` made by mapping pages; at the capacity, the cache is released
        (its free pages unmapped) and the mapping retried, then it is out of memory."""
        block = self._map_for(small, size)
        if block is None:
            self.release_cache()
            block = self._map_for(small, size)
            if block is None:
                raise AllocatorOutOfMemory(f"tried to map pages for {size} B with {self.stats.reserved} B "
                                           f"reserved of {self.capacity} B")
        return block

    def _map_for(self, small: bool, size: int) -> _Block | None:
        """``find_expandable_block`` and ``try_allocate_expandable_block``: at the lowest address where free
        and unmapped blocks in a row hold ``size`` (a free block just before unmapped space counts), map
        the pages it needs; None when they would exceed the capacity (pages mapped before stay mapped)."""
        seg = self._expandable_segment(small)
        unmapped = self._unmapped[seg]
        for offset in sorted(unmapped):
            block = unmapped[offset]
            if block.prev is not None and block.prev.free:
                block = block.prev
            if _room(block, size):
                break
        if not block.mapped:
            block = self._map(block, min(block.size, size))
        while block is not None and block.size < size:  # free, then unmapped: map what is missing
            block = self._map(block.next, min(size - block.size, block.next.size))
        return block

    def _map(self, block: _Block, nbytes: int) -> _Block | None:
        """Map the pages of unmapped ``block`` that cover its first ``nbytes`` and merge them with free
        neighbours (``map_block``); the free block they are now part of, or None at the capacity."""
        page = SMALL_SEGMENT if self._segments[block.seg][1] else LARGE_SEGMENT
        mapped = -(-nbytes // page) * page
        if self.capacity is not None and self.stats.reserved + mapped > self.capacity:
            return None
        unmapped = self._unmapped[block.seg]
        del unmapped[block.offset]
        if mapped < block.size:
            rest = _Block(block.seg, block.offset + mapped, block.size - mapped, mapped=False)
            rest.free = False
            rest.prev, rest.next = block, block.next
            if block.next:
                block.next.prev = rest
            block.next = rest
            block.size = mapped
            unmapped[rest.offset] = rest
        block.mapped = True
        prev = block.prev
        if prev is not None and prev.free:
            self._take(prev)
            block = _absorb(prev, block)
        nxt = block.next
        if nxt is not None and nxt.free:
            self._take(nxt)
            block = _absorb(block, nxt)
        self._give(block)
        self.stats.reserved += mapped
        self.stats.peak_reserved = max(self.stats.peak_reserved, self.stats.reserved)
        self.stats.phase_peak_reserved = max(self.stats.phase_peak_reserved, self.stats.reserved)
        return block

    def _unmap(self, block: _Block) -> None:
        """Unmap the whole pages inside free ``block``; its partial pages at either end stay mapped as free
        blocks, and the unmapped range merges with unmapped neighbours (``unmap_block``)."""
        page = SMALL_SEGMENT if self._segments[block.seg][1] else LARGE_SEGMENT
        start, stop = block.offset, block.offset + block.size
        begin, end = -(-start // page) * page, stop // page * page
        if begin >= end:
            return
        self._take(block)
        if begin > start:
            before = _Block(block.seg, start, begin - start)
            before.prev, before.next = block.prev, block
            if block.prev:
                block.prev.next = before
            block.prev = before
            self._give(before)
        if stop > end:
            after = _Block(block.seg, end, stop - end)
            after.prev, after.next = block, block.next
            if block.next:
                block.next.prev = after
            block.next = after
            self._give(after)
        block.offset, block.size, block.mapped, block.free = begin, end - begin, False, False
        unmapped = self._unmapped[block.seg]
        prev = block.prev
        if prev is not None and not prev.mapped:
            del unmapped[prev.offset]
            block = _absorb(prev, block)
        nxt = block.next
        if nxt is not None and not nxt.mapped:
            del unmapped[nxt.offset]
            block = _absorb(block, nxt)
        unmapped[block.offset] = block
        self.stats.reserved -= end - begin

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


def replay(sizes: Iterable[int], capacity_bytes: int | None = None, held: Iterable[int] = (),
           conf: AllocConf | str = DEFAULT_CONF) -> Stats:
    """Run an event sequence: a positive size allocates a new block, ``-(i + 1)`` frees allocation ``i``,
    ``0`` starts a new phase (``Stats.phase_peaks``) with ``torch.cuda.empty_cache()``.

    Allocation ``i`` is the i-th positive entry of ``sizes``. ``held`` are allocated
    first and never freed (e.g. the cuBLAS workspace); they do not shift the indices.
    ``conf``: the allocator's settings (an ``AllocConf`` or a ``PYTORCH_CUDA_ALLOC_CONF`` string).
    Raises AllocatorOutOfMemory when the capacity is exceeded.
    """
    alloc = CachingAllocator(capacity_bytes, parse_conf(conf) if isinstance(conf, str) else conf)
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
