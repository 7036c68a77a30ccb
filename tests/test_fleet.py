"""The Ray fleet: real local Ray, logical GPUs, simulated cards, real process kills."""
import logging
import os
import signal
import threading
import time

import pytest

from orchestrator import fleet, job, table

TINY = "tiny_models:tiny"


def make_job(tmp_path, models, imgsz, simulate, **fleet_kw):
    data = {"sweep": {"models": models, "imgsz": imgsz, "out": str(tmp_path / "t.csv")},
            "fleet": {"mode": "simulate", "simulate": simulate, "actor_timeout_s": 60, **fleet_kw}}
    return job.from_dict(data, "test")


def keys(df):
    return [tuple(r[c] for c in ("gpu_name", "model", "imgsz")) for _, r in df.iterrows()]


def test_default_job_rows_all_ok_and_ordered(default_table):
    """The shipped default: every (card x model x imgsz) row ok; bigger card never smaller batch,
    bigger image never larger batch."""
    j, stats, df = default_table
    n_types = 3
    assert len(df) == n_types * len(j.sweep.workloads())
    assert (df["status"] == "ok").all(), df[["gpu_name", "model", "imgsz", "status", "error"]]
    assert stats.profiles == len(j.sweep.workloads())  # traced once per workload, not per card
    for (model, imgsz), g in df.groupby(["model", "imgsz"]):
        g = g.sort_values("gpu_total_bytes")
        assert g["batch_size"].is_monotonic_increasing, (model, imgsz)
    for (model, gpu), g in df.groupby(["model", "gpu_name"]):
        g = g.sort_values("imgsz")
        assert g["batch_size"].is_monotonic_decreasing, (model, gpu)
    assert (df["peak_bytes"] <= df["budget_bytes"]).all()


def test_one_actor_per_gpu_grouped_by_type(ray_session, tmp_path):
    """Three logical GPUs -> three actors in three processes; two T4s form one type measured once."""
    j = make_job(tmp_path, [TINY], [64, 96], "T4 x2, A100-80GB")
    sweep = fleet.Sweep(j)
    sweep.start(fleet.resolve_devices(j.fleet)[0])
    try:
        pids = {info.pid for info in sweep.devices()}
        assert len(pids) == 3
        assert sorted(sweep.stats.devices.values()) == [1, 2]
        stats = sweep.run()
    finally:
        sweep.shutdown()
    df = table.read(j.sweep.out)
    assert len(df) == 4 and (df["status"] == "ok").all()
    assert dict(zip(df["card"], df["gpu_count"])) == {"T4": 2, "A100-80GB": 1}
    assert stats.profiles == 2


def test_python_error_is_an_error_row_and_sweep_goes_on(ray_session, tmp_path):
    """A model that raises at one image size gives an error row there; the other rows are ok."""
    j = make_job(tmp_path, ["tiny_models:tiny_fails_at_96"], [64, 96], "T4")
    stats, df = fleet.run_sweep(j)
    by_size = {r["imgsz"]: r for _, r in df.iterrows()}
    assert by_size[64]["status"] == "ok"
    assert by_size[96]["status"] == "error"
    assert "ValueError: Tiny does not support 96 px" in by_size[96]["error"]
    assert stats.errors == 1


def test_actor_killed_mid_combination_is_requeued(ray_session, tmp_path):
    """SIGKILL of an actor's process while it profiles: the work completes on a replacement,
    no row lost or duplicated."""
    j = make_job(tmp_path, ["tiny_models:tiny_slow", TINY], [64], "T4, A100-80GB")
    sweep = fleet.Sweep(j)
    sweep.start(fleet.resolve_devices(j.fleet)[0])
    killed = []

    def killer():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for job in sweep.scheduler.running():
                devices = job.devices  # read once: the sweep's thread changes it
                if devices and job.call == "profile" and job.args[0].model.endswith("slow") \
                        and time.monotonic() - job.started_s > 0.5:
                    pid = sweep.scheduler.devices[devices[0]].info.pid
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        stats = sweep.run()
    finally:
        sweep.shutdown()
    t.join(timeout=5)
    assert killed, "the slow profile was never seen running"
    df = table.read(j.sweep.out)
    assert len(df) == 4 and len(set(keys(df))) == 4
    assert (df["status"] == "ok").all()
    assert stats.actor_restarts >= 1


def test_combination_that_kills_every_actor_becomes_error(ray_session, tmp_path):
    """A poison combination is retried max_attempts times, then recorded; the rest is ok."""
    j = make_job(tmp_path, ["tiny_models:tiny_crashes", TINY], [64], "T4", max_attempts=2)
    stats, df = fleet.run_sweep(j)
    rows = {r["model"]: r for _, r in df.iterrows()}
    assert rows[TINY]["status"] == "ok"
    poison = rows["tiny_models:tiny_crashes"]
    assert poison["status"] == "error"
    assert "actor died" in poison["error"] and "gave up after 2 attempts" in poison["error"]
    assert stats.actor_restarts == 2


def test_rerun_skips_finished_rows_and_force_redoes(ray_session, tmp_path):
    """A re-run on an existing table does only what is missing; --force redoes everything."""
    j = make_job(tmp_path, [TINY], [64], "T4")
    fleet.run_sweep(j)
    j2 = make_job(tmp_path, [TINY], [64, 96], "T4")
    stats, df = fleet.run_sweep(j2)
    assert (stats.skipped, stats.rows, len(df)) == (1, 1, 2)
    stats, df = fleet.run_sweep(j2, force=True)
    assert (stats.skipped, stats.rows, len(df)) == (0, 2, 2)


def test_more_simulated_cards_than_gpus_is_bad_input(ray_session, tmp_path):
    j = make_job(tmp_path, [TINY], [64], "T4 x5")
    with pytest.raises(Exception, match="asks for 5 devices but the Ray cluster has 4 GPUs"):
        fleet.run_sweep(j)


def test_actor_that_cannot_start_says_why_once_per_node(ray_session, tmp_path, caplog):
    """Actors whose constructor raises (an unknown card) are reported with that error, one line for
    their node; the fleet goes on with the device that started."""
    sweep = fleet.Sweep(make_job(tmp_path, [TINY], [64], "T4"))
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.fleet"):
            sweep.start([("T4", {}), ("GTX-1080", {}), ("GTX-1080", {})])
    finally:
        sweep.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.fleet"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("node ") and "2 device actors did not start: ValueError: unknown GPU 'GTX-1080'" \
        in lines[0], lines
    assert [info.card for info in sweep.devices()] == ["T4"]


def test_no_actor_started_names_the_cause_and_the_fixes(ray_session, tmp_path):
    """When no actor starts, the error carries the constructor's own error and the likely fixes."""
    sweep = fleet.Sweep(make_job(tmp_path, [TINY], [64], "T4"))
    try:
        with pytest.raises(RuntimeError, match=r"no device actor started \(1 tried.*: node \S+: 1 device actor "
                                               r"did not start: ValueError: unknown GPU 'GTX-1080'.*"
                                               r"CUDA build of torch.*--simulate"):
            sweep.start([("GTX-1080", {})])
    finally:
        sweep.shutdown()
