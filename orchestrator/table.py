"""The batch table: one row per (card type, workload, fraction), as CSV on disk, with a journal beside it.

A finished row is made durable by one fsynced append to ``TABLE.journal`` (a line per row: its CRC32 and
the row as JSON), under an advisory lock (``fcntl.lockf`` on ``TABLE.lock``, which also works on NFS
mounts with lockd): a write costs the same whatever the size of the table. The journal is folded into
the CSV in batches (``fold``: when it passes ``FOLD_BYTES`` or a quarter of the CSV, when the CSV is
``FOLD_SECONDS`` old or does not exist yet, and at the end of a sweep): read, merge, a temp file in the
same folder that is fsynced and renamed over the CSV, then the journal is removed. So the CSV is never
half-written, a killed writer loses no finished row (``read`` merges the CSV and the journal, the newest
row for a key winning, and the next fold folds them in), and two sweeps writing one table both keep
their rows.

``read`` (and so ``lookup``, ``report`` and a re-run's skip) sees every journaled row; a plain CSV reader
(pandas) sees the rows up to the last fold while a sweep runs, and all of them once it has finished.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

import pandas as pd

from . import calibration, spec
from . import journal as journal_
from .catalog import NEIGHBOUR_WARN_BYTES
from .errors import SpecError, TableError, TableWriteError

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
    "calibration", "sim_error",
]
STATUSES = ("ok", "no-fit", "error")
FOLD_BYTES = 1 << 20
"""Fold the journal into the CSV once it holds this much (about 1,250 rows) or a quarter of the CSV's size,
whichever is more: a fold rewrites the whole CSV (about a second at 20,000 rows), so folding after a share
of the table keeps its cost per row from growing with the table, and ``read`` parses at most that share."""
FOLD_SECONDS = 30.0
"""... or once the CSV is this old: a plain CSV reader is at most this far behind a running sweep."""
_READ_TRIES = 10


def empty() -> pd.DataFrame:
    return pd.DataFrame(columns=COLUMNS)


def journal_path(path: str | os.PathLike) -> Path:
    """Where the rows written since the last fold of the table at ``path`` are: ``TABLE.journal``."""
    path = Path(path)
    return path.with_name(path.name + ".journal")


def read(path: str | os.PathLike) -> pd.DataFrame:
    """The table at ``path``, its CSV and its journal merged (empty if neither exists); TableError if
    either is not one of ours. Takes no lock: a fold between reading the CSV and the journal (the CSV
    replaced) is seen and the read done again."""
    path = Path(path)
    journal = journal_path(path)
    for _ in range(_READ_TRIES):
        before = _file_id(path)
        df, rows = _read_csv(path), journal_.read_rows(journal, _check_row)
        if _file_id(path) == before:
            break
    else:  # folded under us every time: read under the writers' lock
        with locked(path):
            df, rows = _read_csv(path), journal_.read_rows(journal, _check_row)
    try:
        return merge(df, rows)
    except (TypeError, ValueError) as e:
        raise TableError(f"{journal} has a value of the wrong type ({e}): restore it or remove it; "
                         "it was not changed") from None


def _file_id(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_csv(path: Path) -> pd.DataFrame:
    """The CSV alone (empty if absent); TableError if the file is not one of ours."""
    if path.is_dir():
        raise TableError(f"{path} is a folder: name a CSV file, e.g. {path / 'batch_table.csv'}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return empty()
    if not raw.strip():
        return empty()
    if not raw.endswith(b"\n"):
        raise TableError(f"{path} ends mid-row (truncated): restore it or choose another --out; it was not changed")
    try:
        df = pd.read_csv(io.BytesIO(raw), keep_default_na=False, na_values=[""])
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
        elif spec.DEFAULTS.get(name) == "":  # a text field whose value may be "": the CSV's empty cell (not NaN)
            df[name] = df[name].astype(object).where(df[name].notna(), "")
    if df[KEY].isna().any(axis=None) or not df["status"].isin(STATUSES).all():
        raise TableError(f"{path} has rows with empty keys or unknown status: restore it or choose another --out; "
                         "it was not changed")
    bad = [b for b in df["batch_size"].dropna().tolist() if not _is_batch(b)]
    if bad:
        raise TableError(f"{path} has a row with batch_size={bad[0]!r}, which must be an integer >= 0: restore it "
                         "or choose another --out; it was not changed")
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


def _keys(df: pd.DataFrame) -> list[tuple]:
    """``key_of`` of every row of ``df``, column by column (``iterrows`` costs 30 us a row)."""
    return list(zip(*([_key_value(c, v) for v in df[c].tolist()] for c in KEY))) if len(df) else []


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
    """``old`` with ``rows`` added; a new row replaces an old one with the same key, and of new rows with
    the same key the last one wins."""
    new = pd.DataFrame(list(rows), columns=COLUMNS)
    if new.empty:
        return old
    new = _normalize(new)
    new_keys = _keys(new)
    last = {k: i for i, k in enumerate(new_keys)}
    if len(last) < len(new):  # in the order each key was last written, as one write per row would leave them
        new = new.iloc[sorted(last.values())].reset_index(drop=True)
    kept = old[[k not in last for k in _keys(old)]] if len(old) else old
    frames = [f for f in (kept, new) if len(f)]
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    return out.sort_values(["model", *spec.SIZES, "precision", "optimizer", "gpu_total_bytes", "gpu_name"],
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


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Make ``rows`` part of the table at ``path``: one fsynced append to its journal (the same cost
    whatever the table's size), folded into the CSV when due (``_fold_due``). TableWriteError when the
    append fails (the table is then as it was); ValueError for a row that is not a table row (nothing is
    written)."""
    path, rows = Path(path), list(rows)
    for row in rows:
        _check_row(row)
    data = b"".join(journal_.encode(row, COLUMNS) for row in rows)
    if not data:
        return
    with locked(path):
        csv = _stat(path)  # the CSV (None before the table's first fold): its mode, and whether a fold is due
        try:
            size = journal_.append(journal_path(path), data, _mode_of(csv))
        except OSError as e:
            raise TableWriteError(f"could not write {path} ({e.strerror or e}); the table on disk is unchanged: "
                                  "free space or choose another --out, then run again") from None
        if _fold_due(csv, size):
            try:
                _fold_locked(path)
            except TableWriteError as e:  # the rows are safe in the journal; the next fold tries again
                log.warning("%s", e)


