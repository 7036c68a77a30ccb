"""Workload fields from a data set, read offline as ultralytics reads it: a ``data.yaml`` and its label files.

``objects`` is 4 x the most labels on one training image (mosaic joins four images:
ultralytics' own AutoBatch rule) and ``classes`` the number of names.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import SpecError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm", ".heic"}
MOSAIC = 4
"""Images a mosaic joins: ultralytics' AutoBatch counts 4 x the busiest image's labels."""


def with_data(values: dict, data: str, where: str, base: str | os.PathLike | None = None) -> dict:
    """``values`` (workload fields by name, None for not given) with objects and classes read from the data
    yaml ``data`` (a relative path: from ``base``, a job file's folder, or the current directory when None);
    naming either field as well is an error, since they would disagree. ``where`` starts the error
    (``"FILE: [sweep] "``, ``"--"``)."""
    both = [k for k in ("objects", "classes") if values.get(k) is not None]
    if both:
        raise SpecError(f"{where}data={data!r} sets objects and classes; leave out {', '.join(both)}")
    path = Path(data)
    if base is not None and not path.is_absolute():
        path = (Path(base) / path).absolute()
    return {**values, **fields_from(path, where, shown=data)}


def fields_from(data: str | os.PathLike, where: str = "", shown: str | None = None) -> dict:
    """``{"objects": 4 x most labels on one training image, "classes": len(names)}`` for a data yaml.
    Errors start with ``where`` and show the path as ``shown`` (as given, default ``data``) and, where it
    was resolved elsewhere, where it was looked for."""
    import yaml

    path = Path(data)
    name = f"{where}data={str(data if shown is None else shown)!r}"
    if shown is not None and str(shown) != str(path):
        name += f" (read from {str(path)!r})"
    if not path.is_file():
        relative = shown is not None and str(shown) != str(path)
        raise SpecError(f"{name} does not exist: name an ultralytics data yaml, e.g. data/coco8.yaml"
                        + ("; a relative path is read from the job file's folder" if relative else ""))
    try:
        cfg = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise SpecError(f"{name} is not a text file: name an ultralytics data yaml") from None
    except yaml.YAMLError as e:  # the parser's message is several lines: its problem and position in one
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{name} is not valid YAML ({problem}{at}); fix the file") from None
    if not isinstance(cfg, dict) or "names" not in cfg or "train" not in cfg:
        raise SpecError(f"{name} must have 'train' and 'names', as ultralytics' data yamls do")
    names = cfg["names"]
    classes = len(names) if isinstance(names, (list, dict)) else 0
    if classes < 1:
        raise SpecError(f"{name}: names must list the classes (a list or an index: name mapping)")
    root = Path(cfg.get("path") or path.parent)
    root = root if root.is_absolute() else path.parent / root
    kpt = cfg.get("kpt_shape")
    kpt = tuple(kpt) if isinstance(kpt, list) and len(kpt) == 2 else None
    most = max((_labels(f, classes, kpt) for f in _label_files(root, cfg["train"], name)), default=0)
    if most == 0:
        raise SpecError(f"{name}: no labels found for the train images; check 'path' and 'train'")
    return {"objects": MOSAIC * most, "classes": classes}


def _label_files(root: Path, train, name: str) -> list[Path]:
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
            raise SpecError(f"{name}: train entry {str(entry)!r} is neither a folder nor a .txt list under {root}")
    sep, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [Path(labels.join(str(p).rsplit(sep, 1))).with_suffix(".txt") for p in images]


def _labels(label_file: Path, classes: int, kpt: tuple[int, int] | None) -> int:
    """The labels one image trains with, as ultralytics' loader checks them (``verify_image_label``): a file it
    drops as corrupt (its image is not trained on) counts 0, with a warning naming it. (Duplicate lines, which
    the loader keeps once, are counted each: the count errs on the side of more boxes.)"""
    if not label_file.is_file():
        return 0  # an image without labels: background
    try:
        return len(_label_rows(label_file.read_text(encoding="utf-8-sig"), classes, kpt))
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("%s: ignoring this corrupt label file, as ultralytics' loader does (it drops the image): %s",
                    label_file, e)
        return 0


def _label_rows(text: str, classes: int, kpt: tuple[int, int] | None) -> list[tuple[float, ...]]:
    """Each line of a label file as numbers; ValueError, saying why, for a file ultralytics drops as corrupt:
    a value that is not a number, the wrong number of columns (5 for a box, 5 + keypoints for pose (``kpt``,
    the yaml's kpt_shape), or a polygon of more than 6), coordinates outside [0, 1] (1% tolerance; keypoints'
    x and y for pose), a class not an index of ``names``."""
    rows = [tuple(float(v) for v in line.split()) for line in text.strip().splitlines() if line.strip()]
    polygons = kpt is None and any(len(r) > 6 for r in rows)
    if polygons and any(len(r) == 5 for r in rows):
        raise ValueError("labels mix segment and detection rows")
    for r in rows:
        if polygons and len(r) % 2 == 0:
            raise ValueError(f"a polygon needs x y pairs after its class, got {len(r) - 1} values")
        width = 5 + kpt[0] * kpt[1] if kpt else 5
        if not polygons and len(r) != width:
            raise ValueError(f"labels require {width} columns, {len(r)} columns detected")
        points = r[1:] if kpt is None else [v for i, v in enumerate(r[5:]) if i % kpt[1] < 2]
        if max(points) > 1.01:
            raise ValueError(f"non-normalized or out of bounds coordinates {max(points)}")
        if min(r) < -0.01 or (min(r) < 0 and min(r[3:5]) < 0):
            raise ValueError(f"negative label values {min(r)}")
        if r[0] % 1 or not r[0] < classes:
            raise ValueError(f"class {r[0]:g} must be an index of the {classes} names")
    return rows
