"""accelerate with the table's batch size (extra ``accelerate``).

``find_executable_batch_size`` is accelerate's decorator started at the table's answer
instead of a guess: the first try is a batch measured to fit, and an out-of-memory (a card
busier than when it was measured) still steps down as accelerate does (x 0.9 per failure).
The batch is per process; with a process group up every process starts at the smallest answer.

    @find_executable_batch_size(TABLE, "timm:resnet50", 224)
    def train(batch_size): ...
    train()
"""
from __future__ import annotations

import functools
import os

from accelerate.utils import find_executable_batch_size as _accelerate_find

from . import agreed_batch, process_group_size


def find_executable_batch_size(table: str | os.PathLike, model: str, imgsz: int | None = None, *, gpu=None,
                               fraction: float | None = None, **fields):
    """A decorator: accelerate's ``find_executable_batch_size`` with ``starting_batch_size`` read from
    ``table`` when the function is called, after ``Accelerator()`` has set up the device and the
    process group: the rows for that many processes (DDP), the current CUDA device when ``gpu`` is
    None. The other arguments select the row as in ``orchestrator.lookup``; no row: ``NoAnswer``
    from the call."""

    def decorate(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            start = agreed_batch(table, model, imgsz, gpu=gpu, fraction=fraction,
                                 world_size=process_group_size(), **fields)
            return _accelerate_find(function, starting_batch_size=start)(*args, **kwargs)

        return run

    return decorate
