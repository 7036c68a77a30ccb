"""Model sources: one string names a model family's architecture, built with what its training step needs.

``families`` says which adapter builds a source; the adapter returns a ``Built``: the
module, the inputs a step feeds it, its loss and the check of a sample size against it.
Models are built on the CPU with random weights (memory does not depend on weight
values); nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import families
from .errors import SpecError
from .spec import Workload

Loss = Callable[[object, Workload, int, bool], torch.Tensor]
"""loss(outputs, workload, batch_size, surrogate) -> scalar. ``surrogate`` is set when the step runs on fake
tensors (a loss that must index by data says so in ``Built.data_dependent_loss`` instead)."""
Inputs = Callable[[Workload, int, torch.device, torch.dtype], tuple]
"""inputs(workload, batch_size, device, dtype) -> the positional arguments of one forward, made on the device
as the trainer's loader delivers them (``dtype``: the float type of float inputs)."""
SizeCheck = Callable[[str, int], None]
"""check(source, size): SpecError when ``size`` (on the family's size axis) does not suit the model."""


@dataclass
class Built:
    """A model ready to train: the module, what one step feeds it, and how its loss is computed."""

    module: nn.Module
    loss: Loss
    inputs: Inputs
    check_size: SizeCheck | None = None
    """None: any size on the family's axis suits the model."""
    loss_note: str = ""
    for_fake: Callable[[nn.Module], None] | None = None
    """Adjusts a copy of ``module`` whose weights are fake tensors (for the simulator), where the model
    reads a value out of a small tensor (YOLO's head strides) that fake tensors cannot give."""
    data_dependent_loss: bool = False
    """The real loss indexes by data (YOLO's target assigner): fake tensors cannot run it, so the
    simulator runs it on real tensors shaped like the model's outputs and splices its allocations in."""
    real: Callable[[torch.device, Workload], nn.Module] | None = None
    """For a ``module`` built on the ``meta`` device (no weights: large models cost no host memory): builds
    the module with real random weights directly on a device (in the workload's weight dtype), for a real run
    (``on_device``)."""
    configure: Callable[[nn.Module, Workload], nn.Module] | None = None
    """Sets a module up for the workload's family-specific fields (checkpointing, adapters, the attention
    implementation); returns the module to train (``build`` and ``on_device`` apply it)."""


def on_device(built: Built, device: torch.device, workload: Workload) -> Built:
    """``built`` with its module on ``device`` with real weights, for a real run: moved there, or built there
    (and set up for ``workload``, ``Built.configure``) when ``module`` is on ``meta`` (``Built.real``)."""
    if built.real is not None:
        module = built.real(device, workload)
        if built.configure is not None:
            module = built.configure(module, workload)
        return dataclasses.replace(built, module=module)
    built.module.to(device)
    return built


def build(workload: Workload) -> Built:
    """Build the model ``workload`` trains, checked against its sample size; SpecError for bad names or sizes."""
    built = build_source(workload.model, workload.classes)
    check_size(built, workload.model, workload.size)
    if built.configure is not None:
        built.module = built.configure(built.module, workload)
    return built


def build_source(source: str, classes: int = 0) -> Built:
    """Build the model ``source`` names with ``classes`` outputs (0: its own); SpecError for bad names."""
    kind, _, name = source.partition(":")
    if not name:
        raise SpecError(f"model={source!r} must be SOURCE:NAME with SOURCE one of {families.sources_text()}")
    family = families.family_of(source)
    if family is families.CALLABLE and not ("." in kind or kind.isidentifier()):
        raise SpecError(f"model={source!r}: unknown source {kind!r}; use one of {families.sources_text()}")
    module, _, function = family.adapter.partition(":")
    return getattr(importlib.import_module(module), function)(name, source, classes)


def check_size(built: Built, source: str, size: int) -> None:
    """SpecError when ``size`` (on ``source``'s size axis) does not suit the built model."""
    if built.check_size is not None:
        built.check_size(source, size)
