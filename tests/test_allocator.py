"""The caching-allocator model: rounding, pools, splitting, reuse, release and OOM."""
import pytest

from orchestrator.allocator import (
    MiB, AllocatorOutOfMemory, CachingAllocator, replay, round_size, segment_size,
)


def test_rounding_and_segment_sizes():
    """512 B rounding; 2 MiB small segments; 20 MiB for < 10 MiB; else rounded to 2 MiB."""
    assert [round_size(n) for n in (1, 512, 513, 4096)] == [512, 512, 1024, 4096]
    assert segment_size(1 * MiB) == 2 * MiB
    assert segment_size(1 * MiB + 512) == 20 * MiB
    assert segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(11 * MiB + 1) == 12 * MiB


def test_small_allocations_share_a_segment():
    """Many small tensors fit in one 2 MiB segment; reserved is what the device gave."""
    st = replay([1000] * 100)
    assert st.peak_reserved == 2 * MiB
    assert st.peak_allocated == 100 * 1024


def test_large_requests_split_and_reuse_freed_blocks():
    """A 3 MiB request takes a 20 MiB segment; after a free, a second one reuses it (best fit)."""
    st = replay([3 * MiB, -1, 3 * MiB, 4 * MiB])
    assert st.peak_reserved == 20 * MiB
    assert st.segments == 1


def test_no_split_for_small_remainder_in_large_pool():
    """A 12 MiB free block serves an 11.5 MiB request whole (remainder <= 1 MiB is not split)."""
    a = CachingAllocator()
    b = a.malloc(12 * MiB)
    a.free(b)
    c = a.malloc(12 * MiB - 1024 * 512)
    assert c.size == 12 * MiB
    assert a.stats.allocated == 12 * MiB


def test_freed_neighbours_merge():
    """Two adjacent freed blocks merge and can serve a request bigger than either."""
    st = replay([6 * MiB, 6 * MiB, 6 * MiB, -1, -2, 11 * MiB])
    assert st.peak_reserved == 20 * MiB


def test_cache_is_released_before_oom():
    """At capacity the allocator frees wholly cached segments and retries before failing."""
    # 40 MiB segment freed, then a 60 MiB request fits only after the release
    st = replay([40 * MiB, -1, 60 * MiB], capacity_bytes=80 * MiB)
    assert st.reserved == 60 * MiB
    with pytest.raises(AllocatorOutOfMemory):
        replay([40 * MiB, 60 * MiB], capacity_bytes=80 * MiB)


def test_fragmentation_counts():
    """Interleaved frees leave holes that a larger request cannot use: reserved > allocated."""
    events = [4 * MiB] * 5 + [-1, -3, -5] + [8 * MiB]
    st = replay(events)
    assert st.peak_reserved == 40 * MiB
    assert st.peak_allocated < st.peak_reserved


def test_best_fit_takes_the_smallest_free_block_that_is_large_enough():
    """Holes of 4 and 8 MiB in one segment: a 4 MiB request takes the 4 MiB hole (not a piece of the 8),
    so an 8 MiB request after it still fits without a new segment."""
    a = CachingAllocator()
    hole4, keep, hole8, rest = a.malloc(4 * MiB), a.malloc(2 * MiB), a.malloc(8 * MiB), a.malloc(6 * MiB)
    a.free(hole4)
    a.free(hole8)
    assert (a.malloc(4 * MiB).offset, a.malloc(8 * MiB).offset) == (0, 6 * MiB)
    assert (a.stats.reserved, a.stats.segments, a.stats.allocated) == (20 * MiB, 1, 20 * MiB)
    st = replay([4 * MiB, 2 * MiB, 8 * MiB, 6 * MiB, -1, -3, 4 * MiB, 8 * MiB])
    assert (st.peak_reserved, st.segments) == (20 * MiB, 1)


def test_free_returns_the_block_for_reuse():
    """What is freed is no longer allocated and serves the next request: a loop of equal-size
    alloc/free pairs stays in one segment."""
    a = CachingAllocator()
    for _ in range(50):
        a.free(a.malloc(15 * MiB))
    assert (a.stats.allocated, a.stats.reserved, a.stats.segments) == (0, 16 * MiB, 1)


def test_a_request_of_exactly_1_mib_is_small():
    """<= 1 MiB is the small pool: two 1 MiB requests share one 2 MiB segment. In the large pool the first
    would take a segment whole (a 1 MiB remainder is not split there) and the second a new one; with
    1 MiB sized as a large request, a 20 MiB segment. One byte more is large: a 20 MiB segment of its own."""
    st = replay([MiB, MiB])
    assert (st.peak_reserved, st.segments, st.peak_allocated) == (2 * MiB, 1, 2 * MiB)
    st = replay([MiB, MiB + 1])
    assert (st.peak_reserved, st.segments) == (22 * MiB, 2)
