"""ultralytics with the table's batch size (extra ``yolo``).

ultralytics' ``batch`` is the GLOBAL batch: under DDP (``device="0,1,2,3"``) its trainer
gives each rank ``batch // world_size`` images (``BaseTrainer._build_train_pipeline``), so
``table_batch`` answers per-rank batch x ranks. ``batch=-1`` runs AutoBatch, on one GPU only
(ultralytics refuses it under DDP); ``table_trainer`` makes a trainer that reads the table
there instead.

    from orchestrator.integrations.ultralytics import table_batch, table_trainer
    model.train(data="coco.yaml", imgsz=640, batch=table_batch(TABLE, "yolov8s.yaml", 640, gpu="A10G"))
    model.train(data="coco.yaml", imgsz=640, batch=-1, trainer=table_trainer(TABLE))
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from ..spec import OPTIMIZERS
from . import per_rank_batch

log = logging.getLogger(__name__)


def model_name(model: str | os.PathLike) -> str:
    """The table's model key for what ultralytics is given: ``yolov8s.yaml`` -> ``ultralytics:yolov8s.yaml``;
    weights name their architecture (``yolov8s.pt`` -> ``ultralytics:yolov8s.yaml``: memory does not depend on
    weight values); a path keeps only its file name, as the sweep names the packaged yaml; ``SOURCE:NAME`` is kept."""
    text = os.fspath(model)
    if ":" in text and not Path(text).exists():
        return text
    name = Path(text).name
    return f"ultralytics:{Path(name).stem}.yaml" if name.endswith(".pt") else f"ultralytics:{name}"


def table_batch(table: str | os.PathLike, model: str, imgsz: int | None = None, *, gpu=None, fraction: float | None = None,
                world_size: int = 1, **fields) -> int:
    """ultralytics' ``batch`` for ``model`` at ``imgsz``: the table's per-rank answer x ``world_size``.

    ``world_size``: the number of devices in ultralytics' ``device`` ("0,1,2,3" is 4); 1 for one
    GPU. ``gpu``, ``fraction``, ``data`` and ``fields``: as in ``orchestrator.lookup``
    (``gpu=None``: the current CUDA device). Raises ``NoAnswer`` when the table has no row.
    """
    per_rank = per_rank_batch(table, model_name(model), imgsz, gpu=gpu, fraction=fraction,
                              world_size=world_size, **fields)
    return per_rank * world_size


def workload_fields(trainer) -> dict:
    """The workload an ultralytics trainer is about to train: model, image size (the largest
    multi-scale size, as its AutoBatch measures), precision, optimizer and nominal batch."""
    args = trainer.args
    imgsz = math.ceil(args.imgsz * (1 + args.multi_scale) / trainer.stride) * trainer.stride
    precision = "bf16" if args.amp == "bf16" else "fp16" if trainer.amp else "fp32"
    optimizer = args.optimizer if args.optimizer in OPTIMIZERS else "AdamW"
    if optimizer != args.optimizer:  # "auto": AdamW under 10,000 iterations, else MuSGD, which no table measures
        log.info("optimizer=%s is read as AdamW's row (2 state tensors per weight); pass optimizer= to read "
                 "another", args.optimizer)
    return {"model": model_name(args.model), "imgsz": imgsz, "precision": precision, "optimizer": optimizer,
            "nbs": args.nbs}


def table_trainer(table: str | os.PathLike, *, gpu=None, fraction: float | None = None, base: type | None = None,
                  **fields) -> type:
    """A trainer class (for ``model.train(..., batch=-1, trainer=...)``) that reads its batch from
    ``table`` where ``batch=-1`` would run AutoBatch: one GPU (or ``gpu=`` a card of the table).

    ``base``: the trainer to extend (default: ``DetectionTrainer``). Model, image size,
    precision, optimizer and ``nbs`` come from the trainer's own arguments; ``fields`` set the
    others as the table was swept (``classes``, ``objects``, ``ema``, ``data=`` the data yaml, ...)
    or override those. No row: ``NoAnswer`` (its one line) from ``model.train``, nothing trained.
    Under DDP ultralytics refuses ``batch=-1``: pass ``batch=table_batch(..., world_size=N)``.
    """
    if base is None:
        from ultralytics.models.yolo.detect import DetectionTrainer as base  # noqa: PLC0415, N813

    def auto_batch(self, *_args, **_kwargs) -> int:
        found = {**workload_fields(self), **fields}
        batch = per_rank_batch(table, found.pop("model"), found.pop("imgsz"), gpu=gpu, fraction=fraction, **found)
        log.info("batch %d from the table, instead of AutoBatch", batch)
        return batch

    return type(f"Table{base.__name__}", (base,), {"auto_batch": auto_batch, "__module__": __name__})
