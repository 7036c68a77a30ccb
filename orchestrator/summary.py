"""Tables for people: the batch-size pivot (rows workloads, columns GPU types), shared by the sweep's
output and ``report``."""
from __future__ import annotations

import pandas as pd

from . import families, spec
from .units import GiB

VARYING = (*(k for k in spec.KEYS if k != "model" and k not in spec.SIZES), "fraction")
"""Key columns that join the row label (after the model and its size) only when the table holds more than one value."""


def gpu_label(row) -> str:
    name = row["card"] if isinstance(row.get("card"), str) and row["card"] else row["gpu_name"]
    return f"{name} ({row['gpu_total_bytes'] / GiB:.0f} GiB)"


def cell(row) -> str:
    if row["status"] == "ok":
        return str(int(row["batch_size"])) + ("+" if row.get("clamped") else "")
    return row["status"]


def pivot(df: pd.DataFrame) -> pd.DataFrame:
    """Cell text (batch size, ``no-fit``, ``error``, ``-``) per workload row and GPU-type column, by memory.

    Rows are the model and its size (``imgsz``, or its family's axis) plus every other key column that holds
    more than one value within one model family (a table of YOLO and language models differs in ``ema`` by
    the families' defaults alone); two rows that still share a cell (two device names with one label) are
    both shown, joined by ``/``, never one hidden behind the other.
    """
    if df.empty:
        return pd.DataFrame()
    df = df.copy()
    df["gpu"] = [gpu_label(r) for _, r in df.iterrows()]
    df["value"] = [cell(r) for _, r in df.iterrows()]
    sizes = [a for a in spec.SIZES if a in df.columns and (df[a] != 0).any()]
    family = df["model"].map(lambda m: families.family_of(m).name)  # a family's own defaults do not vary a row
    index = ["model", *sizes] + [c for c in VARYING if df.groupby(family)[c].nunique().max() > 1]
    out = df.pivot_table(index=index, columns="gpu", values="value", aggfunc="/".join)
    order = df.drop_duplicates("gpu").sort_values("gpu_total_bytes")["gpu"]
    return out[[g for g in order if g in out.columns]].fillna("-")


def row_label(key, names: list[str]) -> str:
    """``model @imgsz`` plus the varying keys, e.g. ``torchvision:resnet50 @224 bf16 AdamW no ema``."""
    values = dict(zip(names, key if isinstance(key, tuple) else (key,)))
    extra = [f"fraction {values[n]:g}" if n == "fraction" else spec.show(n, values[n]) or f"default {n}"
             for n in names if n != "model" and n not in spec.SIZES  # an empty value (alloc_conf's default) by name
             and (n == "fraction" or spec.applies(n, values["model"]))]  # not another family's fields
    return " ".join([model_at(values)] + extra)


def model_at(values) -> str:
    """``model @size`` from a row or mapping with the model and its family's size axis: ``m @640``,
    ``m @seq_len=512``."""
    model = values["model"]
    return spec.at(model, values[families.family_of(model).size]).replace("@", " @", 1)
