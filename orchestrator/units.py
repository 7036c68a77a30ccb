"""Bytes inside, GiB only for people: the one place that converts."""

GiB = 2**30
MiB = 2**20


def gib(nbytes: float | None, digits: int = 2) -> str:
    return "-" if nbytes is None else f"{nbytes / GiB:.{digits}f} GiB"


def mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:.1f} MiB"
