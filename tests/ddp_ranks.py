"""One rank of a real DistributedDataParallel job on the CPU (gloo), run by tests/test_ddp.py through
torch.multiprocessing.spawn: the measured step under the real DDP, its live tensor bytes traced."""
import json
import os

import torch
import torch.distributed as dist


def rank_peaks(rank: int, world: int, store_path: str, out_dir: str, cases: list) -> None:
    """For each (model, imgsz, precision, optimizer, world_size, batch) in ``cases``: the peak live tensor bytes
    of ``step.train`` on real CPU tensors under the real DDP, written to ``out_dir/rank{rank}.json`` with what
    ``cuda.one_rank_group`` said when asked for a group of its own inside the job. A one-rank job makes its
    group as the CUDA backend does (``cuda.one_rank_group``)."""
    torch.set_num_threads(1)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from orchestrator import cuda, models, simulated
    from orchestrator.spec import Workload

    refused = ""
    if world == 1:
        cuda.one_rank_group(torch.device("cpu"))
    else:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
        try:  # a rank of a real job must not make (or use) a group of its own for measuring
            cuda.one_rank_group(torch.device("cpu"))
        except RuntimeError as e:
            refused = str(e)
    try:
        assert dist.get_world_size() == world
        peaks = []
        for model, imgsz, precision, optimizer, world_size, batch in cases:
            w = Workload(model=model, imgsz=imgsz, precision=precision, optimizer=optimizer, world_size=world_size)
            events = simulated.trace(models.build(w), w, batch, fake=False, surrogate=True, real_ddp=True)
            peaks.append(simulated.tensor_peak(events))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"peaks": peaks, "refused": refused}, f)
    finally:
        dist.destroy_process_group()
