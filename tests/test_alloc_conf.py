"""PYTORCH_CUDA_ALLOC_CONF as a workload field (issue 25 item 2): the allocator model's expandable segments
and max_split_size_mb against the rules of c10/cuda/CUDACachingAllocator.cpp (allocator.py's docstring),
the field's validation, and the field reaching a simulated decision's row."""
import random
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import orchestrator
from orchestrator import allocator, cli, cuda, job, simdevice, spec, table
from orchestrator.allocator import (
    LARGE_SEGMENT, MiB, SMALL_SEGMENT, AllocatorOutOfMemory, CachingAllocator, parse_conf, replay,
)
from orchestrator.errors import SpecError
from orchestrator.spec import Workload

EXPANDABLE = "expandable_segments:True"


def run(events, conf=EXPANDABLE, capacity=None) -> CachingAllocator:
    """The allocator after ``events`` (``replay``'s encoding), to look at its blocks."""
    a = CachingAllocator(capacity, parse_conf(conf))
    blocks = []
    for ev in events:
        if ev > 0:
            blocks.append(a.malloc(ev))
        elif ev == 0:
            a.release_cache()
        else:
            a.free(blocks[-ev - 1])
    return a


def mapped_pages(a: CachingAllocator) -> dict[bool, int]:
    """Bytes mapped per pool (small?), walking every expandable segment's blocks, which must tile it: no two
    free neighbours, no two unmapped neighbours, unmapped ranges whole pages."""
    out = {True: 0, False: 0}
    for seg, (size, small, _) in a._segments.items():
        page = SMALL_SEGMENT if small else LARGE_SEGMENT
        b = next(iter(a._unmapped[seg].values()))
        while b.prev is not None:
            b = b.prev
        end, prev = 0, None
        while b is not None:
            assert b.offset == end and b.prev is prev
            if b.mapped:
                out[small] += b.size
                assert not (b.free and prev is not None and prev.free)
            else:
                assert b.offset % page == 0 and b.size % page == 0 and (prev is None or prev.mapped)
            end, prev, b = end + b.size, b, b.next
        assert end == size
    return out


def random_events(rng: random.Random, n: int) -> list[int]:
    """Allocations from 1 B to 300 MiB (both pools, page-sized and not), frees in any order, empty_cache marks."""
    events, live, k = [], [], 0
    for _ in range(n):
        r = rng.random()
        if r < 0.5 or not live:
            top = rng.choice([4096, 2 * MiB, 30 * MiB, 300 * MiB])
            events.append(rng.randint(1, top))
            live.append(k)
            k += 1
        elif r < 0.96:
            events.append(-(live.pop(rng.randrange(len(live))) + 1))
        else:
            events.append(0)
    return events


# -- expandable segments


@pytest.mark.parametrize("conf", [EXPANDABLE, EXPANDABLE + ",max_split_size_mb:64"])
def test_expandable_segments_never_reserve_less_than_what_is_live(conf):
    """After every event of random sequences (with and without a capacity): reserved >= allocated >= the live
    tensors' bytes, reserved is whole 2 MiB pages in the small pool and whole 20 MiB pages in the large one, and
    after empty_cache exactly the pages that hold an allocated block stay mapped."""
    rng = random.Random(25)
    for _ in range(60):
        events = random_events(rng, 200)
        a = CachingAllocator(rng.choice([None, 600 * MiB, 3000 * MiB]), parse_conf(conf))
        blocks, sizes, live = [], [], 0
        try:
            for ev in events:
                if ev > 0:
                    blocks.append(a.malloc(ev))
                    sizes.append(ev)
                    live += ev
                elif ev == 0:
                    a.release_cache()
                    touched = {(b.seg, p) for b in blocks if b is not None for p in pages(a, b)}
                    assert a.stats.reserved == sum(page_size(a, seg) for seg, _ in touched)
                else:
                    a.free(blocks[-ev - 1])
                    blocks[-ev - 1] = None
                    live -= sizes[-ev - 1]
                mapped = mapped_pages(a)
                assert mapped[True] % SMALL_SEGMENT == 0 and mapped[False] % LARGE_SEGMENT == 0
                assert a.stats.reserved == mapped[True] + mapped[False] >= a.stats.allocated >= live
        except AllocatorOutOfMemory:
            assert a.capacity is not None


