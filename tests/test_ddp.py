"""DDP in the measured step (issue 14): the simulated reducer against real DistributedDataParallel
on the CPU (gloo), NCCL's buffers outside the allocator, and per-rank answers from the table."""
import functools
import json
import warnings

import pytest
import torch
import torch.distributed as dist

from orchestrator import answers, catalog, cuda, ddp, models, simdevice, simulated, step
from orchestrator.engine import decide_on
from orchestrator.spec import Workload

# (model, imgsz, precision, optimizer, world_size, batch): two models, both precisions and optimizers
CASES = [("tiny_models:tiny", 32, "fp32", "SGD", 2, 4), ("tiny_models:tiny_wide", 32, "fp16", "AdamW", 2, 4)]


def _real_peaks(tmp_path, world: int) -> list[list[int]]:
    """Each rank's peak live tensor bytes of every case, run under a real ``world``-rank gloo DDP job: one rank
    in this process, on the CUDA backend's one-rank group (``cuda.one_rank_group``, gone afterwards); more
    in processes of their own (tests/ddp_ranks.py)."""
    import ddp_ranks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # find_unused_parameters finds none: DDP says so
        if world == 1:
            ddp_ranks.rank_peaks(0, 1, "", str(tmp_path), CASES)
        else:
            torch.multiprocessing.spawn(ddp_ranks.rank_peaks, nprocs=world, join=True,
                                        args=(world, str(tmp_path / "store"), str(tmp_path), CASES))
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]



@functools.cache
def _simulated_peak(case) -> int:
    model, imgsz, precision, optimizer, world_size, batch = case
    w = Workload(model=model, imgsz=imgsz, precision=precision, optimizer=optimizer, world_size=world_size)
    return simulated.tensor_peak(simulated.trace(models.build(w), w, batch))


@pytest.mark.parametrize("world", [1, 2])
def test_real_ddp_step_and_simulated_step_agree_on_every_rank(tmp_path, world):
    """Each rank of a real gloo DDP job (1 rank: the CUDA backend's one-rank group; 2 ranks) peaks at the
    simulated DDP step's live tensor bytes within 0.1% (issue 14 asks 2%; they differ by a few hundred bytes:
    the reducer's host-side map of used parameters, 4 B each, pinned host memory on a GPU, and scalars), and
    above the step without DDP by at least the gradients' copy in the buckets."""
    ranks = _real_peaks(tmp_path, world)
    real = [r["peaks"] for r in ranks]
    for r, said in enumerate(r["refused"] for r in ranks):  # inside a real job no rank measures on a group of its own
        assert (f"rank {r} of a 2-rank job" in said) if world == 2 else said == ""
    for i, case in enumerate(CASES):
        fake = _simulated_peak(case)
        without = _simulated_peak(case[:4] + (1,) + case[5:])
        params = sum(p.numel() * p.element_size() for p in models.build(Workload(model=case[0])).module.parameters())
        for rank_peaks in real:
            assert abs(rank_peaks[i] - fake) <= 0.001 * fake, (case, rank_peaks[i], fake)
        assert fake - without >= params, (case, fake, without, params)


def test_bucket_assignment_is_c10ds():
    """The buckets the simulated reducer allocates are the ones c10d computes for the same parameters
    (first bucket 1 MiB, then 25 MiB, per dtype), mixed dtypes included."""
    module = models.build(Workload(model="torchvision:resnet18", imgsz=64)).module
    params = [p.detach() for p in module.parameters()]
    params[3] = params[3].half()  # a second dtype: its own buckets
    limits = [ddp.FIRST_BUCKET_BYTES, ddp.BUCKET_CAP_BYTES]
    theirs, _ = dist._compute_bucket_assignment_by_size(params, limits)
    ours = ddp.assign_buckets([(p.dtype, p.numel() * p.element_size()) for p in params], limits)
    assert ours == [list(b) for b in theirs] and len(ours) > 3


def test_nccl_buffers_grow_with_ranks_then_level_off():
    """Nothing without DDP; more with each peer a rank receives from (ring, then tree), then the same at
    any scale; more channels (NVLink) more memory. 8 x H100 comes to the ~1.06 GB NCCL issue #1685 reports."""
    h100 = catalog.card("H100-80GB").nccl_channels
    assert ddp.comm_bytes(1, h100) == 0
    sizes = [ddp.comm_bytes(n, h100) for n in (2, 3, 4, 8, 64)]
    assert sizes[0] < sizes[1] < sizes[2] == sizes[3] == sizes[4]
    assert ddp.comm_bytes(8, catalog.card("T4").nccl_channels) < ddp.comm_bytes(8, h100)
    assert 1.0e9 < ddp.comm_bytes(8, h100) < 1.2e9


