"""The command line as a user runs it: real subprocesses, exit codes, stdout vs stderr."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import table

ROOT = Path(__file__).resolve().parent.parent
EXISTING = ("gpu_name,gpu_total_bytes,model,imgsz,precision,optimizer,ema,cudnn_benchmark,fraction,batch_size,status\n"
            "Tesla T4,15835594752,tiny_models:tiny,64,fp16,SGD,True,False,0.8,512,ok\n")


def run(*args, timeout=300, cwd=None):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT)


def test_autobatch_cli_prints_decision():
    p = run("autobatch", "--model", "torchvision:resnet18", "--imgsz", "224", "--gpu", "T4", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "ok" and out["batch_size"] > 0
    assert out["probes"][-1][0] == out["batch_size"] or out["batch_size"] in [b for b, _ in out["probes"]]
    # a simulated answer carries its calibration against real GPUs; none is published for a torchvision model
    assert out["sim_error"] == "unknown" and out["calibration"]


@pytest.mark.parametrize("args,needle", [
    (["autobatch", "--model", "torchvision:resnet5", "--gpu", "T4"], "not a torchvision classifier"),
    (["autobatch", "--model", "ultralytics:yolov8n.yaml", "--imgsz", "641", "--gpu", "T4"], "use 640 or 672"),
    (["autobatch", "--model", "torchvision:resnet18", "--imgsz", "-3", "--gpu", "T4"], "imgsz=-3"),
    (["autobatch", "--model", "torchvision:resnet18", "--fraction", "0", "--gpu", "T4"], "fraction=0.0"),
    (["autobatch", "--model", "torchvision:resnet18", "--gpu", "K80"], "unknown GPU 'K80'"),
    (["sweep", "--simulate", "T4 x2, B200", "--out", "/tmp/never.csv"], "unknown GPU 'B200'"),
    (["sweep", "jobs/missing.toml"], "does not exist"),
])
def test_bad_input_exit_2_one_line(args, needle):
    p = run(*args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


def _job(tmp_path, models, imgsz, out):
    text = (f'[sweep]\nmodels = {json.dumps(models)}\nimgsz = {json.dumps(imgsz)}\nout = "{out}"\n'
            '[fleet]\nmode = "simulate"\nsimulate = "T4, A100-80GB"\n')
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_sweep_keeps_rows_and_rerun_does_the_rest(tmp_path, sig, code):
    """Interrupt after the first rows land: distinct exit code, a valid table of finished rows,
    and a re-run that measures only what is missing."""
    out = tmp_path / "t.csv"
    # tiny's rows land within seconds; tiny_slower's profiles take >= 8 s each, so the
    # signal arrives while work is in flight
    models = ["tiny_models:tiny", "tiny_models:tiny_slower"]
    job = _job(tmp_path, models, [64, 96], out)
    # SIGINT as at a terminal: a suite started in the background of a non-interactive shell has it
    # ignored, and a child would inherit that (Python then keeps Ctrl-C ignored)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(job)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 480  # Ray, 2 profile workers and 2 actors start first: slow on a loaded machine
    while time.monotonic() < deadline and len(table.read(out)) < 2:  # journaled rows count: read sees them
        time.sleep(0.2)
    assert len(table.read(out)) >= 2, "no rows within 480 s: the signal would not interrupt a sweep in flight"
    proc.send_signal(sig)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert time.monotonic() - t0 < 20
    done = pd.read_csv(out)  # a plain CSV reader: the interrupted sweep folded its journal into the CSV
    assert 2 <= len(done) < 8 and (done["status"] == "ok").all()
    assert len(table.read(out)) == len(done) and not table.journal_path(out).exists()
    p = run("sweep", str(job))
    assert p.returncode == 0, p.stderr
    final = pd.read_csv(out)
    assert len(final) == 8 and (final["status"] == "ok").all()
    assert f"{len(done)} already in the table" in p.stdout


def test_sweep_with_error_rows_exits_3_and_user_model_from_cwd(tmp_path):
    """A model module in the working directory (not on PYTHONPATH) is importable in the Ray workers;
    a sweep that wrote an error row exits 3 with one line saying so; its ok rows are in the table."""
    (tmp_path / "usermodels.py").write_text(
        "from tiny_models import Tiny\n\n\ndef build():\n    return Tiny(fail_at=96)\n")
    p = run("sweep", "--simulate", "T4", "--models", "usermodels:build", "--imgsz", "64,96", "--out", "t.csv",
            cwd=tmp_path)
    assert p.returncode == 3, p.stderr[-2000:]
    df = pd.read_csv(tmp_path / "t.csv")
    status = dict(zip(df["imgsz"], df["status"]))
    assert status == {64: "ok", 96: "error"}, df[["imgsz", "status", "error"]]
    assert "ValueError: Tiny does not support 96 px" in df.set_index("imgsz").loc[96, "error"]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 rows are `error`" in errors[0], p.stderr


@pytest.fixture
def in_process_cli():
    """``cli.main`` in this process, on the session's Ray; main() installs a SIGTERM handler: put it back."""
    from orchestrator import cli

    previous = signal.getsignal(signal.SIGTERM)
    yield cli.main
    signal.signal(signal.SIGTERM, previous)