def page_size(a: CachingAllocator, seg: int) -> int:
    return SMALL_SEGMENT if a._segments[seg][1] else LARGE_SEGMENT


def pages(a: CachingAllocator, block) -> range:
    """The page numbers ``block`` touches in its segment."""
    page = page_size(a, block.seg)
    return range(block.offset // page, -(-(block.offset + block.size) // page))


def test_pages_are_mapped_as_a_request_needs_them():
    """Large pool, 20 MiB pages: 3 MiB maps one page; 50 MiB maps three (60 MiB; the default allocator's
    segment is the request rounded to 2 MiB, 50 MiB); the next 10 MiB fits the 10 MiB left in the third page;
    a request larger than the free tail maps only the missing pages (30 MiB, then 25 MiB: 40 + 20 MiB).
    Small pool, 2 MiB pages: 1 MiB, 1 MiB and 512 B map two pages."""
    assert replay([3 * MiB], conf=EXPANDABLE).peak_reserved == 20 * MiB
    assert (replay([50 * MiB], conf=EXPANDABLE).peak_reserved, replay([50 * MiB]).peak_reserved) == (60 * MiB, 50 * MiB)
    st = replay([50 * MiB, 10 * MiB], conf=EXPANDABLE)
    assert (st.peak_reserved, st.peak_allocated) == (60 * MiB, 60 * MiB)
    a = run([30 * MiB, 25 * MiB])
    assert (a.stats.reserved, a.stats.allocated, a.stats.segments) == (60 * MiB, 55 * MiB, 1)
    assert replay([MiB, MiB, 512], conf=EXPANDABLE).peak_reserved == 2 * SMALL_SEGMENT


def test_a_segment_grows_where_the_default_allocator_needs_a_new_one():
    """12 MiB freed, then 14 MiB: the default allocator caches the 12 MiB segment and adds a 14 MiB one (26
    MiB); the expandable segment's one 20 MiB page serves both in turn. 30 MiB freed, then 50 MiB: the free
    range at the end of the mapped pages grows by one page (60 MiB) instead of 30 + 50 MiB."""
    assert replay([12 * MiB, -1, 14 * MiB]).peak_reserved == 26 * MiB
    assert replay([12 * MiB, -1, 14 * MiB], conf=EXPANDABLE).peak_reserved == 20 * MiB
    assert replay([30 * MiB, -1, 50 * MiB]).peak_reserved == 80 * MiB
    assert replay([30 * MiB, -1, 50 * MiB], conf=EXPANDABLE).peak_reserved == 60 * MiB


def test_every_remainder_of_512_bytes_is_split_off():
    """should_split with expandable segments: remaining >= 512 B in the large pool too, where the default
    allocator keeps a remainder of up to 1 MiB in the block."""
    assert run([20 * MiB - 512]).stats.allocated == 20 * MiB - 512
    assert run([20 * MiB - 512], conf="").stats.allocated == 20 * MiB


def test_best_fit_prefers_a_block_that_cannot_grow():
    """Free: an 8 MiB hole between live blocks and the 4 MiB at the end of the mapped page. A 3 MiB request
    takes the hole (the end block counts as large as it can grow: get_free_block's expandable_size)."""
    a = run([4 * MiB, 8 * MiB, 4 * MiB, -2])
    assert a.malloc(3 * MiB).offset == 4 * MiB
    assert a.stats.reserved == 20 * MiB


def test_empty_cache_unmaps_the_whole_free_pages_and_a_request_maps_them_again():
    """Three 30 MiB tensors span [0, 90) MiB of five 20 MiB pages; the middle one freed leaves [30, 60) free,
    which holds one whole page, [40, 60): empty_cache unmaps it (100 -> 80 MiB; the free 10 MiB at the end is
    no whole page). The default allocator releases the middle tensor's own segment (90 -> 60 MiB). Then 20 MiB
    goes at the lowest address where free and unmapped space hold it: [30, 50), mapping the page again."""
    a = run([30 * MiB, 30 * MiB, 30 * MiB, -2])
    assert a.stats.reserved == 100 * MiB
    a.release_cache()
    assert a.stats.reserved == 80 * MiB and sorted(a._unmapped[0]) == [40 * MiB, 100 * MiB]
    assert run([30 * MiB, 30 * MiB, 30 * MiB, -2, 0], conf="").stats.reserved == 60 * MiB
    b = a.malloc(20 * MiB)
    assert (b.offset, a.stats.reserved) == (30 * MiB, 100 * MiB)


def test_at_the_capacity_free_pages_are_unmapped_before_out_of_memory():
    """30 MiB and 10 MiB live on two pages; the 30 MiB freed. 35 MiB does not fit the free 30 MiB and would map
    two more pages (80 MiB): over a 60 MiB capacity the free page [0, 20) is unmapped first (20 + 40 MiB fit).
    Under 50 MiB even that is too much: out of memory."""
    events = [30 * MiB, 10 * MiB, -1, 35 * MiB]
    st = replay(events, capacity_bytes=60 * MiB, conf=EXPANDABLE)
    assert (st.reserved, st.peak_reserved) == (60 * MiB, 60 * MiB)
    with pytest.raises(AllocatorOutOfMemory):
        replay(events, capacity_bytes=50 * MiB, conf=EXPANDABLE)


# -- max_split_size_mb


def test_blocks_of_max_split_size_are_not_split_and_serve_only_near_sizes():
    """With max_split_size_mb:64 a cached 100 MiB block serves neither a 30 MiB request (below 64 MiB) nor a
    70 MiB one (100 >= 70 + 20), only one of 81-100 MiB, whole; the default allocator splits it for all three."""
    for request, default, limited in ((30, 100, 130), (70, 100, 170), (90, 100, 100)):
        events = [100 * MiB, -1, request * MiB]
        assert replay(events).peak_reserved == default * MiB
        st = replay(events, conf="max_split_size_mb:64")
        assert st.peak_reserved == limited * MiB
    assert run([100 * MiB, -1, 90 * MiB], conf="max_split_size_mb:64").stats.allocated == 100 * MiB


def test_at_the_capacity_oversize_blocks_go_first():
    """Cached: a 100 MiB block (>= max_split_size 64 MiB) and a 30 MiB one. 80 MiB may not take the 100 MiB
    block (100 >= 80 + 20), and a new segment would pass a 200 MiB capacity: the 100 MiB block is released
    (release_available_cached_blocks) and the 30 MiB one stays cached."""
    st = replay([100 * MiB, 30 * MiB, -1, -2, 80 * MiB], capacity_bytes=200 * MiB, conf="max_split_size_mb:64")
    assert (st.reserved, st.segments) == (110 * MiB, 2)


def test_the_default_settings_are_the_default_allocator():
    """"" and expandable_segments:False replay random sequences exactly as the allocator without settings."""
    rng = random.Random(7)
    for _ in range(30):
        events = random_events(rng, 200)
        stats = [replay(events, held=[8 * MiB], conf=c) for c in (allocator.DEFAULT_CONF, "", "expandable_segments:False")]
        assert stats[0] == stats[1] == stats[2]


# -- the workload field


def test_the_field_is_validated_and_canonical():
    """Keys sorted, spaces dropped, PyTorch's defaults left out ("default" and expandable_segments:False are "");
    a key the model does not know, a value PyTorch refuses or a key given twice is a SpecError naming it."""
    assert Workload(model="m:f").alloc_conf == ""
    w = Workload(model="m:f", alloc_conf=" max_split_size_mb: 128, expandable_segments:True")
    assert w.alloc_conf == "expandable_segments:True,max_split_size_mb:128"
    assert w == Workload(model="m:f", alloc_conf="expandable_segments:True,max_split_size_mb:128")
    assert "expandable_segments:True,max_split_size_mb:128" in w.label()
    for same in ("default", "expandable_segments:False", ""):
        assert Workload(model="m:f", alloc_conf=same).alloc_conf == ""
    assert Workload(model="m:f", alloc_conf="garbage_collection_threshold:0.60").alloc_conf == \
        "garbage_collection_threshold:0.6"
    for bad, match in (("roundup_power2_divisions:4", "roundup_power2_divisions is not a setting"),
                       ("expandable_segments:true", "must be True or False"),
                       ("max_split_size_mb:19", "must be an integer >= 20"),
                       ("garbage_collection_threshold:1.0", "between 0 and 1"),
                       ("max_split_size_mb:64,max_split_size_mb:128", "given twice"),
                       ("expandable_segments", "is not KEY:VALUE"), (True, "must be a string")):
        with pytest.raises(SpecError, match=f"alloc_conf={bad!r}.*{match}"):
            Workload(model="m:f", alloc_conf=bad)


def test_the_field_in_the_key_job_files_flags_and_old_tables(tmp_path):
    """Its own key column (equal settings, one key); a list in a job file (equal settings once); sweep's flag
    takes a ';'-separated list (the values hold commas), autobatch's and lookup's one value; a table written
    before the field existed, and an empty cell, read as the default."""
    assert "alloc_conf" in table.KEY and spec.LEGACY["alloc_conf"] == ""
    info = simdevice.SimulatedBackend("T4").info()
    keys = {table.row_key(info, Workload(model="m:f", alloc_conf=c), 0.8)
            for c in ("", "default", EXPANDABLE, " expandable_segments:True")}
    assert len(keys) == 2
    j = job.from_dict({"sweep": {"models": ["m:f"], "imgsz": [64],
                                 "alloc_conf": ["", EXPANDABLE, "expandable_segments:True ", "max_split_size_mb:128"]}},
                      "t.toml")
    assert sorted(w.alloc_conf for w in j.sweep.workloads()) == ["", EXPANDABLE, "max_split_size_mb:128"]
    parser = cli.build_parser()
    args = parser.parse_args(["sweep", "--alloc-conf", "default;expandable_segments:True,max_split_size_mb:128"])
    j = job.with_overrides(job.load(None), **cli.overrides_from_args(args))
    assert {w.alloc_conf for w in j.sweep.workloads()} == {"", "expandable_segments:True,max_split_size_mb:128"}
    for command in (["autobatch", "--gpu", "T4"], ["lookup", "t.csv"]):
        args = parser.parse_args([*command, "--model", "m:f", "--alloc-conf", "max_split_size_mb:128,expandable_segments:True"])
        assert cli.workload_from_args(args).alloc_conf == "expandable_segments:True,max_split_size_mb:128"
    old = tmp_path / "old.csv"
    pd.DataFrame([{"gpu_name": "Tesla T4", "gpu_total_bytes": 1, "model": "m:f", "imgsz": 64, "fraction": 0.8,
                   "batch_size": 8, "status": "ok"}]).to_csv(old, index=False)
    assert table.read(old)["alloc_conf"].tolist() == [""]
    both = tmp_path / "both.csv"
    pd.DataFrame([{"gpu_name": "Tesla T4", "gpu_total_bytes": 1, "model": "m:f", "imgsz": 64, "fraction": 0.8,
                   "batch_size": b, "status": "ok", "alloc_conf": c} for b, c in ((8, ""), (9, EXPANDABLE))]
                 ).to_csv(both, index=False)
    assert table.read(both)["alloc_conf"].tolist() == ["", EXPANDABLE]


def test_autobatch_on_a_simulated_card_replays_the_setting_and_lookup_selects_it(tmp_path, capsys):
    """The same workload with the default allocator and with expandable segments on a simulated T4: each row
    records its setting, the probes the two share reserve differently (the replay used the setting), and
    `lookup --alloc-conf` answers each row's batch (the default when the flag is left out)."""
    results = {c: orchestrator.autobatch("torchvision:mobilenet_v3_small", 224, 0.5, gpu="T4", alloc_conf=c)
               for c in ("", EXPANDABLE)}
    rows = [table.decision_row(r) for r in results.values()]
    assert [(r["alloc_conf"], r["status"]) for r in rows] == [("", "ok"), (EXPANDABLE, "ok")]
    peaks = [{p.batch: p.peak_bytes for p in r.decision.probes} for r in results.values()]
    shared = set(peaks[0]) & set(peaks[1])
    assert shared and all(peaks[0][b] != peaks[1][b] for b in shared)
    path = tmp_path / "t.csv"
    table.write_rows(path, rows)
    base = ["lookup", str(path), "--model", "torchvision:mobilenet_v3_small", "--imgsz", "224", "--gpu", "T4"]
    for flags, row in (([], rows[0]), (["--alloc-conf", EXPANDABLE], rows[1]), (["--alloc-conf", "default"], rows[0])):
        assert cli.main(base + flags) == 0
        assert capsys.readouterr().out.strip() == str(row["batch_size"])
    assert cli.main(base + ["--alloc-conf", "max_split_size_mb:128"]) == 2
    err = capsys.readouterr().err
    assert "alloc_conf='max_split_size_mb:128' is not in" in err and EXPANDABLE in err and "''" in err


# -- the CUDA path (no GPU here: torch's allocator calls are stand-ins)


def test_settings_handed_to_pytorch_always_name_expandable_segments():
    """Each parse resets the other settings but keeps expandable_segments as it was: it is always named."""
    assert cuda.settings_text("") == "expandable_segments:False"
    assert cuda.settings_text("max_split_size_mb:128") == "expandable_segments:False,max_split_size_mb:128"
    assert cuda.settings_text(EXPANDABLE) == EXPANDABLE


class FakeAllocator:
    """Stands in for torch's caching allocator: its last settings text, what it reserves, what was set."""

    def __init__(self, monkeypatch, current: str, reserved: int):
        self.current, self.reserved, self.set = current, reserved, []
        monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: self.current, raising=False)
        monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", self.set.append, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None, raising=False)
        monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)