def fold(path: str | os.PathLike) -> None:
    """Fold the journal of the table at ``path`` into its CSV (atomically), then remove the journal;
    nothing to do without one. TableWriteError when the CSV cannot be written (the journal is kept)."""
    path = Path(path)
    if not journal_path(path).exists():
        return
    with locked(path):
        _fold_locked(path)


def _fold_locked(path: Path) -> None:
    journal = journal_path(path)
    rows = journal_.read_rows(journal, _check_row)
    if rows:
        df = merge(_read_csv(path), rows)
        try:
            _write_atomic(path, df)
        except OSError as e:
            raise TableWriteError(f"could not write {path} ({e.strerror or e}); the CSV on disk is unchanged and "
                                  f"the rows since its last write are kept in {journal.name} (the table as "
                                  "read includes them): free space, then run again") from None
    with contextlib.suppress(FileNotFoundError):
        journal.unlink()


def _fold_due(csv: os.stat_result | None, journal_bytes: int) -> bool:
    """At a new table's first rows (no ``csv``), when the journal passes ``FOLD_BYTES`` or a quarter of the
    CSV, or when the CSV is ``FOLD_SECONDS`` old."""
    if csv is None:
        return True  # the table's first rows: a CSV for plain readers at once
    return journal_bytes >= max(FOLD_BYTES, csv.st_size // 4) or time.time() - csv.st_mtime >= FOLD_SECONDS


def _check_row(row: dict) -> None:
    """Refuse, before anything is written, a row that ``read`` could not read back."""
    for c in KEY:
        v = row.get(c)
        if v is None or v != v:  # missing or NaN
            if c in spec.LEGACY:  # a row from a table older than the field: read back as what it measured
                continue
            raise ValueError(f"a table row needs {c}: got {v!r}")
        try:
            _key_value(c, v)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"a table row's {c}={v!r} must be a {_TYPES[c].__name__}") from None
    if row.get("status") not in STATUSES:
        raise ValueError(f"a table row's status={row.get('status')!r} must be one of {', '.join(STATUSES)}")
    batch = row.get("batch_size")
    if batch is not None and batch == batch and not _is_batch(batch):
        raise ValueError(f"a table row's batch_size={batch!r} must be an integer >= 0")


def _is_batch(v) -> bool:
    """A batch size: a whole number >= 0 (an int, or a float such as a CSV column with gaps holds)."""
    try:
        return not isinstance(v, (bool, str)) and int(v) == v and v >= 0
    except (TypeError, ValueError, OverflowError):
        return False


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _mode_of(csv: os.stat_result | None) -> int:
    """The table's file mode (``csv``: its stat), for its rewrites and its journal: trainers under other
    users read both (mkstemp alone makes 0600); a new table is 0644."""
    return csv.st_mode & 0o777 if csv is not None else 0o644


def _write_atomic(path: Path, df: pd.DataFrame) -> None:
    mode = _mode_of(_stat(path))
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
    journal_.fsync_dir(path.parent)  # the rename is durable before the journal it replaces goes


def done_keys(df: pd.DataFrame) -> set[tuple]:
    """Keys already decided (status ok, not measured next to other processes holding more than
    ``NEIGHBOUR_WARN_BYTES``): a re-run skips them unless forced."""
    crowded = pd.to_numeric(df["neighbour_bytes"], errors="coerce").fillna(0) > NEIGHBOUR_WARN_BYTES
    return set(_keys(df[(df["status"] == "ok") & ~crowded]))


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
        # a simulated answer: which calibration against real GPUs it carries, and how far it was off there
        **({"calibration": calibration.VERSION, "sim_error": calibration.expected_error(workload.model)}
           if device.backend == "simulated" else {"calibration": "", "sim_error": ""}),
    }
