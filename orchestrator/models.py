"""Model sources: one string names an architecture and the loss its training step uses.

Models are built on the CPU with random weights (memory does not depend on weight
values); nothing is downloaded.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError
from .spec import Workload

SOURCES = ("torchvision", "timm", "ultralytics", "package.module:callable")

Loss = Callable[[object, Workload, int, bool], torch.Tensor]
"""loss(outputs, workload, batch_size, surrogate) -> scalar. ``surrogate`` is set when the step runs on fake
tensors (a loss that must index by data says so in ``Built.data_dependent_loss`` instead)."""


@dataclass
class Built:
    """A model ready to train, and how to compute its loss from its outputs."""

    module: nn.Module
    stride: int | None
    """Input sizes must be a multiple of this (None: any size)."""
    loss: Loss
    loss_note: str = ""
    uint8_input: bool = False
    """Images reach the device as uint8 and become float there (ultralytics' trainer), not as floats."""
    for_fake: Callable[[nn.Module], None] | None = None
    """Adjusts a copy of ``module`` whose weights are fake tensors (for the simulator), where the model
    reads a value out of a small tensor (YOLO's head strides) that fake tensors cannot give."""
    data_dependent_loss: bool = False
    """The real loss indexes by data (YOLO's target assigner): fake tensors cannot run it, so the
    simulator runs it on real tensors shaped like the model's outputs and splices its allocations in."""


def build(workload: Workload) -> Built:
    """Build the model ``workload`` trains, checked against its image size; SpecError for bad names or sizes."""
    built = build_source(workload.model, workload.classes)
    check_imgsz(built, workload.model, workload.imgsz)
    return built


def build_source(source: str, classes: int = 0) -> Built:
    """Build the model ``source`` names with ``classes`` outputs (0: its own); SpecError for bad names."""
    kind, _, name = source.partition(":")
    if not name:
        raise SpecError(f"model={source!r} must be SOURCE:NAME with SOURCE one of {', '.join(SOURCES)}")
    if kind == "torchvision":
        return _torchvision(name, classes)
    if kind == "timm":
        return _timm(name, classes)
    if kind == "ultralytics":
        return _ultralytics(name, classes)
    if "." in kind or kind.isidentifier():
        return _callable(kind, name, source)
    raise SpecError(f"model={source!r}: unknown source {kind!r}; use one of {', '.join(SOURCES)}")


def check_imgsz(built: Built, source: str, imgsz: int) -> None:
    if built.stride and imgsz % built.stride:
        lower = max(built.stride, imgsz // built.stride * built.stride)
        raise SpecError(
            f"imgsz={imgsz} must be a multiple of {source}'s stride {built.stride}: use {lower} or {lower + built.stride}"
        )


def classification_loss(outputs, workload: Workload, batch_size: int, surrogate: bool) -> torch.Tensor:
    """Cross-entropy against random labels (classifiers) or mean square of every float output."""
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        labels = torch.zeros(batch_size, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels)
    tensors = [t for t in _flatten(outputs) if t.is_floating_point()]
    if not tensors:
        raise TypeError(f"model returned no floating-point tensor to train on: {type(outputs).__name__}")
    return sum(t.float().pow(2).mean() for t in tensors)


def _flatten(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flatten(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _flatten(v)


def _torchvision(name: str, classes: int) -> Built:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise SpecError(f"model='torchvision:{name}' is not a torchvision classifier; e.g. {', '.join(sorted(known)[:6])}, ...")
    extra = {"num_classes": classes} if classes else {}
    return Built(torchvision.models.get_model(name, weights=None, **extra), None, classification_loss)


def _timm(name: str, classes: int) -> Built:
    try:
        import timm
    except ImportError as e:
        raise SpecError(f"model='timm:{name}' needs timm: pip install -e '.[timm]'") from e
    if not timm.is_model(name):
        raise SpecError(f"model='timm:{name}' is not a timm model; list them with timm.list_models()")
    extra = {"num_classes": classes} if classes else {}
    return Built(timm.create_model(name, pretrained=False, **extra), None, classification_loss)


YOLO_TASKS = {"": "detect", "-seg": "segment", "-pose": "pose", "-obb": "obb", "-cls": "classify"}
"""yaml name suffix -> ultralytics task; each task trains with its own model class, loss and targets."""


def yolo_task(source: str) -> str:
    """The ultralytics task a model source trains (``detect`` unless its yaml ends in -seg/-pose/-obb/-cls)."""
    stem = source.split(":", 1)[-1].rsplit(".", 1)[0]
    return next((task for suffix, task in YOLO_TASKS.items() if suffix and suffix in stem), "detect")


def _ultralytics(name: str, classes: int) -> Built:
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
        return Built(model, None, _YoloLoss(model, task), "YOLO's classification loss")
    return Built(model, int(model.stride.max()), _YoloLoss(model, task), f"YOLO's own {task} loss and assigner",
                 uint8_input=True, for_fake=_strides_as_numbers, data_dependent_loss=True)


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


def _callable(module_name: str, attr: str, source: str) -> Built:
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"model={source!r}: cannot import {attr} from {module_name} ({e}); check PYTHONPATH") from e
    try:
        model = fn()
    except Exception as e:
        raise SpecError(f"model={source!r}: {attr}() raised {type(e).__name__}: {e}; fix the factory") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model={source!r}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return Built(model, None, classification_loss)
