"""Bad input and failures lose nothing and explain themselves: one line, exit code, table unchanged."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import cluster, fleet, job, sweeploop, table
from orchestrator.spec import SpecError
from orchestrator.cuda import cuda_count

ROOT = Path(__file__).resolve().parent.parent
EXISTING = ("gpu_name,gpu_total_bytes,model,imgsz,precision,optimizer,ema,cudnn_benchmark,fraction,batch_size,status\n"
            "Tesla T4,15835594752,tiny_models:tiny,64,fp16,SGD,True,False,0.8,512,ok\n")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def job_file(tmp_path, body):
    p = tmp_path / "job.toml"
    p.write_text(textwrap.dedent(body))
    return str(p)


SWEEP = ["sweep", "--simulate", "T4"]
CASES = {
    "unknown model": (SWEEP + ["--models", "torchvision:resnet9000"], "not a torchvision classifier"),
    "malformed model string": (SWEEP + ["--models", "resnet50"], "must be SOURCE:NAME"),
    "model factory raises": (SWEEP + ["--models", "tiny_models:factory_raises"], "factory_raises() raised RuntimeError"),
    "factory returns no module": (SWEEP + ["--models", "tiny_models:not_a_module"], "not a torch.nn.Module"),
    "imgsz <= 0": (SWEEP + ["--models", "tiny_models:tiny", "--imgsz", "0"], "imgsz=0"),
    "imgsz not an integer": (SWEEP + ["--models", "tiny_models:tiny", "--imgsz", "64.5"], "list of int"),
    "imgsz not a stride multiple": (SWEEP + ["--models", "ultralytics:yolov8n.yaml", "--imgsz", "600"],
                                    "multiple of ultralytics:yolov8n.yaml's stride 32: use 576 or 608"),
    "fraction above 1": (SWEEP + ["--fraction", "1.3"], r"--fraction=1.3 must be in (0, 1]"),
    "fraction zero": (["autobatch", "--model", "tiny_models:tiny", "--gpu", "T4", "--fraction", "0"], "fraction=0.0"),
    "empty model list": (SWEEP + ["--models", ","], "must be a non-empty list"),
    "unknown catalog card": (["sweep", "--simulate", "T4, GTX-1080"], "unknown GPU 'GTX-1080'"),
    "bad fleet spec": (["sweep", "--simulate", "T4 x two"], "must be CARD or CARD xN"),
    "job file missing": (["sweep", "jobs/nope.toml"], "does not exist"),
    "Ray address unreachable": (SWEEP[:1] + ["--models", "tiny_models:tiny", "--address", "127.0.0.1:9"],
                                "nothing answers there"),
    "no GPUs for --real": (["sweep", "--models", "tiny_models:tiny", "--real"], "has no GPUs"),
    "bad precision flag": (SWEEP + ["--precision", "fp8"], "--precision='fp8' must be one of fp32, fp16, bf16"),
    "max batch zero": (SWEEP + ["--max-batch", "0"], "--max-batch=0 must be >= 1"),
}


NEEDS_NO_GPU = {"no GPUs for --real"}  # on a machine with a GPU these are not errors


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(n in NEEDS_NO_GPU and cuda_count() > 0, reason="this machine has a GPU"))
    for n in CASES])
def test_bad_cli_input_one_line_exit_2_table_unchanged(tmp_path, name):
    args, needle = CASES[name]
    out = tmp_path / "table.csv"
    out.write_text(EXISTING)
    p = cli(*args, "--out", str(out)) if args[0] == "sweep" else cli(*args)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert needle in lines[0]
    assert out.read_text() == EXISTING


@pytest.mark.parametrize("body,needle", [
    ('[sweep\nmodels = ["tiny_models:tiny"]\n', "not valid TOML"),
    ('[sweep]\nmodels = ["tiny_models:tiny"]\nimg_size = [64]\n', "unknown key 'img_size'; allowed:"),
    ('[sweep]\nmodels = ["tiny_models:tiny"]\nimgsz = "64"\n', "imgsz entry '64' must be a int"),
    ('[sweep]\nmodels = ["tiny_models:tiny"]\nmax_batch = 2.5\n', "max_batch=2.5 must be a int"),
])
def test_bad_job_file_names_file_key_value(tmp_path, body, needle):
    out = tmp_path / "table.csv"
    out.write_text(EXISTING)
    path = job_file(tmp_path, body)
    p = cli("sweep", path, "--out", str(out))
    assert p.returncode == 2
    line = p.stderr.strip()
    assert "\n" not in line and path in line and needle in line, line
    assert out.read_text() == EXISTING


@pytest.mark.parametrize("content,needle", [
    ("name,score\nbob,3\n", "not an orchestrator batch table (no column gpu_name"),
    (EXISTING + "Tesla T4,15835594752,tiny_models:tiny,96,fp16,SG", "ends mid-row (truncated)"),
])
def test_foreign_or_truncated_table_is_refused_untouched(tmp_path, content, needle):
    out = tmp_path / "table.csv"
    out.write_text(content)
    p = cli("sweep", "--simulate", "T4", "--models", "tiny_models:tiny", "--out", str(out))
    assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert out.read_text() == content


def test_missing_output_folder(tmp_path):
    p = cli("sweep", "--simulate", "T4", "--models", "tiny_models:tiny", "--out", str(tmp_path / "no" / "t.csv"))
    assert p.returncode == 2 and "does not exist; create it" in p.stderr


@pytest.mark.parametrize("args", [["--debug", "autobatch", "--model", "resnet50", "--gpu", "T4"],
                                  ["autobatch", "--model", "resnet50", "--gpu", "T4", "--debug"]])
def test_debug_shows_the_traceback_before_or_after_the_subcommand(args):
    p = cli(*args)
    assert p.returncode == 2 and "Traceback" in p.stderr and "must be SOURCE:NAME" in p.stderr


def test_failed_disk_write_keeps_the_old_table(tmp_path):
    """A write that the OS refuses (file size limit: as a full disk would) leaves the old table byte-identical."""
    out = tmp_path / "table.csv"
    out.write_text(EXISTING)
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(EXISTING) + 50}, {len(EXISTING) + 50}))
        from orchestrator import table
        row = dict(table.read({str(out)!r}).iloc[0])
        rows = [dict(row, imgsz=s) for s in range(96, 400, 32)]
        try:
            table.write_rows({str(out)!r}, rows)
        except table.TableWriteError as e:
            print(e); sys.exit(7)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 7, p.stderr
    assert "the table on disk is unchanged" in p.stdout
    assert out.read_text() == EXISTING
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp file left behind


def test_no_fit_is_a_row_not_an_error(ray_session, tmp_path):
    """A model larger than the card: a no-fit row with the reason; the sweep succeeds."""
    j = job.from_dict({"sweep": {"models": ["torchvision:resnet50"], "imgsz": [3072], "precision": ["fp32"],
                                 "optimizer": ["AdamW"], "out": str(tmp_path / "t.csv")},
                       "fleet": {"mode": "simulate", "simulate": "T4"}}, "test")
    stats, df = fleet.run_sweep(j)
    assert (stats.no_fit, stats.errors) == (1, 0)
    row = df.iloc[0]
    assert (row["status"], row["batch_size"]) == ("no-fit", 0)
    assert "batch 1" in row["error"]


def test_combination_past_time_limit_is_cancelled(ray_session, tmp_path):
    """A combination that runs past task_timeout_s is cancelled and recorded; the sweep goes on. (20 s: the
    tiny model's own profile took 9.6 s on the 2-core build machine under a load of 15.)"""
    j = job.from_dict({"sweep": {"models": ["tiny_models:tiny_hangs", "tiny_models:tiny"], "imgsz": [64],
                                 "out": str(tmp_path / "t.csv")},
                       "fleet": {"mode": "simulate", "simulate": "T4, A10G", "task_timeout_s": 20}}, "test")
    stats, df = fleet.run_sweep(j)
    rows = {(r["model"], r["card"]): r for _, r in df.iterrows()}
    assert len(rows) == 4
    for card in ("T4", "A10G"):
        assert rows[("tiny_models:tiny", card)]["status"] == "ok"
        slow = rows[("tiny_models:tiny_hangs", card)]
        assert slow["status"] == "error" and "cancelled after 20s" in slow["error"]


def test_two_sweeps_on_one_table_lose_nothing(ray_session, tmp_path):
    """Two sweeps writing the same table at once (different models): every row of both is there."""
    import threading

    out = str(tmp_path / "t.csv")
    jobs = [job.from_dict({"sweep": {"models": [m], "imgsz": [64, 96], "out": out},
                           "fleet": {"mode": "simulate", "simulate": "T4, A10G"}}, "test")
            for m in ("tiny_models:tiny", "torchvision:mobilenet_v3_small")]
    errors = []

    def run(j):
        try:
            sweep = sweeploop.Sweep(j)
            sweep.start(cluster.resolve_devices(j.fleet)[0])
            sweep.run()
            sweep.shutdown()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    df = table.read(out)
    assert len(df) == 8 and (df["status"] == "ok").all()


def _hammer(path, model, n):
    from orchestrator import table as t

    base = dict(pd.read_csv(path).iloc[0])
    for i in range(n):
        t.write_rows(path, [dict(base, model=model, imgsz=i + 1)])


def test_concurrent_processes_writing_one_table(tmp_path):
    """Four processes merging 25 rows each into one table, one row per write: all 100 rows land."""
    import multiprocessing as mp

    out = tmp_path / "table.csv"
    out.write_text(EXISTING)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(out), f"m{k}:x", 25)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    df = table.read(out)
    assert len(df) == 1 + 100


