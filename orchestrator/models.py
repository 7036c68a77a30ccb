"""Model sources: one string names an architecture and the loss its training step uses.

Models are built on the CPU with random weights (memory does not depend on weight
values); nothing is downloaded.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .spec import SpecError, Workload

SOURCES = ("torchvision", "timm", "ultralytics", "package.module:callable")

Loss = Callable[[object, Workload, int, bool], torch.Tensor]
"""loss(outputs, workload, batch_size, surrogate) -> scalar. ``surrogate`` asks for a data-independent
loss that allocates what the real one does: fake tensors cannot run data-dependent ops."""


@dataclass
class Built:
    """A model ready to train, and how to compute its loss from its outputs."""

    module: nn.Module
    stride: int | None
    """Input sizes must be a multiple of this (None: any size)."""
    loss: Loss
    loss_note: str = ""


def build(workload: Workload) -> Built:
    """Build the model ``workload`` trains, checked against its image size; SpecError for bad names or sizes."""
    built = build_source(workload.model)
    check_imgsz(built, workload.model, workload.imgsz)
    return built


def build_source(source: str) -> Built:
    """Build the model ``source`` names; SpecError for unknown or malformed names."""
    kind, _, name = source.partition(":")
    if not name:
        raise SpecError(f"model={source!r} must be SOURCE:NAME with SOURCE one of {', '.join(SOURCES)}")
    if kind == "torchvision":
        return _torchvision(name)
    if kind == "timm":
        return _timm(name)
    if kind == "ultralytics":
        return _ultralytics(name)
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


def _torchvision(name: str) -> Built:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise SpecError(f"model='torchvision:{name}' is not a torchvision classifier; e.g. {', '.join(sorted(known)[:6])}, ...")
    return Built(torchvision.models.get_model(name, weights=None), None, classification_loss)


def _timm(name: str) -> Built:
    try:
        import timm
    except ImportError as e:
        raise SpecError(f"model='timm:{name}' needs timm: pip install -e '.[timm]'") from e
    if not timm.is_model(name):
        raise SpecError(f"model='timm:{name}' is not a timm model; list them with timm.list_models()")
    return Built(timm.create_model(name, pretrained=False), None, classification_loss)


def _ultralytics(name: str) -> Built:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError as e:
        raise SpecError(f"model='ultralytics:{name}' needs ultralytics: pip install -e '.[yolo]'") from e
    cfg = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    stem = cfg.rsplit(".", 1)[0]
    if any(stem.endswith(t) for t in ("-cls", "-seg", "-pose", "-obb")):
        raise SpecError(f"model='ultralytics:{name}': only detection models are supported, e.g. yolov8s.yaml")
    try:
        model = DetectionModel(cfg, nc=80, verbose=False)
    except FileNotFoundError as e:
        raise SpecError(
            f"model='ultralytics:{name}' is not a yaml that ultralytics ships; e.g. yolov8s.yaml, yolo11n.yaml, yolov9c.yaml"
        ) from e
    return Built(model, int(model.stride.max()), _yolo_loss(model), "surrogate detection loss when simulated")


def _yolo_loss(model):
    """YOLO's own detection loss on synthetic boxes for real tensors; a dense surrogate on fake ones.

    The real loss assigns targets with data-dependent shapes (nonzero, unique) that
    fake tensors cannot run. The surrogate does the loss's dense, batch-sized work:
    the box-distribution decode, a target-anchor alignment matrix for
    ``SURROGATE_TARGETS`` boxes per image, BCE over every anchor and class, and a
    DFL cross-entropy over every anchor side.
    """
    state = {}

    def real(outputs, batch_size):
        if "criterion" not in state:
            from ultralytics.cfg import get_cfg

            model.args = get_cfg()
            state["criterion"] = model.init_criterion()
        device = next(model.parameters()).device
        n = SURROGATE_TARGETS
        batch = {
            "batch_idx": torch.arange(batch_size, device=device).repeat_interleave(n).float(),
            "cls": torch.randint(0, 80, (batch_size * n, 1), device=device).float(),
            "bboxes": torch.rand(batch_size * n, 4, device=device) * 0.5 + 0.25,
        }
        loss, _ = state["criterion"](outputs, batch)
        return loss.sum()

    def loss(outputs, workload, batch_size, surrogate):
        return _detection_surrogate(outputs, model) if surrogate else real(outputs, batch_size)

    return loss


SURROGATE_TARGETS = 8  # boxes per image, near COCO's mean of 7.3


def _detection_surrogate(outputs, model) -> torch.Tensor:
    head = model.model[-1]
    reg = head.reg_max
    if isinstance(outputs, dict):
        boxes, scores = outputs["boxes"], outputs["scores"]
    else:  # older ultralytics: a list of (b, no, h, w) maps
        b = outputs[0].shape[0]
        cat = torch.cat([x.view(b, head.no, -1) for x in outputs], 2)
        boxes, scores = cat.split((reg * 4, head.nc), 1)
    b, _, a = boxes.shape
    pred_dist = boxes.permute(0, 2, 1).contiguous()
    pred_scores = scores.permute(0, 2, 1).contiguous()
    proj = torch.arange(reg, dtype=torch.float, device=boxes.device)
    decoded = pred_dist.view(b, a, 4, reg).softmax(3).matmul(proj.type(pred_dist.dtype))
    gt = torch.zeros(b, SURROGATE_TARGETS, 4, device=boxes.device)
    align = (decoded.detach().unsqueeze(1) - gt.unsqueeze(2)).abs().sum(-1)  # (b, targets, anchors)
    align = align * pred_scores.detach().sigmoid().amax(-1).unsqueeze(1)
    target_scores = torch.zeros_like(pred_scores) + align.amax(1).unsqueeze(-1) * 0
    bce = F.binary_cross_entropy_with_logits(pred_scores, target_scores.to(pred_scores.dtype), reduction="none").sum()
    labels = torch.zeros(b * a * 4, dtype=torch.long, device=boxes.device)
    dfl = F.cross_entropy(pred_dist.view(-1, reg), labels, reduction="none").sum()
    return bce + dfl + decoded.float().sum()


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
