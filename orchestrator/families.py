"""Model families: what the source in ``model = "SOURCE:NAME"`` names, as plain data (no torch).

A family says which workload field sizes one of its samples (its size axis:
``imgsz`` for images) and where its adapter lives. The adapter (``module:function``,
imported only where a model is built) is ``build(name, source, classes) -> models.Built``:
the model, the batch of inputs a step feeds it (``Built.inputs``), its loss, and the
check of a size against the model (``Built.check_size``). The table, the grid, labels,
the pivot and ``lookup`` ask ``family_of(model).size`` instead of assuming images.

Adding a family: write its adapter module, add a ``Family`` to ``FAMILIES`` and, if its
size axis is new (``seq_len``, ...), declare that axis as a workload field in ``spec.py``
(``knob(..., size=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    """The source prefix (``torchvision`` in ``torchvision:resnet50``)."""
    size: str
    """The workload field that sizes one sample (``imgsz``); rows of this family key on it."""
    adapter: str
    """``module:function`` that builds a model of the family (``models.Built``)."""
    example: str
    """A source for error messages and help."""
    extra: str = ""
    """The pip extra that installs what the adapter imports (``pip install -e '.[EXTRA]'``)."""
    defaults: tuple[tuple[str, object], ...] = ()
    """Workload fields whose default differs for this family (how its trainers train), as (field, value);
    ``spec.make`` and the sweep apply them where a field is not given."""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("torchvision", "imgsz", "orchestrator.vision:torchvision", "torchvision:resnet50"),
    Family("timm", "imgsz", "orchestrator.vision:timm", "timm:convnext_tiny", extra="timm"),
    Family("ultralytics", "imgsz", "orchestrator.yolo:build", "ultralytics:yolov8s.yaml", extra="yolo"),
    Family("hf", "seq_len", "orchestrator.hf:build", "hf:llama-3.2-1b", extra="hf",
           # Hugging Face Trainer's defaults: AdamW, no EMA, no accumulation, no evaluation in the step; bf16 autocast
           defaults=(("precision", "bf16"), ("optimizer", "AdamW"), ("ema", False), ("nbs", 1), ("val_scale", 0),
                     ("deterministic", False))),
)}
CALLABLE = Family("callable", "imgsz", "orchestrator.vision:factory", "my_pkg.models:build")
"""Any other ``package.module:function`` source: a factory that returns an ``nn.Module`` fed images."""


def family_of(model: str) -> Family:
    """The family of a model source (``CALLABLE`` for a prefix that names no family)."""
    return FAMILIES.get(model.partition(":")[0], CALLABLE)


def defaults_of(model: str) -> dict:
    """The workload defaults ``model``'s family sets (``Family.defaults``)."""
    return dict(family_of(model).defaults)


def names() -> tuple[str, ...]:
    """Every family name, ``callable`` last."""
    return (*FAMILIES, CALLABLE.name)


def sources_text() -> str:
    """The sources a model string may name, for help and errors."""
    return ", ".join([f"{f.name}:NAME" for f in FAMILIES.values()] + ["package.module:callable"])
