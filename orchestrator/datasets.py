"""Workload fields from a data set, read offline as ultralytics reads it: a ``data.yaml`` and its label files.

``objects`` is 4 x the most labels on one training image (mosaic joins four images:
ultralytics' own AutoBatch rule) and ``classes`` the number of names.
"""
from __future__ import annotations

import os
from pathlib import Path

from .spec import SpecError

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm", ".heic"}
MOSAIC = 4
"""Images a mosaic joins: ultralytics' AutoBatch counts 4 x the busiest image's labels."""


def with_data(values: dict, data: str, where: str) -> dict:
    """``values`` (workload fields by name, None for not given) with objects and classes read from the data
    yaml ``data`` (relative paths: from the current directory); naming either field as well is an error,
    since they would disagree. ``where`` starts the error (``"FILE: [sweep] "``, ``"--"``)."""
    both = [k for k in ("objects", "classes") if values.get(k) is not None]
    if both:
        raise SpecError(f"{where}data={data!r} sets objects and classes; leave out {', '.join(both)}")
    return {**values, **fields_from(data)}


def fields_from(data: str | os.PathLike) -> dict:
    """``{"objects": 4 x most labels on one training image, "classes": len(names)}`` for a data yaml."""
    import yaml

    path = Path(data)
    if not path.is_file():
        raise SpecError(f"data={str(data)!r} does not exist: name an ultralytics data yaml, e.g. data/coco8.yaml")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"data={str(data)!r} is not valid YAML ({e}); fix the file") from None
    if not isinstance(cfg, dict) or "names" not in cfg or "train" not in cfg:
        raise SpecError(f"data={str(data)!r} must have 'train' and 'names', as ultralytics' data yamls do")
    names = cfg["names"]
    classes = len(names) if isinstance(names, (list, dict)) else 0
    if classes < 1:
        raise SpecError(f"data={str(data)!r}: names must list the classes (a list or an index: name mapping)")
    root = Path(cfg.get("path") or path.parent)
    root = root if root.is_absolute() else path.parent / root
    most = max((_labels(f) for f in _label_files(root, cfg["train"], data)), default=0)
    if most == 0:
        raise SpecError(f"data={str(data)!r}: no labels found for the train images; check 'path' and 'train'")
    return {"objects": MOSAIC * most, "classes": classes}


def _label_files(root: Path, train, data) -> list[Path]:
    """The label file of each training image: ``.../images/...`` -> ``.../labels/....txt``."""
    images: list[Path] = []
    for entry in train if isinstance(train, list) else [train]:
        where = root / entry
        if where.is_dir():
            images += [p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        elif where.is_file() and where.suffix == ".txt":  # a list of image paths
            for line in where.read_text().splitlines():
                if line.strip():
                    p = Path(line.strip())
                    images.append(p if p.is_absolute() else root / p)
        else:
            raise SpecError(f"data={str(data)!r}: train entry {str(entry)!r} is neither a folder nor a .txt list "
                            f"under {root}")
    sep, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [Path(labels.join(str(p).rsplit(sep, 1))).with_suffix(".txt") for p in images]


def _labels(label_file: Path) -> int:
    if not label_file.is_file():
        return 0  # an image without labels: background
    return sum(1 for line in label_file.read_text().splitlines() if line.strip())
