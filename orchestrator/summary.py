"""Tables for people: the batch-size pivot (rows model x imgsz, columns GPU type)."""
from __future__ import annotations

import pandas as pd

from .units import GiB


def gpu_label(row) -> str:
    name = row["card"] if isinstance(row.get("card"), str) and row["card"] else row["gpu_name"]
    return f"{name} ({row['gpu_total_bytes'] / GiB:.0f} GiB)"


def cell(row) -> str:
    if row["status"] == "ok":
        return str(int(row["batch_size"])) + ("+" if row.get("clamped") else "")
    return row["status"]


def pivot(df: pd.DataFrame) -> pd.DataFrame:
    """Batch sizes (or no-fit / error) with one column per GPU type, ordered by memory."""
    if df.empty:
        return pd.DataFrame()
    df = df.copy()
    df["gpu"] = [gpu_label(r) for _, r in df.iterrows()]
    df["value"] = [cell(r) for _, r in df.iterrows()]
    index = ["model", "imgsz"] + [c for c in ("precision", "optimizer", "fraction") if df[c].nunique() > 1]
    out = df.pivot_table(index=index, columns="gpu", values="value", aggfunc="first")
    order = df.drop_duplicates("gpu").sort_values("gpu_total_bytes")["gpu"]
    return out[[g for g in order if g in out.columns]].fillna("-")