def test_ddp_answer_is_below_the_single_process_one_by_the_overhead(profiles):
    """On a simulated card the DDP rank's budget is smaller by NCCL's buffers, its peak larger by the
    reducer's buckets, and its batch smaller: per sample, the answer drops by about that overhead."""
    one = Workload(model="tiny_models:tiny", imgsz=384, precision="fp32")
    eight = Workload(model="tiny_models:tiny", imgsz=384, precision="fp32", world_size=8)
    card = catalog.card("T4")
    results = {}
    for w in (one, eight):
        backend = simdevice.SimulatedBackend("T4")
        backend.add_profile(profiles(w))
        results[w.world_size] = decide_on(backend, w, 0.8)
    r1, r8 = results[1], results[8]
    comm = ddp.comm_bytes(8, card.nccl_channels)
    assert r8.device.outside_bytes == r1.device.outside_bytes + comm
    assert r8.decision.budget_bytes == r1.decision.budget_bytes - comm
    buckets = sum(p.numel() * 4 for p in models.build(one).module.parameters())
    per_sample = r1.decision.bytes_per_sample
    expected_drop = (comm + buckets) / per_sample
    drop = r1.decision.batch_size - r8.decision.batch_size
    assert drop > 0 and abs(drop - expected_drop) <= 0.1 * expected_drop + 2, (drop, expected_drop)


def test_the_other_ranks_buffers_are_the_cards_nccl_channels_for_the_other_ranks():
    """What the CUDA path adds for the ranks one process cannot see: none without DDP; the catalog's channels
    for a known card (found by the name and total it reports), the catalog's most for an unknown one."""
    t4 = catalog.card("T4")
    w8 = Workload(model="tiny_models:tiny", imgsz=32, world_size=8)
    assert cuda.other_ranks_bytes(Workload(model="tiny_models:tiny", imgsz=32), t4.name, t4.total_bytes) == 0
    assert cuda.other_ranks_bytes(w8, t4.name, t4.total_bytes) == ddp.peer_bytes(8, t4.nccl_channels) > 0
    most = max(c.nccl_channels for c in catalog.CATALOG.values())
    assert cuda.other_ranks_bytes(w8, "NVIDIA B200", 190 * 2**30) == ddp.peer_bytes(8, most)
    assert most > t4.nccl_channels


def test_the_real_device_measurer_runs_real_ddp_and_adds_the_other_ranks_buffers():
    """The CUDA path's measurer as ``CudaBackend.measurer`` makes it (``step_measurer``, here on the CPU with
    the fake counters of test_cuda_path, for a device reporting itself as a T4): on the one-rank group it
    makes, the real DDP step runs, and memory outside the allocator is what the device shows plus NCCL's
    receive buffers for the other 7 ranks."""
    import inspect

    from test_cuda_path import CpuCounters

    w = Workload(model="tiny_models:tiny", imgsz=32, world_size=8)
    t4 = catalog.card("T4")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = cuda.step_measurer(torch.device("cpu"), w, CpuCounters(), t4.name, t4.total_bytes)
            measured = m(4)
    finally:
        dist.destroy_process_group()
    extra = ddp.peer_bytes(8, t4.nccl_channels)
    assert measured.outside_bytes == m.outside_bytes == extra == 4 * 3 * 10 * 2**20
    # the GPU-only lines that hand the card's name and memory to it: read here, run on a GPU
    source = inspect.getsource(cuda.CudaBackend.measurer)
    assert "return step_measurer(self.device, workload, CudaCounters(self.device), props.name, " \
           "props.total_memory)" in source
    with pytest.raises(RuntimeError, match="needs a process group"):  # its step is the real DDP's: no group, no step
        cuda.StepMeasurer(torch.device("cpu"), w, CpuCounters(), extra_outside_bytes=extra)


def test_real_ddp_without_a_process_group_says_how_to_get_one():
    """The real step under DDP needs a process group; without one it says so (the CUDA backend makes one)."""
    w = Workload(model="tiny_models:tiny", imgsz=32, world_size=2, nbs=1, val_scale=0)
    built = models.build(w)
    with pytest.raises(RuntimeError, match="world_size=2 .*init_process_group"):
        step.train(built, w, 2, torch.device("cpu"), surrogate=True, real_ddp=True)


# -- answers for a DDP job

DDP_MODEL, DDP_IMGSZ = "tiny_models:tiny", 384
MEASURED = ("T4", "A10G")


