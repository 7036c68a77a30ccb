"""Which card a lookup asks about (``resolve_gpu``): a catalog key, a device name the table has, a memory
size, or this machine's current CUDA device; each a ``Target`` that says where its outside-the-allocator
memory comes from."""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass

import pandas as pd

from . import catalog
from .errors import NoAnswer, SpecError
from .units import GiB, gib


@dataclass(frozen=True)
class Target:
    """The card asked about: name and card key may be unknown (a bare memory size)."""

    total_bytes: int
    outside_bytes: int | None = None
    """Used outside the allocator; None when unknown (the table's rows stand in)."""
    name: str = ""
    card: str = ""
    outside_from: str = ""
    """Where ``outside_bytes`` comes from, for the explanation."""
    nccl_channels: int | None = None
    """NCCL's channels between such cards (DDP), when the catalog knows the card; None: the catalog's most."""

    def label(self) -> str:
        return f"{self.card or self.name or 'a card'} ({gib(self.total_bytes)})"


def nearest(value, options: list, limit: int = 8) -> str:
    """``options`` as text, the nearest to ``value`` first (numbers by distance, text by similarity)."""
    if all(isinstance(o, (int, float)) and not isinstance(o, bool) for o in options + [value]):
        ordered = sorted(options, key=lambda o: (abs(o - value), o))
    else:
        text = [str(o) for o in options]
        close = difflib.get_close_matches(str(value), text, n=len(text), cutoff=0)
        ordered = close + sorted(set(text) - set(close))
    shown = ", ".join(str(o) or "''" for o in ordered[:limit])  # an empty text value (alloc_conf's default): ''
    return shown + (f" (and {len(ordered) - limit} more)" if len(ordered) > limit else "")


def resolve_gpu(gpu: str | int | float | None, df: pd.DataFrame, memory_hint: str = "(--gpu-memory 24, gpu=24.0)"
                ) -> Target:
    """The card ``gpu`` names (see ``lookup``); SpecError lists what it could have been, and how to give a card
    by its memory (``memory_hint``)."""
    if gpu is None:
        return current_device()
    if isinstance(gpu, bool):
        raise SpecError(f"gpu={gpu!r} must be a card name or a memory size, e.g. gpu='T4' or gpu=24.0 (GiB)")
    if isinstance(gpu, numbers.Integral):
        if gpu < GiB:
            raise SpecError(f"gpu={gpu} is read as bytes (an int) and is under 1 GiB: pass GiB as a float or "
                            f"string (gpu={float(gpu)} or '{gpu}') or the total in bytes")
        return Target(int(gpu))
    if isinstance(gpu, numbers.Real):
        return _from_gib(float(gpu), repr(gpu))
    return _from_name(str(gpu).strip(), df, memory_hint)


def _from_name(name: str, df: pd.DataFrame, memory_hint: str) -> Target:
    try:
        return _from_catalog(catalog.card(name))
    except ValueError:
        pass
    rows = df[df["gpu_name"].str.lower() == name.lower()]
    if len(rows):
        return _from_rows(name, rows)
    named = [c for c in catalog.CATALOG.values() if c.name.lower() == name.lower()]
    if named:
        return _from_catalog(named[0])
    if _is_number(name.removesuffix("GiB")):  # "24GiB": exactly that total; "24": as cards are sold
        return _from_gib(float(name.removesuffix("GiB")), repr(name), exact=name.endswith("GiB"))
    measured = nearest(name, sorted(set(df["gpu_name"])))
    raise NoAnswer(f"gpu={name!r} is not a catalog card ({nearest(name, list(catalog.CATALOG))}) nor a device "
                   f"in the table ({measured}): name one of those, or give its memory in GiB "
                   f"{memory_hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _from_catalog(c: catalog.Card) -> Target:
    return Target(c.total_bytes, c.context_bytes, c.name, c.key, f"the catalog's context for {c.key}", c.nccl_channels)


def _from_rows(name: str, rows: pd.DataFrame) -> Target:
    totals = sorted(set(int(t) for t in rows["gpu_total_bytes"]))
    if len(totals) > 1:
        raise NoAnswer(f"gpu={name!r} is ambiguous: the table has it with {', '.join(gib(t) for t in totals)}; "
                       "pass its catalog key or its memory (--gpu-memory GiB)")
    r = rows.iloc[0]
    card = r["card"] if isinstance(r["card"], str) else ""
    return Target(totals[0], int(rows["outside_bytes"].max()), str(r["gpu_name"]), card, "measured on that card")


def _from_gib(value: float, shown: str, exact: bool = False) -> Target:
    """A card named by its memory. A size cards are sold as (16, 24, 40, 80, ...) is read as the smallest
    catalog card sold as that: an "A10G 24 GB" reports 21.96 GiB, so 24 must not mean 24 GiB.
    Any other size, or any size when ``exact``, is the total the driver reports, in GiB."""
    if not math.isfinite(value) or value <= 0:
        raise SpecError(f"gpu={shown} must be a positive memory size in GiB, e.g. 24")
    sold = [] if exact else catalog.sold_as(value)
    if not sold:
        return Target(int(value * GiB))
    smallest = min(sold, key=lambda c: c.total_bytes)
    names = ", ".join(c.key for c in sold)
    return Target(smallest.total_bytes, max(c.context_bytes for c in sold), f"a {value:g} GB card", "",
                  f"the largest catalog context among cards sold as {value:g} GB ({names}), whose smallest "
                  f"total {gib(smallest.total_bytes)} is used", max(c.nccl_channels for c in sold))


def current_device() -> Target:
    """This process's current CUDA device through the device seam; SpecError when this machine has none."""
    from . import cuda  # noqa: PLC0415 (imports torch: only for this path)

    if cuda.cuda_count() == 0:
        raise SpecError("gpu=None means the current CUDA device and this machine has none: "
                        "pass gpu= (--gpu T4, --gpu 'Tesla T4' or --gpu-memory 24)")
    info = cuda.CudaBackend().info()
    c = catalog.CATALOG.get(info.card)
    # a fresh process has not loaded its kernels yet: count the catalog's context if it is larger
    outside = max(info.outside_bytes, c.context_bytes if c else 0)
    return Target(info.total_bytes, outside, info.name, info.card, "this device now or its catalog context, the larger",
                  c.nccl_channels if c else None)


def same_card(row, target: Target) -> bool:
    """A row measured on the target: same device name, total memory within 2% (driver/ECC differences)."""
    if not target.name:
        return False
    return (str(row["gpu_name"]).lower() == target.name.lower()
            and abs(int(row["gpu_total_bytes"]) - target.total_bytes) <= 0.02 * target.total_bytes)
