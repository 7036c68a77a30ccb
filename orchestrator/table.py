"""The batch table: one row per (card type, workload, fraction), as CSV on disk.

Every write is read-merge-write under an advisory lock (``fcntl.lockf`` on
``TABLE.lock``, which also works on NFS mounts with lockd), into a temp file in the
same folder that is fsynced and renamed over the table: a reader, an interrupt or
a second sweep never sees a half-written table, and two sweeps writing one table
both keep their rows.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable

import pandas as pd

from . import spec
from .catalog import NEIGHBOUR_WARN_BYTES
from .spec import SpecError

log = logging.getLogger(__name__)

KEY = ["gpu_name", "gpu_total_bytes", *spec.KEYS, "fraction"]
"""A row's identity: the device type, every workload field (``spec.Workload``), the fraction."""
REQUIRED = ["gpu_name", "gpu_total_bytes", "model", "imgsz", "fraction", "batch_size", "status"]
"""Columns every table of ours has had; a workload field added later is filled with its default."""
_TYPES = {"gpu_name": str, "gpu_total_bytes": int, **spec.TYPES, "fraction": float}
COLUMNS = KEY + [
    "batch_size", "status", "predicted_batch", "gpu_count", "card", "peak_bytes", "val_peak_bytes", "budget_bytes", "outside_bytes",
    "neighbour_bytes",
    "bytes_per_sample", "fixed_bytes", "r2", "clamped", "probes", "probe_peak_bytes", "measurements",
    "device_batches", "backend", "seconds", "profile_seconds", "attempts", "error", "host", "torch", "cuda", "driver", "orchestrator", "time",
]
STATUSES = ("ok", "no-fit", "error")


class TableError(SpecError):
    """The file at the table path cannot be used as a table; it is left as it is."""


class TableWriteError(OSError):
    """Writing the table failed (disk full, read-only); the previous table is intact."""


def empty() -> pd.DataFrame:
    return pd.DataFrame(columns=COLUMNS)


def read(path: str | os.PathLike) -> pd.DataFrame:
    """The table at ``path`` (empty if absent); TableError if the file is not one of ours."""
    path = Path(path)
    if not path.exists():
        return empty()
    if path.is_dir():
        raise TableError(f"{path} is a folder: name a CSV file, e.g. {path / 'batch_table.csv'}")
    raw = path.read_bytes()
    if not raw.strip():
        return empty()
    if not raw.endswith(b"\n"):
        raise TableError(f"{path} ends mid-row (truncated): restore it or choose another --out; it was not changed")
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except Exception as e:
        raise TableError(f"{path} is not a readable CSV ({e}): choose another --out; it was not changed") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise TableError(f"{path} is not an orchestrator batch table (no column {', '.join(missing)}): "
                         "choose another --out or move the file; it was not changed")
    for name in spec.KEYS:  # a table written before this field existed: its rows ran what was measured then
        if name not in df.columns:
            log.info("%s has no column %s: reading its rows as %s=%r", path, name, name, spec.LEGACY[name])
            df[name] = spec.LEGACY[name]
    if df[KEY].isna().any(axis=None) or not df["status"].isin(STATUSES).all():
        raise TableError(f"{path} has rows with empty keys or unknown status: restore it or choose another --out; "
                         "it was not changed")
    try:
        return _normalize(df)
    except (TypeError, ValueError) as e:
        raise TableError(f"{path} has a value of the wrong type ({e}): restore it or choose another --out; "
                         "it was not changed") from None


