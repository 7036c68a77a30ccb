"""Bytes inside, GiB only for people: the one place that defines the units and formats them."""

KiB = 2**10
MiB = 2**20
GiB = 2**30


def gib(nbytes: float | None, digits: int = 2, *, unit: bool = True) -> str:
    """``nbytes`` in GiB for display ("-" for None), e.g. ``11.39 GiB``."""
    if nbytes is None:
        return "-"
    return f"{nbytes / GiB:.{digits}f}" + (" GiB" if unit else "")


def mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:.1f} MiB"
