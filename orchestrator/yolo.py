"""Ultralytics YOLO models (``ultralytics:FILE.yaml``): uint8 images made float on the device, and YOLO's
own loss and target assigner for each task."""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from .errors import SpecError
from .models import Built
from .spec import Workload
from .vision import images, multiple_of

YOLO_TASKS = {"": "detect", "-seg": "segment", "-pose": "pose", "-obb": "obb", "-cls": "classify"}
"""yaml name suffix -> ultralytics task; each task trains with its own model class, loss and targets."""


def yolo_task(source: str) -> str:
    """The ultralytics task a model source trains (``detect`` unless its yaml ends in -seg/-pose/-obb/-cls)."""
    stem = source.split(":", 1)[-1].rsplit(".", 1)[0]
    return next((task for suffix, task in YOLO_TASKS.items() if suffix and suffix in stem), "detect")


def build(name: str, source: str, classes: int) -> Built:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    try:
        from ultralytics.nn import tasks
    except ImportError as e:
        raise SpecError(f"model='ultralytics:{name}' needs ultralytics: pip install -e '.[yolo]'") from e
    cfg = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    task = yolo_task(cfg)
    cls = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel,
           "obb": tasks.OBBModel, "classify": tasks.ClassificationModel}[task]
    try:
        model = cls(cfg, nc=classes or None, verbose=False)  # None: the yaml's own class count
    except FileNotFoundError as e:
        raise SpecError(
            f"model='ultralytics:{name}' is not a yaml that ultralytics ships; e.g. yolov8s.yaml, yolo11n-seg.yaml, "
            "yolo11n-pose.yaml, yolov8n-obb.yaml, yolo11n-cls.yaml"
        ) from e
    if task == "classify":  # the classify trainer feeds float tensors from torchvision transforms
        return Built(model, _YoloLoss(model, task), images(), loss_note="YOLO's classification loss")
    return Built(model, _YoloLoss(model, task), images(uint8=True), multiple_of(int(model.stride.max())),
                 f"YOLO's own {task} loss and assigner", for_fake=_strides_as_numbers, data_dependent_loss=True)


def _strides_as_numbers(module: nn.Module) -> None:
    """The eval-mode head builds anchors with ``new_full(..., stride)``: a number, not a tensor, on fake copies."""
    head = module.model[-1]
    head.stride = [float(s) for s in head.stride]


class _YoloLoss:
    """YOLO's own loss for ``task`` (``v8DetectionLoss`` and its kin, target assigner included) on ``yolo_targets``.

    It indexes by data, which fake tensors cannot do: the simulator runs it on real
    tensors and splices its allocations into the trace (``Built.data_dependent_loss``),
    so ``surrogate`` changes nothing here.
    """

    def __init__(self, model, task: str = "detect"):
        self.model, self.task = model, task
        self.criterion, self._device = None, None

    def setup(self, device: torch.device) -> None:
        """Create the criterion for ``device`` (once; its own small tensors are not part of a step)."""
        if self.criterion is None or self._device != device:
            from ultralytics.cfg import get_cfg

            self.model.args = get_cfg()
            self.criterion, self._device = self.model.init_criterion(), device

    def __call__(self, outputs, workload: Workload, batch_size: int, surrogate: bool) -> torch.Tensor:
        device = next(self.model.parameters()).device
        self.setup(device)
        targets = yolo_targets(self.model, self.task, batch_size, workload.objects, workload.imgsz, device)
        loss, _ = self.criterion(outputs, targets)
        return loss.sum()


def yolo_targets(model, task: str, batch_size: int, objects: int, imgsz: int, device) -> dict:
    """The batch's labels as the trainer's loader gives them, for ``model``'s task, deterministic.

    Detection tasks: ``objects`` labels on every image (every image pads to ``objects``
    targets, as the loss pads to the busiest image), the image tiled by a grid of boxes
    so that every anchor lies in a box (the most foreground anchors without overlap);
    classes cycle. Segment adds the overlap mask (each box's region at 1/4 resolution),
    pose keypoints inside each box, obb an angle; classify one class per image.
    """
    head = model.model[-1]
    nc = getattr(head, "nc", None) or model.yaml.get("nc", 1000)
    if task == "classify":
        return {"cls": torch.arange(batch_size, device=device) % nc}
    side = math.ceil(math.sqrt(objects))
    k = torch.arange(objects, device=device)
    cx, cy = (k % side + 0.5) / side, (k // side + 0.5) / side
    wh = torch.full((objects,), 1.0 / side, device=device)
    boxes = torch.stack([cx, cy, wh, wh], 1)  # normalised xywh
    if task == "obb":
        boxes = torch.cat([boxes, torch.full((objects, 1), 0.3, device=device)], 1)  # xywhr
    out = {
        "batch_idx": torch.arange(batch_size, device=device).repeat_interleave(objects).float(),
        "cls": (k % nc).float().repeat(batch_size).view(-1, 1),
        "bboxes": boxes.repeat(batch_size, 1),
    }
    if task == "segment":  # overlap masks at 1/4 of the image: pixel -> its grid cell's instance (1-based)
        m = imgsz // 4
        cell = torch.arange(m, device=device) * side // m
        index = (cell.view(-1, 1) * side + cell.view(1, -1)) + 1
        index = torch.where(index <= objects, index, 0)
        out["masks"] = index.to(torch.uint8 if objects < 255 else torch.int32).expand(batch_size, m, m).contiguous()
    if task == "pose":
        kpts, dims = head.kpt_shape
        spread = (torch.arange(kpts, device=device) / max(kpts - 1, 1) - 0.5) * 0.8 / side
        xy = torch.stack([cx.view(-1, 1) + spread, cy.view(-1, 1) + spread.flip(0)], -1)  # (objects, kpts, 2)
        if dims == 3:
            xy = torch.cat([xy, torch.full((objects, kpts, 1), 2.0, device=device)], -1)  # visible
        out["keypoints"] = xy.repeat(batch_size, 1, 1)
    return out