def test_devices_lists_the_simulated_fleet_by_type(ray_session, in_process_cli, capsys):
    """`devices --simulate`: the fleet grouped into types, each with its count, total, memory outside the
    allocator and what is left, then every catalog card."""
    from orchestrator import catalog
    from orchestrator.units import gib

    assert in_process_cli(["devices", "--simulate", "T4 x2, H100-80GB"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "simulated fleet: 3 devices in 2 types"
    for key, count in (("T4", 2), ("H100-80GB", 1)):
        c = catalog.card(key)
        cells = [c.name, str(count), gib(c.total_bytes), gib(c.context_bytes), gib(c.total_bytes - c.context_bytes),
                 "simulated"]
        assert re.search(r"\s+".join(map(re.escape, cells)), out), (key, out)
    catalog_lines = out.split("catalog")[1]
    assert all(key in catalog_lines for key in catalog.CATALOG)


def test_failed_table_write_stops_the_sweep_with_exit_1(ray_session, in_process_cli, tmp_path, monkeypatch, capsys):
    """The disk refuses the table (no space left at fsync): the sweep stops with exit code 1 and one
    error line, and the table on disk is byte-for-byte the previous one, with no temp file left."""
    import errno

    table = tmp_path / "t.csv"
    table.write_text(EXISTING)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    code = in_process_cli(["sweep", "--simulate", "T4", "--models", "tiny_models:tiny", "--imgsz", "32",
                           "--out", str(table)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert len(errors) == 1 and "could not write" in errors[0] and "No space left on device" in errors[0], errors
    assert table.read_text() == EXISTING
    assert sorted(os.listdir(tmp_path)) == ["t.csv", "t.csv.lock"]


# -- bad input that used to slip through (issue 22): one line naming the value, the constraint and the fix,
# exit 2, nothing written, and nothing large allocated before the check


@pytest.mark.parametrize("args,needle", [
    (["--model", "torchvision:resnet18", "--classes", "10000000"], "classes=10000000 must be at most 100000"),
    (["--model", "ultralytics:yolov8n.yaml", "--objects", "1000000000000"],
     "objects=1000000000000 must be at most 10000"),
])
def test_huge_classes_or_objects_are_refused_before_any_model_is_built(args, needle):
    """resnet18 with 10,000,000 classes would be a 20 GB head, built in host memory before anything is faked:
    the field's bound refuses it first. The command runs with its address space capped 2 GiB above what
    importing torch took (a build that came back would fail, not swap) and its peak memory is read."""
    script = ("import resource, sys\nimport orchestrator.engine\nfrom orchestrator import cli\n"
              "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
              "resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, resource.RLIM_INFINITY))\n"
              "code = cli.main(sys.argv[1:])\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)\n")
    p = subprocess.run([sys.executable, "-c", script, "autobatch", "--imgsz", "64", "--gpu", "T4", *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0] and "--data" in lines[0], p.stderr
    assert int(p.stdout) < 1024 * 1024, f"peak RSS {int(p.stdout) / 1024:.0f} MiB: something was built"


def test_a_job_with_only_a_fleet(ray_session, in_process_cli, tmp_path, capsys):
    """`devices` lists the fleet of a job file that has only [fleet]; `sweep` on it without --models says
    where to name them, before Ray or the table is touched."""
    path = tmp_path / "fleet.toml"
    path.write_text('[fleet]\nmode = "simulate"\nsimulate = "T4 x2"\n')
    assert in_process_cli(["devices", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "simulated fleet: 2 devices in 1 types"
    assert in_process_cli(["sweep", str(path), "--out", str(tmp_path / "t.csv")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {path}: [sweep] names no models: add models = [\"torchvision:resnet50\"] " \
                                 "(or [[sweep.grid]] entries) to it, or pass --models\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.toml"]


def test_data_that_is_not_yaml_is_one_line(in_process_cli, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [images\nnames: {\n")
    assert in_process_cli(["autobatch", "--model", "ultralytics:yolov8n.yaml", "--gpu", "T4", "--data", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and f"--data='{bad}' is not valid YAML" in err, err
    assert "at line 2, column" in err


def _report_table(folder) -> Path:
    from orchestrator.simdevice import SimulatedBackend
    from orchestrator.spec import Workload

    path = folder / "t.csv"
    table.write_rows(path, [table.error_row(Workload(model="tiny_models:tiny", imgsz=32),
                                            SimulatedBackend("T4").info(), 0.8, "RuntimeError: boom")])
    return path


def test_report_out_that_cannot_take_the_report_is_one_line(in_process_cli, tmp_path, capsys):
    """`report --out` on a file, or on a folder whose TABLE.md is not a report: exit 2, one line with the fix,
    nothing written or changed."""
    path = _report_table(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "t.md").write_text("# my notes\n")
    for out, needle in ((notes, f"report --out '{notes}' is a file, not a folder: name a folder"),
                        (mine, f"'{mine / 't.md'}' exists and is not a report of ours; move it or choose another")):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert in_process_cli(["report", str(path), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1 and needle in captured.err, captured.err
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _without_root_override():
    """In a child about to exec: drop the capabilities that let root write anywhere (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) from its bounding set, so that permission bits hold for it as for a user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_report_out_in_a_read_only_folder_is_one_line(tmp_path):
    """A folder the user cannot write: exit 2, one line with the fix, nothing written (run as root, the
    command runs without root's permission override)."""
    path = _report_table(tmp_path)
    shut = tmp_path / "shut"
    shut.mkdir(mode=0o555)
    p = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(path), "--out", str(shut / "r")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       preexec_fn=_without_root_override if os.geteuid() == 0 else None)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert p.stderr == (f"error: report --out '{shut / 'r'}': folder '{shut}' is not writable; fix its "
                        "permissions or choose another --out\n")
    assert list(shut.iterdir()) == []


def test_card_type_that_cannot_be_placed_is_named_and_exits_3_then_a_rerun_measures_it(
        ray_session, in_process_cli, tmp_path, capsys):
    """Three of the cluster's four GPUs held elsewhere: of `T4, L4` one card type's actor is never placed.
    Its combination is an `error` row "not measured" with the reason, stdout names the card, the summary
    counts it, the exit status is 3; with the GPUs free again a re-run measures exactly that combination."""
    import ray

    hold = ray.remote(num_gpus=1, num_cpus=0)(_Hold)
    holders = [hold.remote() for _ in range(3)]
    ray.get([h.ready.remote() for h in holders], timeout=60)
    out_csv = tmp_path / "t.csv"
    path = tmp_path / "job.toml"
    job = (f'[sweep]\nmodels = ["tiny_models:tiny"]\nimgsz = [64]\nout = "{out_csv}"\n'
           '[fleet]\nmode = "simulate"\nsimulate = "T4, L4"\nactor_timeout_s = {}\n')
    path.write_text(job.format(15))  # the card type that is placed, and the profile worker, start in less
    try:
        code = in_process_cli(["sweep", str(path)])
    finally:
        for h in holders:
            ray.kill(h, no_restart=True)
    out, err = capsys.readouterr()
    assert code == 3, (out, err)
    named = [line for line in out.splitlines() if line.startswith("not measured: ")]
    assert len(named) == 1, out
    card = named[0].split()[2]
    assert card in ("T4", "L4") and named[0] == (f"not measured: {card} (asked for; its device actor did not "
                                                 "start: actor not placed within 15s)")
    assert "2 rows written (1 ok, 0 no-fit, 1 error, of which 1 not measured)" in out
    assert f"1 rows are `error` ({card} not measured)" in err
    df = table.read(out_csv)
    row = df[df["card"] == card].iloc[0]
    assert row["status"] == "error"
    assert row["error"] == f"not measured: device actor for {card} did not start: actor not placed within 15s"

    path.write_text(job.format(60))  # the same job (the timeout is no part of a row's key), on a loaded machine
    assert in_process_cli(["sweep", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "1 rows written (1 ok, 0 no-fit, 0 error), 1 already in the table" in out
    assert "not measured" not in out
    df = table.read(out_csv)
    assert len(df) == 2 and (df["status"] == "ok").all()


class _Hold:
    """Holds a logical GPU of the session's cluster."""

    def ready(self):
        return True
