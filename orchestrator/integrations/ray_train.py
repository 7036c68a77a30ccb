"""Ray Train with the table's batch size (extra ``ray-train``).

Inside ``train_loop_per_worker``, ``worker_batch_size`` is the batch each worker loads (per
rank under DDP): each worker reads its own card (Ray Train sets the current CUDA device)
and all take the smallest, agreed over the process group ``TorchTrainer`` set up.

    def train_loop_per_worker(config):
        batch_size = worker_batch_size(config["table"], "timm:resnet50", 224)  # table.read(path) on the driver
        loader = DataLoader(dataset, batch_size=batch_size)
"""
from __future__ import annotations

import ray.train

from . import agreed_batch


def worker_batch_size(table, model: str, imgsz: int | None = None, *, gpu=None,
                      fraction: float | None = None, **fields) -> int:
    """This worker's batch size: the table's answer for its card (``gpu`` None: the current CUDA
    device; or a card of the table; ``table``: a path every worker can read, or the DataFrame
    ``orchestrator.table.read`` returns, passed in ``train_loop_config``), for a job of ``get_world_size()`` workers, the minimum over
    workers. Call it in every worker (it is a collective when there are several). No row for any
    worker's card: ``NoAnswer`` on every worker."""
    world_size = ray.train.get_context().get_world_size()
    return agreed_batch(table, model, imgsz, gpu=gpu, fraction=fraction, world_size=world_size, **fields)
