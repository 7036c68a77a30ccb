"""Lightning with the table's batch size (extra ``lightning``).

``TableBatchSize`` sets ``batch_size`` (per rank: each DDP process loads that many) on the
LightningModule, its ``hparams`` or the LightningDataModule, where Lightning's own
``BatchSizeFinder`` would, in ``setup``: before any dataloader is built. Every rank reads
its own card and all train with the smallest answer, so the batch fits every rank.

    trainer = Trainer(devices=4, callbacks=[TableBatchSize(TABLE, "timm:convnext_tiny", 224)])
"""
from __future__ import annotations

import logging
import os

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr

from ..spec import SpecError
from . import agreed_batch

log = logging.getLogger(__name__)


class TableBatchSize(Callback):
    """Set the ``attr`` (``batch_size``) of the module or datamodule from the table, the minimum over ranks."""

    def __init__(self, table: str | os.PathLike, model: str, imgsz: int | None = None, *, gpu=None,
                 fraction: float | None = None, attr: str = "batch_size", **fields):
        """``gpu``: None for each rank's current CUDA device (Lightning sets it per rank), or a card of the
        table for every rank. ``model``, ``imgsz``, ``fraction`` and ``fields``: the table's row, as in
        ``orchestrator.lookup``. No row for any rank's card: ``NoAnswer`` from ``setup`` on every rank,
        before training starts."""
        self.table, self.model, self.imgsz, self.gpu = table, model, imgsz, gpu
        self.fraction, self.attr, self.fields = fraction, attr, fields
        self.batch_size: int | None = None
        """What this rank set: the minimum over ranks."""

    def card(self, trainer) -> str | int | float | None:
        """The card this rank reads from the table: ``gpu`` as given (None: the current CUDA device)."""
        return self.gpu

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not lightning_hasattr(pl_module, self.attr):
            raise SpecError(f"TableBatchSize: {type(pl_module).__name__} and its datamodule have no {self.attr!r}: "
                            f"give one of them `self.{self.attr}` and read it in its dataloaders, or pass attr=")

        def reduce_min(mine: int) -> int:  # through the strategy: whatever backend it runs
            value = torch.tensor(mine, dtype=torch.int64, device=trainer.strategy.root_device)
            return int(trainer.strategy.reduce(value, reduce_op="min").item())

        self.batch_size = agreed_batch(self.table, self.model, self.imgsz, reduce_min=reduce_min,
                                       gpu=self.card(trainer), fraction=self.fraction, world_size=trainer.world_size,
                                       **self.fields)
        lightning_setattr(pl_module, self.attr, self.batch_size)
        log.info("rank %d: %s=%d from the table, the minimum over ranks", trainer.global_rank, self.attr,
                 self.batch_size)
