"""The table's journal: a row is durable at one append, read sees CSV and journal merged (newest row for a key
wins), a fold writes what the read-merge-rewrite of every row would, and a killed writer loses nothing."""
import logging
import re
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from orchestrator import table
from orchestrator.journal import encode as journal_line
from orchestrator.simdevice import SimulatedBackend
from orchestrator.engine import decide_on
from orchestrator.spec import Workload

TINY = Workload(model="tiny_models:tiny", imgsz=64)


@pytest.fixture(scope="module")
def rows(profiles):
    """Rows as a sweep writes them: one real decision (ok) and one error row, and copies under other keys."""
    backend = SimulatedBackend("T4")
    backend.add_profile(profiles(TINY))
    ok = table.decision_row(decide_on(backend, TINY, 0.8))
    error = table.error_row(TINY, backend.info(), 0.8, "RuntimeError: boom")

    def make(n, start=0):
        return [dict(error if i % 5 == 4 else ok, model=f"m{i // 20}:x", imgsz=32 * (i % 20 + 1),
                     batch_size=0 if i % 5 == 4 else i + 1) for i in range(start, start + n)]
    return make


def test_a_write_is_one_append_and_read_merges_newest_wins(tmp_path, rows):
    """The first write makes the CSV; later ones go to the journal only, which read merges in: a key
    written again reads as its newest row; fold leaves the same table in the CSV and no journal."""
    out = tmp_path / "t.csv"
    first, second = rows(3), rows(2, start=3)
    table.write_rows(out, first)
    csv_before = out.read_bytes()
    table.write_rows(out, second)
    table.write_rows(out, [dict(first[0], batch_size=777)])  # the same key as a row in the CSV
    assert out.read_bytes() == csv_before and table.journal_path(out).exists()
    df = table.read(out)
    assert len(df) == 5 and sorted(df["batch_size"]) == sorted([777, 2, 3, 4, 0])
    table.fold(out)
    assert not table.journal_path(out).exists()
    cols = [*table.KEY, "batch_size", "status", "peak_bytes", "probes"]
    pd.testing.assert_frame_equal(table.read(out)[cols], df[cols], check_dtype=False)
    assert len(pd.read_csv(out)) == 5


def test_fold_writes_what_rewriting_the_csv_for_every_row_would(tmp_path, rows):
    """The same writes one row at a time (keys written twice, error rows among ok ones): a fold of the
    journal leaves the CSV byte for byte as the old path (read, merge, rewrite per row) leaves it."""
    writes = rows(40) + [dict(r, batch_size=900 + i) for i, r in enumerate(rows(40)[::7])]
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    for row in writes:
        table._write_atomic(old, table.merge(table.read(old), [row]))
        table.write_rows(new, [row])
    assert table.journal_path(new).exists()
    table.fold(new)
    assert new.read_bytes() == old.read_bytes()


def test_torn_last_journal_line_is_ignored_with_a_warning(tmp_path, rows, caplog):
    """A writer killed mid-append leaves a line without its end: read warns and leaves it out, the next
    append cuts it off (no row joins it) and a fold keeps every whole row."""
    out = tmp_path / "t.csv"
    table.write_rows(out, rows(1))
    table.write_rows(out, rows(2, start=1))
    journal = table.journal_path(out)
    whole = journal.read_bytes()
    journal.write_bytes(whole + journal_line(rows(1, start=3)[0], table.COLUMNS)[:-40])
    with caplog.at_level(logging.WARNING, logger="orchestrator.journal"):
        assert len(table.read(out)) == 3
    assert "after its last whole line" in caplog.text
    table.write_rows(out, rows(1, start=4))
    assert journal.read_bytes().startswith(whole) and len(table.read(out)) == 4
    table.fold(out)
    assert len(pd.read_csv(out)) == 4


def test_damaged_journal_line_is_refused_and_left_as_it_is(tmp_path, rows):
    """A line whose checksum fails before the last one is damage, not a kill: TableError, file unchanged."""
    out = tmp_path / "t.csv"
    table.write_rows(out, rows(1))
    table.write_rows(out, rows(2, start=1))
    journal = table.journal_path(out)
    damaged = journal.read_bytes().replace(b'"status":"ok"', b'"status":"OK"', 1)
    journal.write_bytes(damaged)
    with pytest.raises(table.TableError, match="line 1 is damaged"):
        table.check_writable(out)
    assert journal.read_bytes() == damaged


