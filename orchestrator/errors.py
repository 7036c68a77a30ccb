"""The package's errors, in a module that imports nothing of the package: any module can raise or catch
them without importing the module that raises them.

``SpecError`` and its kind are bad input (the CLI's exit 2): each message names the value, the
constraint and the fix. ``OutOfMemory`` is data (a batch that does not fit). ``DeviceFault`` and
``TableWriteError`` are failures of the machine, surfaced as they are.
"""
from __future__ import annotations


class SpecError(ValueError):
    """Bad input: the message names the value, the constraint and the fix."""


class TableError(SpecError):
    """The file at the table path cannot be used as a table; it is left as it is."""


class NoAnswer(SpecError):
    """The table cannot answer: the message names what is missing and what the table has."""


class TableWriteError(OSError):
    """Writing the table failed (disk full, read-only); the previous table is intact."""


class OutOfMemory(Exception):
    """Raised by a ``measure`` callable when the batch does not fit on the device."""


class DeviceFault(RuntimeError):
    """The process's CUDA context is unusable: an illegal memory access, a device-side assert or another
    sticky CUDA error. Every later CUDA call in the process fails the same way; only a new process
    recovers (in a sweep: the actor is replaced and the combination retried once)."""
