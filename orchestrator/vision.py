"""Image models (torchvision, timm, any ``package.module:callable`` factory): a batch of images in,
cross-entropy on the logits (or the mean square of every float output) out."""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError
from .models import Built, Inputs, SizeCheck
from .spec import Workload


def images(uint8: bool = False) -> Inputs:
    """A batch of ``imgsz`` x ``imgsz`` RGB images as the trainer has it on the device: floats as a plain loader
    delivers them, or (``uint8``, ultralytics' trainer) uint8 made ``dtype`` / 255 there."""
    def make(workload: Workload, batch: int, device: torch.device, dtype: torch.dtype) -> tuple:
        size = workload.imgsz
        if not uint8:
            return (torch.randn(batch, 3, size, size, device=device, dtype=dtype),)
        raw = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        return (raw.to(dtype) / 255,)
    return make


def multiple_of(stride: int) -> SizeCheck:
    """Image sizes must be a multiple of the model's ``stride``."""
    def check(source: str, imgsz: int) -> None:
        if imgsz % stride:
            lower = max(stride, imgsz // stride * stride)
            raise SpecError(
                f"imgsz={imgsz} must be a multiple of {source}'s stride {stride}: use {lower} or {lower + stride}")
    return check


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


def torchvision(name: str, source: str, classes: int) -> Built:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise SpecError(f"model='torchvision:{name}' is not a torchvision classifier; e.g. {', '.join(sorted(known)[:6])}, ...")
    extra = {"num_classes": classes} if classes else {}
    return Built(torchvision.models.get_model(name, weights=None, **extra), classification_loss, images())


def timm(name: str, source: str, classes: int) -> Built:
    try:
        import timm
    except ImportError as e:
        raise SpecError(f"model='timm:{name}' needs timm: pip install -e '.[timm]'") from e
    if not timm.is_model(name):
        raise SpecError(f"model='timm:{name}' is not a timm model; list them with timm.list_models()")
    extra = {"num_classes": classes} if classes else {}
    return Built(timm.create_model(name, pretrained=False, **extra), classification_loss, images())


def factory(attr: str, source: str, classes: int) -> Built:
    """A ``package.module:callable`` source: the callable returns the ``nn.Module`` (``classes`` is not passed)."""
    module_name = source.partition(":")[0]
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
    return Built(model, classification_loss, images())