def test_the_cuda_path_sets_the_workloads_allocator_settings_only_where_that_equals_a_fresh_process(monkeypatch):
    """Nothing to do when the process runs with the setting already; a change while the allocator holds no
    segment, put back afterwards; a change while it holds memory is refused (PyTorch keeps using old segments)."""
    dev = torch.device("cuda", 0)
    fake = FakeAllocator(monkeypatch, "max_split_size_mb:128", 0)
    assert cuda.allocator_settings("max_split_size_mb:128", dev) is None and fake.set == []
    fake = FakeAllocator(monkeypatch, "", 0)
    put_back = cuda.allocator_settings(EXPANDABLE, dev)
    assert fake.set == [EXPANDABLE]
    put_back()
    assert fake.set == [EXPANDABLE, "expandable_segments:False"]
    fake = FakeAllocator(monkeypatch, EXPANDABLE, 64 * MiB)
    with pytest.raises(RuntimeError, match="fresh process started with PYTORCH_CUDA_ALLOC_CONF='expandable_segments:False'"):
        cuda.allocator_settings("", dev)
    assert fake.set == []


def test_the_benchmark_on_a_tiny_grid(tmp_path):
    """benchmarks/expandable_segments.py: one row per setting with the answer, the overhead at the default's
    answer and a reason that compares with the default row; its files written with the columns."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside the package
    from benchmarks import expandable_segments as bench

    rows = bench.run([("tiny_models:tiny", 64)], ["T4"], ["", EXPANDABLE])
    assert [r["alloc_conf"] for r in rows] == ["default", EXPANDABLE]
    assert rows[0]["at_batch"] == rows[1]["at_batch"] == rows[0]["batch"] > 0
    assert all(r["reserved_gib"] >= r["tensors_gib"] for r in rows)
    assert f"instead of {rows[0]['overhead_gib']}" in rows[1]["reason"]
    assert bench.main(["--quick", "--out", str(tmp_path), "--confs", "default;expandable_segments:True"]) == 0
    assert (tmp_path / "expandable_segments_quick.csv").read_text().splitlines()[0] == ",".join(bench.COLUMNS)