@pytest.mark.parametrize("change,needle", [({"status": "bogus", "batch_size": 999}, "status='bogus' must be one of"),
                                           ({"batch_size": -5}, "batch_size=-5 must be an integer >= 0")])
def test_a_whole_journal_line_that_is_not_a_row_is_refused_as_a_csv_row_is(tmp_path, rows, change, needle, capsys):
    """A checksummed journal line that write_rows would have refused (unknown status, negative batch) is not
    answered: read raises, `lookup` exits 2 with one line, and neither file changes."""
    from orchestrator import cli

    out = tmp_path / "t.csv"
    table.write_rows(out, rows(1))
    row = dict(rows(1, start=1)[0], **change)
    journal = table.journal_path(out)
    journal.write_bytes(journal_line(row, table.COLUMNS))  # whole: its checksum matches
    before = (out.read_bytes(), journal.read_bytes())
    with pytest.raises(table.TableError, match=rf"journal line 1 is not a valid table row \(.*{re.escape(needle)}"):
        table.read(out)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["lookup", str(out), "--model", row["model"], "--imgsz", str(row["imgsz"]), "--gpu", "T4"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    stdout, err = capsys.readouterr()
    assert (code, stdout, len(err.splitlines())) == (2, "", 1) and needle in err, err
    assert (out.read_bytes(), journal.read_bytes()) == before


def test_a_negative_batch_size_in_the_csv_is_refused(tmp_path):
    out = tmp_path / "t.csv"
    out.write_text("gpu_name,gpu_total_bytes,model,imgsz,fraction,batch_size,status\n"
                   "Tesla T4,15835594752,tiny_models:tiny,64,0.8,-5,ok\n")
    with pytest.raises(table.TableError, match="batch_size=-5, which must be an integer >= 0"):
        table.read(out)


def test_bad_row_is_refused_before_anything_is_written(tmp_path, rows):
    """A row read could not read back (unknown status, a key of the wrong type) writes nothing."""
    out = tmp_path / "t.csv"
    table.write_rows(out, rows(1))
    table.write_rows(out, rows(1, start=1))
    journal = table.journal_path(out).read_bytes()
    for bad, needle in ((dict(rows(1, start=2)[0], status="fine"), "status='fine'"),
                        (dict(rows(1, start=2)[0], imgsz="big"), "imgsz='big' must be a int")):
        with pytest.raises(ValueError, match=needle):
            table.write_rows(out, [rows(1, start=3)[0], bad])
    assert table.journal_path(out).read_bytes() == journal and len(table.read(out)) == 2


def test_killed_writer_loses_no_confirmed_row(tmp_path, rows):
    """SIGKILL while a process writes rows one at a time (folding every few rows): every row whose write
    returned is read back, the journal's torn tail (if any) is dropped, and a fold puts all in the CSV."""
    out = tmp_path / "t.csv"
    source = tmp_path / "rows.csv"
    pd.DataFrame(rows(400)).to_csv(source, index=False)
    code = textwrap.dedent(f"""
        import sys
        import pandas as pd
        from orchestrator import table
        table.FOLD_BYTES = 8000  # a fold every few rows: the kill may land in one
        for i, row in enumerate(pd.read_csv({str(source)!r}, keep_default_na=False).to_dict("records")):
            table.write_rows({str(out)!r}, [row])
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    confirmed = -1
    deadline = time.monotonic() + 60
    while confirmed < 150 and time.monotonic() < deadline:
        confirmed = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    confirmed = max([confirmed, *map(int, proc.stdout.read().split())])
    proc.wait()
    assert confirmed >= 150
    df = table.read(out)
    assert confirmed + 1 <= len(df) <= confirmed + 2  # a row may be appended and not yet confirmed
    written = sorted(df["batch_size"].tolist())
    expected = sorted(r["batch_size"] for r in rows(len(df)))
    assert written == expected
    table.write_rows(out, rows(1, start=400))
    table.fold(out)
    assert len(pd.read_csv(out)) == len(df) + 1 and not table.journal_path(out).exists()
