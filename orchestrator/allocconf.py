"""``PYTORCH_CUDA_ALLOC_CONF`` as data: the settings of PyTorch's CUDA caching allocator that ``allocator``
models, read as c10/core/AllocatorConfig.cpp reads them (pytorch/pytorch 0ac7166, ``parseArgs``), and
written back as one canonical string (the workload field ``alloc_conf``).

Pure Python, no torch; a leaf of the package (``spec`` checks the field with it). What each setting does
to a training step, and why ``garbage_collection_threshold`` is not modelled: ``allocator``'s docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

from .units import MiB

MIN_SPLIT_MB = 20
"""The smallest ``max_split_size_mb`` PyTorch accepts (``kLargeBuffer``, 20 MiB, in MiB)."""


@dataclass(frozen=True)
class AllocConf:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` settings the model knows; the defaults are PyTorch's."""

    expandable_segments: bool = False
    max_split_size: int | None = None
    """Bytes (``max_split_size_mb`` x 1 MiB); None: no limit, every block may be split (PyTorch's SIZE_MAX)."""
    garbage_collection_threshold: float | None = None
    """Accepted and recorded, not modelled: inert without a per-process memory fraction (module docstring)."""


DEFAULT_CONF = AllocConf()

_BOOLS = {"True": True, "False": False}


def parse_conf(text: str) -> AllocConf:
    """``text``, a ``PYTORCH_CUDA_ALLOC_CONF`` value (comma-separated ``key:value``; whitespace ignored, as
    PyTorch's tokenizer does), as an ``AllocConf``; ValueError naming the part, the rule and the fix."""
    conf: dict = {}
    for part in "".join(str(text).split()).split(","):
        if not part:
            if str(text).strip():
                raise ValueError(f"an empty setting between commas: write KEY:VALUE pairs separated by single "
                                 "commas, e.g. expandable_segments:True,max_split_size_mb:128")
            continue
        key, sep, value = part.partition(":")
        if not sep or not value or ":" in value:
            raise ValueError(f"{part!r} is not KEY:VALUE: write e.g. expandable_segments:True")
        if key in conf:
            raise ValueError(f"{key} is given twice: name each setting once")
        if key == "expandable_segments":
            if value not in _BOOLS:
                raise ValueError(f"expandable_segments:{value} must be True or False (PyTorch reads no other "
                                 "spelling)")
            conf[key] = _BOOLS[value]
        elif key == "max_split_size_mb":
            if not value.isdigit() or int(value) < MIN_SPLIT_MB:
                raise ValueError(f"max_split_size_mb:{value} must be an integer >= {MIN_SPLIT_MB} (MiB; PyTorch "
                                 "refuses smaller), e.g. max_split_size_mb:128")
            conf[key] = int(value)
        elif key == "garbage_collection_threshold":
            try:
                threshold = float(value)
            except ValueError:
                threshold = -1.0
            if not 0 < threshold < 1:
                raise ValueError(f"garbage_collection_threshold:{value} must be a number between 0 and 1 "
                                 "(exclusive), e.g. garbage_collection_threshold:0.8")
            conf[key] = threshold
        else:
            raise ValueError(f"{key} is not a setting the allocator model knows (it models expandable_segments, "
                             "max_split_size_mb and garbage_collection_threshold): leave it out or use those")
    split = conf.get("max_split_size_mb")
    return AllocConf(expandable_segments=conf.get("expandable_segments", False),
                     max_split_size=None if split is None else split * MiB,
                     garbage_collection_threshold=conf.get("garbage_collection_threshold"))


def canonical(conf: AllocConf) -> str:
    """The one ``PYTORCH_CUDA_ALLOC_CONF`` string of ``conf``: its settings other than PyTorch's defaults, keys
    sorted (``""`` for the default allocator), so that equal settings are one string."""
    parts = []
    if conf.expandable_segments:
        parts.append("expandable_segments:True")
    if conf.garbage_collection_threshold is not None:
        parts.append(f"garbage_collection_threshold:{conf.garbage_collection_threshold!r}")
    if conf.max_split_size is not None:
        parts.append(f"max_split_size_mb:{conf.max_split_size // MiB}")
    return ",".join(parts)