def _normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Every column present, keys in their types (ValueError on a value that is not); a workload field a row
    lacks (one read from a table older than the field) has the value it was measured with (``spec.LEGACY``)."""
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    for c in spec.KEYS:
        if df[c].isna().any():
            df[c] = df[c].astype(object).where(df[c].notna(), spec.LEGACY.get(c))
    for c, kind in _TYPES.items():
        if kind is bool:
            df[c] = df[c].map(_as_bool)
        elif kind is int:
            df[c] = df[c].astype("int64")
        elif kind is float:
            df[c] = df[c].astype(float)
    df["batch_size"] = df["batch_size"].fillna(0).astype(int)
    df["clamped"] = df["clamped"].map(_as_bool)
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def _as_bool(v):
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v) if v is not None and v == v else False


def key_of(row) -> tuple:
    return tuple(_key_value(c, row[c]) for c in KEY)


def _key_value(col, v):
    kind = _TYPES[col]
    if kind is float:
        return round(float(v), 6)
    if kind is bool:
        return _as_bool(v)
    return kind(v)


def row_key(device, workload, fraction: float) -> tuple:
    """The key of the row ``workload`` on ``device`` (a ``DeviceInfo``) at ``fraction`` would have."""
    return key_of(_identity(workload, device, fraction))


def _identity(workload, device, fraction: float) -> dict:
    return {"gpu_name": device.name, "gpu_total_bytes": device.total_bytes, **workload.as_dict(),
            "fraction": fraction}


def merge(old: pd.DataFrame, rows: Iterable[dict]) -> pd.DataFrame:
    """``old`` with ``rows`` added; a new row replaces an old one with the same key."""
    new = pd.DataFrame(list(rows), columns=COLUMNS)
    if new.empty:
        return old
    new = _normalize(new)
    new_keys = {key_of(r) for _, r in new.iterrows()}
    kept = old[[key_of(r) not in new_keys for _, r in old.iterrows()]] if len(old) else old
    frames = [f for f in (kept, new) if len(f)]
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    return out.sort_values(["model", "imgsz", "precision", "optimizer", "gpu_total_bytes", "gpu_name"],
                           kind="stable", ignore_index=True)


_THREAD_LOCK = threading.Lock()  # POSIX record locks belong to the process: threads need their own


@contextlib.contextmanager
def locked(path: Path):
    """Exclusive access to the table at ``path`` across processes, hosts (NFS) and threads."""
    lock_path = path.with_name(path.name + ".lock")
    with _THREAD_LOCK, open(lock_path, "a+") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when the table cannot be written where asked."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise SpecError(f"out={str(path)!r}: folder {str(folder)!r} does not exist; create it or choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"out={str(path)!r}: folder {str(folder)!r} is not writable; choose another --out")
    if path.exists() and not os.access(path, os.R_OK):
        raise SpecError(f"out={str(path)!r} is not readable; fix its permissions or choose another --out")
    read(path)  # refuse a foreign or damaged table now, not after an hour of work
    return path


def write_rows(path: str | os.PathLike, rows: list[dict]) -> pd.DataFrame:
    """Merge ``rows`` into the table at ``path`` atomically; returns the table as written."""
    path = Path(path)
    with locked(path):
        df = merge(read(path), rows)
        try:
            _write_atomic(path, df)
        except OSError as e:
            raise TableWriteError(f"could not write {path} ({e.strerror or e}); the table on disk is unchanged: "
                                  "free space or choose another --out, then run again") from None
    return df


def _write_atomic(path: Path, df: pd.DataFrame) -> None:
    # mkstemp makes the file 0600; a table others read keeps its mode (new ones: 0644)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", newline="") as fh:
            df.to_csv(fh, index=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def done_keys(df: pd.DataFrame) -> set[tuple]:
    """Keys already decided (status ok, not measured next to other processes holding more than
    ``NEIGHBOUR_WARN_BYTES``): a re-run skips them unless forced."""
    crowded = pd.to_numeric(df["neighbour_bytes"], errors="coerce").fillna(0) > NEIGHBOUR_WARN_BYTES
    return {key_of(r) for _, r in df[(df["status"] == "ok") & ~crowded].iterrows()}


def decision_row(result, *, gpu_count: int = 1, attempts: int = 1) -> dict:
    """A table row from an ``engine.Result``."""
    d = result.decision
    return {
        **_base_row(result.workload, result.device, result.fraction, gpu_count, attempts, result.seconds),
        "batch_size": d.batch_size, "status": d.status, "predicted_batch": result.predicted_batch,
        "peak_bytes": d.peak_bytes,
        "val_peak_bytes": result.val_peak_bytes, "budget_bytes": d.budget_bytes,
        "bytes_per_sample": d.bytes_per_sample, "fixed_bytes": d.fixed_bytes, "r2": d.r2, "clamped": d.clamped,
        "probes": ",".join(str(p.batch) for p in d.probes),
        "probe_peak_bytes": ",".join("oom" if p.oom else str(p.peak_bytes) for p in d.probes),
        "measurements": d.measurements, "profile_seconds": round(result.profile_seconds, 3),
        "error": d.reason if d.status != "ok" else "",
    }


def error_row(workload, device, fraction: float, error: str, *, gpu_count: int = 1, attempts: int = 1,
              seconds: float = 0.0) -> dict:
    """A row for a combination that failed for a reason other than memory."""
    return {**_base_row(workload, device, fraction, gpu_count, attempts, seconds),
            "batch_size": 0, "status": "error", "error": error.replace("\n", " ")[:500]}


def _base_row(workload, device, fraction: float, gpu_count: int, attempts: int, seconds: float) -> dict:
    """What every row says: its key, the device and software it ran on, when, and how many tries."""
    from datetime import datetime, timezone

    from . import __version__

    return {
        **_identity(workload, device, fraction), "gpu_count": gpu_count, "card": device.card,
        "outside_bytes": device.outside_bytes, "neighbour_bytes": device.neighbour_bytes,
        "backend": device.backend, "seconds": round(seconds, 3),
        "attempts": attempts, "host": device.host, "torch": device.torch, "cuda": device.cuda,
        "driver": device.driver, "orchestrator": __version__,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