@pytest.fixture(scope="module")
def ddp_table(tmp_path_factory, profiles):
    """A table with the same workload at world_size 1 and 8 on T4 and A10G (simulated)."""
    from orchestrator import table

    rows = []
    for ws in (1, 8):
        w = Workload(model=DDP_MODEL, imgsz=DDP_IMGSZ, precision="fp32", world_size=ws)
        for card in MEASURED:
            backend = simdevice.SimulatedBackend(card)
            backend.add_profile(profiles(w))
            rows.append(table.decision_row(decide_on(backend, w, 0.8)))
    path = tmp_path_factory.mktemp("ddp") / "batch_table.csv"
    table.write_rows(path, rows)
    return path


def _ask(path, **kw):
    return answers.lookup(path, DDP_MODEL, DDP_IMGSZ, precision="fp32", **kw)


def test_lookup_answers_per_rank_for_the_job_s_ranks(ddp_table):
    """world_size picks the rows measured for that many ranks (per rank, smaller than one process's);
    ranks the table lacks are one line naming the ones it has."""
    for card in MEASURED:
        one, eight = _ask(ddp_table, gpu=card), _ask(ddp_table, gpu=card, world_size=8)
        assert not eight.extrapolated and 0 < eight.batch_size < one.batch_size
    with pytest.raises(answers.NoAnswer, match="world_size=2 is not in .* it has world_size 1, 8"):
        _ask(ddp_table, gpu="T4", world_size=2)


def test_extrapolated_ddp_answer_counts_nccl_and_stays_safe(ddp_table, profiles):
    """A card never measured (L4), under DDP: its budget loses NCCL's buffers for the ranks, and the answer
    is at most what the simulated L4 decides for that workload."""
    a = _ask(ddp_table, gpu="L4", world_size=8)
    assert a.extrapolated and "NCCL buffers for 8 ranks" in a.explanation
    w = Workload(model=DDP_MODEL, imgsz=DDP_IMGSZ, precision="fp32", world_size=8)
    backend = simdevice.SimulatedBackend("L4")
    backend.add_profile(profiles(w))
    assert 0 < a.batch_size <= decide_on(backend, w, 0.8).decision.batch_size


def test_ranks_on_two_gpu_types_take_the_smallest_answer(ddp_table):
    """'A10G x4, T4 x4': 8 ranks; the per-rank batch is the T4's (the smaller card), the global batch 8x."""
    r = answers.lookup_ranks(ddp_table, DDP_MODEL, DDP_IMGSZ, gpus="A10G x4, T4 x4", precision="fp32")
    t4 = _ask(ddp_table, gpu="T4", world_size=8).batch_size
    assert (r.batch_size, r.global_batch, r.world_size, r.limiting) == (t4, 8 * t4, 8, "T4")
    assert r.answers["A10G"].batch_size > t4
    with pytest.raises(answers.SpecError, match="world_size=4 but gpus='A10G x4, T4 x4' holds 8 ranks"):
        answers.lookup_ranks(ddp_table, DDP_MODEL, DDP_IMGSZ, gpus="A10G x4, T4 x4", world_size=4, precision="fp32")


def test_cli_gpus_prints_the_per_rank_batch_and_says_what_limits_it(ddp_table, capsys):
    """stdout: the per-rank integer; stderr: the global batch and the limiting card. A card the table lacks
    (--measured-only) or a --world-size that is not the total: exit 2, one line, nothing on stdout."""
    from orchestrator import cli

    base = ["lookup", str(ddp_table), "--model", DDP_MODEL, "--imgsz", str(DDP_IMGSZ), "--precision", "fp32"]
    assert cli.main(base + ["--gpus", "A10G x4, T4 x4", "--world-size", "8"]) == 0
    out, err = capsys.readouterr()
    t4 = _ask(ddp_table, gpu="T4", world_size=8).batch_size
    assert out == f"{t4}\n"
    assert "limited by T4" in err and f"global batch {8 * t4} = {t4} x 8 ranks" in err
    for extra in (["--gpus", "A10G x4, L4 x4", "--measured-only"], ["--gpus", "A10G x4, T4 x4", "--world-size", "4"]):
        assert cli.main(base + extra) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err


def test_a_job_sweeps_world_size_like_any_field(tmp_path):
    """`world_size = [1, 8]` in [sweep] gives a workload per value; world_size 0 is one line naming it."""
    from orchestrator import job

    path = tmp_path / "ddp.toml"
    path.write_text('[sweep]\nworld_size = [1, 8]\n[[sweep.grid]]\nmodels = ["tiny_models:tiny"]\nimgsz = [32]\n')
    assert sorted(w.world_size for w in job.load(path).sweep.workloads()) == [1, 8]
    path.write_text('[sweep]\nworld_size = 0\n[[sweep.grid]]\nmodels = ["tiny_models:tiny"]\nimgsz = [32]\n')
    with pytest.raises(answers.SpecError, match="world_size=0 must be a positive integer"):
        job.load(path)
