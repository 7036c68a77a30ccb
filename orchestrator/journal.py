"""The table's journal: one line per row, ``CRC32 JSON\n``, appended with one write() and fsynced, so that a
writer killed mid-append leaves at most a torn last line, which readers skip and the next writer cuts off."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Callable

import pandas as pd

from .errors import TableError

log = logging.getLogger(__name__)


def encode(row: dict, columns: list[str]) -> bytes:
    """One journal line: the row's ``columns`` as JSON, after their CRC32."""
    body = json.dumps({c: row[c] for c in columns if c in row}, default=_plain, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _plain(v):
    """JSON for the numpy scalars a row taken from a DataFrame holds."""
    if hasattr(v, "item"):
        return v.item()
    if v is pd.NA or v is pd.NaT:
        return None
    raise TypeError(f"a table value must be a number, a string or a bool, not {type(v).__name__} ({v!r})")


def decode(line: bytes) -> dict | None:
    """The row of a journal line; None when the line is not whole (its CRC does not match)."""
    crc, _, body = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
            return None
        row = json.loads(body)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def read_rows(journal: Path, check: Callable[[dict], None]) -> list[dict]:
    """The journal's rows, oldest first. A torn last line (a writer killed mid-append, or an append in
    progress) is left out with a warning; a damaged line before it, or a whole one that ``check`` refuses
    (ValueError), is a TableError."""
    try:
        raw = journal.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise TableError(f"{journal} is not readable ({e.strerror or e}): fix its permissions") from None
    lines = raw.split(b"\n")
    tail = lines.pop()  # what follows the last newline: empty unless the last append was cut short
    rows = []
    for n, line in enumerate(lines, 1):
        row = decode(line)
        if row is not None:
            try:  # whole, but written by something else than write_rows: checked as write_rows checks a row
                check(row)
            except ValueError as e:
                raise TableError(f"{journal} line {n} is not a valid table row ({e}): restore it or remove it "
                                 "(its rows are lost); it was not changed") from None
            rows.append(row)
        elif n == len(lines) and not tail:
            log.warning("%s: ignoring its last line, which is not whole (a write cut short)", journal)
        else:
            raise TableError(f"{journal} line {n} is damaged (its checksum does not match): restore it or "
                             "remove it (its rows are lost); it was not changed")
    if tail:
        log.warning("%s: ignoring %d bytes after its last whole line (a write cut short, or one in progress)",
                    journal, len(tail))
    return rows


def append(journal: Path, data: bytes, mode: int) -> int:
    """Append ``data`` with one write() and fsync it; on any failure the journal is cut back to what it
    was (removed if this call created it). Returns the journal's new size."""
    created = not journal.exists()
    fd = os.open(journal, os.O_RDWR | os.O_APPEND | os.O_CREAT, mode)
    try:
        if created:
            os.fchmod(fd, mode)  # not the umask's
        size = _whole_lines(fd, journal)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes: no space left or a file size limit")
            os.fsync(fd)
            if created:
                fsync_dir(journal.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                if created:
                    journal.unlink()
            raise
        return size + written
    finally:
        os.close(fd)


def _whole_lines(fd: int, journal: Path) -> int:
    """Cut a torn last line (a writer killed mid-append) off the journal, so that the next line does not
    join it; returns the size that is left. Called under the lock: no append is in progress."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        end = start + newline + 1 if newline >= 0 else start
        if newline >= 0:
            break
    log.warning("%s: dropping %d bytes after its last whole line (a write cut short)", journal, size - end)
    os.ftruncate(fd, end)
    return end


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (where the file system allows)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