@pytest.mark.parametrize("content,needle", [
    (EXISTING.replace(",64,", ",abc,"), "has a value of the wrong type"),
])
def test_table_with_bad_values_is_refused(tmp_path, content, needle):
    out = tmp_path / "table.csv"
    out.write_text(content)
    with pytest.raises(table.TableError, match=needle):
        table.check_writable(out)
    assert out.read_text() == content


def test_out_is_a_folder(tmp_path):
    with pytest.raises(table.TableError, match="is a folder: name a CSV file"):
        table.check_writable(tmp_path)


def test_table_keeps_its_file_mode(tmp_path):
    """The journal and the rewritten CSV have the table's mode: trainers under other users read both
    (mkstemp alone makes 0600, a new file the umask's 0644)."""
    out = tmp_path / "table.csv"
    out.write_text(EXISTING)
    out.chmod(0o664)
    row = dict(table.read(out).iloc[0])
    table.write_rows(out, [dict(row, imgsz=96)])
    assert table.journal_path(out).stat().st_mode & 0o777 == 0o664
    table.fold(out)
    assert out.stat().st_mode & 0o777 == 0o664 and len(pd.read_csv(out)) == 2


def test_table_without_a_newer_key_column_reads_as_its_default(tmp_path):
    """A table written before a workload field existed is read with that field at its default, answers
    lookups, and keeps its rows when new ones are merged in (the column is added)."""
    from orchestrator import lookup

    out = tmp_path / "table.csv"
    out.write_text(EXISTING.replace(",cudnn_benchmark,", ",").replace(",True,False,0.8,", ",True,0.8,"))
    df = table.read(out)
    assert df["cudnn_benchmark"].tolist() == [False]
    # fields added after that: the values those rows were measured with, not today's defaults
    assert (df.loc[0, "objects"], df.loc[0, "nbs"], df.loc[0, "val_scale"], df.loc[0, "classes"]) == (8, 1, 0, 0)
    assert lookup(out, "tiny_models:tiny", 64, "T4", objects=8, nbs=1, val_scale=0,
                  deterministic=False).batch_size == 512
    with pytest.raises(SpecError, match="deterministic=True is not in .* it has deterministic False"):
        lookup(out, "tiny_models:tiny", 64, "T4")  # today's step is not the one those rows measured
    table.write_rows(out, [dict(df.iloc[0], imgsz=96, batch_size=300)])
    table.fold(out)
    again = pd.read_csv(out)
    assert "cudnn_benchmark" in again.columns and sorted(again["imgsz"]) == [64, 96]


def test_stdout_holds_only_our_output_when_ray_reports_a_death(tmp_path):
    """A sweep in which a process dies, which Ray's driver reports as "(raylet) A worker died ..." on
    sys.stdout: stdout holds the pivot, the summary and the table path only; Ray's lines go to stderr."""
    out = tmp_path / "t.csv"
    path = job_file(tmp_path, """
        [sweep]
        models = ["tiny_models:tiny_crashes", "tiny_models:tiny"]
        imgsz = [64]
        [fleet]
        mode = "simulate"
        simulate = "T4 x8"
        max_attempts = 1
    """)
    p = cli("sweep", path, "--out", str(out))
    assert p.returncode == 3, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["gpu", "T4", "(15", "GiB)"] and lines[1].split() == ["model", "imgsz"], p.stdout
    assert [line.split()[0] for line in lines[2:4]] == ["tiny_models:tiny", "tiny_models:tiny_crashes"], p.stdout
    assert lines[4:] == ["", lines[5], f"table: {out}"] and lines[5].startswith("2 rows written (1 ok, 0 no-fit, 1 error)")
    assert "(raylet) A worker died" in p.stderr.replace("\x1b[33m", "").replace("\x1b[0m", "")  # Ray did report
