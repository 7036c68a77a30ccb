"""The table inside trainers: each module here is a few lines for one trainer's user.

- ``orchestrator.integrations.ultralytics``: ``table_batch`` (ultralytics' ``batch``: global
  under DDP) and ``table_trainer`` (a trainer whose ``batch=-1`` reads the table instead of
  running AutoBatch); extra ``yolo``.
- ``orchestrator.integrations.lightning``: ``TableBatchSize``, a ``Callback`` that sets the
  module's or datamodule's ``batch_size`` in ``setup``, the minimum over ranks; extra ``lightning``.
- ``orchestrator.integrations.accelerate``: ``find_executable_batch_size`` started at the
  table's answer; extra ``accelerate``.
- ``orchestrator.integrations.ray_train``: ``worker_batch_size`` inside ``train_loop_per_worker``,
  the minimum over workers; extra ``ray-train``.

Each trainer's package is imported by its module only, so importing ``orchestrator`` or
this package imports none of them. What is shared lives here: the per-rank answer and the
agreement between ranks.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


def per_rank_batch(table, model: str, imgsz: int | None = None, *, gpu=None,
                   fraction: float | None = None, world_size: int = 1, data: str | os.PathLike | None = None,
                   **fields) -> int:
    """The batch size one rank of a ``world_size``-rank job trains with, read from ``table`` (a path, or
    the DataFrame ``orchestrator.table.read`` returns: hand that to workers on other machines).

    ``gpu``: as in ``orchestrator.lookup`` (None: this process's current CUDA device, so each
    rank reads its own card). ``world_size`` > 1 reads the rows measured under
    DistributedDataParallel with that many ranks (1: one process, no DDP). ``data``: an
    ultralytics data yaml whose objects and classes select the row, as ``--data`` does for
    ``sweep`` and ``lookup``. ``fields``: the other workload fields as the table was swept.
    Raises ``NoAnswer`` (one line: what is missing, what the table has) when there is no row.
    """
    from ..answers import lookup  # noqa: PLC0415 (pandas: only when a trainer asks)

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        from ..spec import SpecError  # noqa: PLC0415

        raise SpecError(f"world_size={world_size!r} must be a positive int: the number of ranks (1 without DDP)")
    if data is not None:
        from ..datasets import with_data  # noqa: PLC0415

        fields = with_data(fields, os.fspath(data), "")
    if world_size > 1:  # the key exists only for DDP rows: a table without them still answers one process
        fields["world_size"] = world_size
    answer = lookup(table, model, imgsz, gpu, fraction=fraction, **fields)
    log.info("%s", answer.explanation)
    return answer.batch_size


def agreed_batch(table, model: str, imgsz: int | None = None, *, reduce_min: Callable[[int], int] | None = None,
                 **kwargs) -> int:
    """``per_rank_batch`` on every rank, then the smallest over ranks (``reduce_min``: a rank's answer
    to the minimum over all; default ``min_over_ranks``). Every rank takes part even when its own
    card has no row (it offers 0), so that no rank waits forever in the collective: then every rank
    raises, the one without a row its own ``NoAnswer``, the others one saying another rank had none."""
    from .. import families  # noqa: PLC0415
    from ..answers import NoAnswer  # noqa: PLC0415
    from ..spec import DEFAULTS, SIZES, SpecError  # noqa: PLC0415

    try:
        mine, failed = per_rank_batch(table, model, imgsz, **kwargs), None
    except SpecError as e:
        mine, failed = 0, e
    agreed = (reduce_min or min_over_ranks)(mine)
    if failed is not None:
        raise failed
    if agreed < 1:
        at = f"{imgsz or DEFAULTS['imgsz']} px" if families.family_of(model).size == "imgsz" else ", ".join(
            f"{k} {v}" for k, v in kwargs.items() if k in SIZES)
        raise NoAnswer(f"another rank has no batch size for {model} at {at} in the table (its error names "
                       "what is missing); every rank stops")
    return agreed


def process_group_size() -> int:
    """Ranks in the ``torch.distributed`` process group (the DDP job); 1 when there is none."""
    import torch.distributed as dist  # noqa: PLC0415

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def min_over_ranks(batch_size: int) -> int:
    """The smallest of every rank's ``batch_size`` when a ``torch.distributed`` process group is up
    (each rank calls this with its own answer, so every rank trains with one that fits all);
    ``batch_size`` itself otherwise."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()):
        return batch_size
    # NCCL reduces CUDA tensors only, gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([batch_size], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
