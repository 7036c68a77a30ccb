"""The Ray fleet: real local Ray, logical GPUs, simulated cards, real process kills."""
import logging
import os
import signal
import threading
import time

import psutil
import pytest

from expected import undisturbed
from orchestrator import calibration, cluster, fleet, job, scheduler, sweeploop, table

TINY = "tiny_models:tiny"


def make_job(tmp_path, models, imgsz, simulate, **fleet_kw):
    data = {"sweep": {"models": models, "imgsz": imgsz, "out": str(tmp_path / "t.csv")},
            "fleet": {"mode": "simulate", "simulate": simulate, "actor_timeout_s": 60, **fleet_kw}}
    return job.from_dict(data, "test")


def keys(df):
    return [tuple(r[c] for c in ("gpu_name", "model", "imgsz")) for _, r in df.iterrows()]


def batches(df, status="ok"):
    """(card, model, imgsz) -> batch size of the table's rows with ``status``."""
    return {(r["card"], r["model"], r["imgsz"]): r["batch_size"] for _, r in df.iterrows() if r["status"] == status}


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
    # every simulated row says which calibration against real GPUs it carries, and its error band
    assert (df["calibration"] == calibration.VERSION).all()
    yolo = df["model"].str.startswith("ultralytics:")
    assert (df.loc[yolo, "sim_error"] == calibration.expected_error("ultralytics:yolov8n.yaml")).all()
    assert (df.loc[~yolo, "sim_error"] == "unknown").all()


def test_one_actor_per_simulated_card_type_counts_as_data(ray_session, tmp_path):
    """'T4 x3, A100-80GB, T4': one actor per card type (two processes, whatever the counts); the rows
    carry the counts asked for (a card named twice adds up); each workload is profiled once, as CPU-only
    work on one of the session's 2 profile workers, not by a device actor."""
    j = make_job(tmp_path, [TINY], [64, 96], "T4 x3, A100-80GB, T4")
    specs, simulated = cluster.resolve_devices(j.fleet)
    assert simulated and [(d.card, d.count) for d in specs] == [("T4", 4), ("A100-80GB", 1)]
    sweep = sweeploop.Sweep(j)
    sweep.start(specs)
    try:
        actors = {info.pid for info in sweep.devices()}
        assert len(actors) == 2 and len(sweep.workers.idle) == sweep.scheduler.cpu_slots == 2
        stats = sweep.run()
        cpu_only = [j for j in sweep.scheduler.jobs.values() if j.need.count == 0]
        assert [j.call for j in cpu_only] == ["profile", "profile"] and all(j.attempts == 1 for j in cpu_only)
    finally:
        sweep.shutdown()
    df = table.read(j.sweep.out)
    assert len(df) == 4 and (df["status"] == "ok").all()
    assert dict(zip(df["card"], df["gpu_count"])) == {"T4": 4, "A100-80GB": 1}
    assert stats.profiles == 2 and sorted(stats.devices.values()) == [1, 4]


def test_every_device_on_a_simulated_fleet_measures_each_type_once(ray_session, tmp_path, caplog):
    """--every-device with 'T4 x2': identical simulated cards answer alike, so the type is measured once
    (one decision per workload, device_batches empty), gpu_count 2, and a warning says so."""
    j = make_job(tmp_path, [TINY], [64], "T4 x2")
    j = job.with_overrides(j, every_device=True)
    with caplog.at_level(logging.WARNING, logger="orchestrator.sweeploop"):
        stats, df = fleet.run_sweep(j)
    assert len(df) == 1 and df.iloc[0]["status"] == "ok" and df.iloc[0]["gpu_count"] == 2
    assert "device_batches" not in df.columns or df["device_batches"].isna().all()
    assert stats.rows == 1
    assert any("--every-device on a simulated fleet" in r.getMessage() for r in caplog.records)


def test_python_error_is_an_error_row_on_every_card_type_and_sweep_goes_on(ray_session, tmp_path):
    """A model that raises at one image size (in its profile) gives an error row there on every card
    type, raised once (not retried); the other rows are ok."""
    j = make_job(tmp_path, ["tiny_models:tiny_fails_at_96"], [64, 96], "T4, A10G")
    stats, df = fleet.run_sweep(j)
    for card in ("T4", "A10G"):
        by_size = {r["imgsz"]: r for _, r in df[df["card"] == card].iterrows()}
        assert by_size[64]["status"] == "ok"
        assert by_size[96]["status"] == "error" and by_size[96]["attempts"] == 1
        assert "ValueError: Tiny does not support 96 px" in by_size[96]["error"]
    assert stats.errors == 2 and stats.actor_restarts == 0


def _profile_processes():
    """This session's profile worker processes running a profile now (Ray titles a worker by its call)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("ProfileWorker.profile" in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_profile_process_killed_mid_profile_is_retried(ray_session, tmp_path):
    """SIGKILL of the process running a profile: the profile runs again on a new profile worker (no device
    actor replaced) and every row is ok, none lost or duplicated."""
    j = make_job(tmp_path, ["tiny_models:tiny_slow", TINY], [64], "T4, A100-80GB")
    sweep = sweeploop.Sweep(j)
    sweep.start(cluster.resolve_devices(j.fleet)[0])
    killed = []

    def killer():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            slow = [job for job in sweep.scheduler.running() if job.call == "profile"
                    and job.args[0].model.endswith("slow") and time.monotonic() - job.started_s > 0.5]
            procs = _profile_processes() if slow else []
            for p in procs:
                p.kill()
                killed.append(p.pid)
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
    slow_profile = next(j for j in sweep.scheduler.jobs.values() if j.call == "profile"
                        and j.args[0].model.endswith("slow"))
    assert slow_profile.attempts == 2 and slow_profile.errors[0] == "profile worker died: ActorDiedError"
    assert stats.actor_restarts == 0 and stats.profiles == 2


def test_device_actor_killed_is_replaced_and_its_work_requeued(ray_session, tmp_path):
    """SIGKILL of a card type's only actor: the decision sent to it fails, a replacement starts and takes
    the work; every row is ok, none lost or duplicated."""
    j = make_job(tmp_path, [TINY], [64, 96], "T4, A100-80GB")
    sweep = sweeploop.Sweep(j)
    sweep.start(cluster.resolve_devices(j.fleet)[0])
    try:
        t4 = next(info for info in sweep.devices() if info.card == "T4")
        os.kill(t4.pid, signal.SIGKILL)
        stats = sweep.run()
        assert {info.card for info in sweep.devices()} == {"T4", "A100-80GB"}
        assert t4.pid not in {info.pid for info in sweep.devices()}
    finally:
        sweep.shutdown()
    df = table.read(j.sweep.out)
    assert len(df) == 4 and len(set(keys(df))) == 4
    assert (df["status"] == "ok").all()
    assert stats.actor_restarts == 1
    assert dict(zip(df["card"], df["gpu_count"])) == {"T4": 1, "A100-80GB": 1}


def test_workload_that_kills_every_process_becomes_error(ray_session, tmp_path):
    """A poison workload (its trace kills the process) is retried max_attempts times on profile workers, then
    max_attempts times on device actors (which it kills too: replaced), then is an error row on every card
    type saying where it ran; the rest is ok."""
    j = make_job(tmp_path, ["tiny_models:tiny_crashes", TINY], [64], "T4, A10G", max_attempts=2)
    stats, df = fleet.run_sweep(j)
    for card in ("T4", "A10G"):
        rows = {r["model"]: r for _, r in df[df["card"] == card].iterrows()}
        assert rows[TINY]["status"] == "ok"
        poison = rows["tiny_models:tiny_crashes"]
        assert poison["status"] == "error" and poison["attempts"] == 4
        assert poison["error"].startswith("actor died: ActorDiedError"), poison["error"]
        assert poison["error"].endswith("; gave up after 4 attempts (2 on profile workers, 2 on devices)")
    assert (stats.actor_restarts, stats.profile_worker_restarts, stats.profile_fallbacks) == (2, 2, 1)


@pytest.mark.slow
def test_profile_whose_workers_keep_dying_is_traced_on_a_device_actor(ray_session, tmp_path, caplog, profiles):
    """Every profile worker process that runs the profile is SIGKILLed: after max_attempts (3) worker deaths
    the profile is traced on a device actor instead, the fallback is logged with the workload and why, and
    the rows are ok and equal to an undisturbed sweep's."""
    j = make_job(tmp_path, [TINY], [512], "T4, A10G")  # 248 and 373: below max_batch
    killed, stop = [], threading.Event()

    def killer():
        while not stop.is_set():
            for p in _profile_processes():
                p.kill()
                killed.append(p.pid)
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator"):
            stats, df = fleet.run_sweep(j)
    finally:
        stop.set()
        t.join(timeout=5)
    assert len(set(killed)) == 3, killed  # every attempt on a profile worker, none on the device actor
    assert (stats.profile_worker_restarts, stats.profile_fallbacks, stats.actor_restarts) == (3, 1, 0)
    assert len(df) == 2 and (df["status"] == "ok").all(), df[["card", "status", "error"]]
    assert batches(df) == undisturbed(j, profiles) and len(set(batches(df).values())) == 2
    assert (df["attempts"] == 1).all()  # the decisions ran once each
    [line] = [r.getMessage() for r in caplog.records if "device actor instead" in r.getMessage()]
    assert line.startswith("tiny_models:tiny@512") and "worker process died 3 times" in line, line


def test_rerun_skips_finished_rows_and_force_redoes(ray_session, tmp_path):
    """A re-run on an existing table does only what is missing; --force redoes everything."""
    j = make_job(tmp_path, [TINY], [64], "T4")
    fleet.run_sweep(j)
    j2 = make_job(tmp_path, [TINY], [64, 96], "T4")
    stats, df = fleet.run_sweep(j2)
    assert (stats.skipped, stats.rows, len(df)) == (1, 1, 2)
    stats, df = fleet.run_sweep(j2, force=True)
    assert (stats.skipped, stats.rows, len(df)) == (0, 2, 2)


def test_more_simulated_card_types_than_gpus_is_bad_input(ray_session, tmp_path):
    """Each simulated card type needs one (logical) GPU for its actor; its count needs none."""
    j = make_job(tmp_path, [TINY], [64], "T4 x5, L4, A10G, A100-80GB, H100-80GB")
    with pytest.raises(Exception, match="asks for 5 card types .* but the Ray cluster has 4 GPUs"):
        fleet.run_sweep(j)


def test_actor_that_cannot_start_says_why_once_per_node(ray_session, tmp_path, caplog):
    """Actors whose constructor raises (an unknown card) are reported with that error, one line for
    their node; the fleet goes on with the device that started."""
    sweep = sweeploop.Sweep(make_job(tmp_path, [TINY], [64], "T4"))
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.sweeploop"):
            sweep.start([cluster.DeviceSpec("T4"), cluster.DeviceSpec("GTX-1080"), cluster.DeviceSpec("GTX-1080")])
    finally:
        sweep.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.sweeploop"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("node ") and "2 device actors did not start: ValueError: unknown GPU 'GTX-1080'" \
        in lines[0], lines
    assert [info.card for info in sweep.devices()] == ["T4"]


def test_no_actor_started_names_the_cause_and_the_fixes(ray_session, tmp_path):
    """When no actor starts, the error carries the constructor's own error and the likely fixes."""
    sweep = sweeploop.Sweep(make_job(tmp_path, [TINY], [64], "T4"))
    try:
        with pytest.raises(RuntimeError, match=r"no device actor started \(1 tried.*: node \S+: 1 device actor "
                                               r"did not start: ValueError: unknown GPU 'GTX-1080'.*"
                                               r"CUDA build of torch.*--simulate"):
            sweep.start([cluster.DeviceSpec("GTX-1080")])
    finally:
        sweep.shutdown()


def _kill_while_starting(sweep, card, kills, times=None):
    """A thread that kills ``card``'s device actor with ray.kill each time one is starting (its process is
    killed; the start sees ActorDiedError), ``times`` times at most (None: every time). ``kills`` collects
    the killed actors."""
    import ray

    stop = threading.Event()

    def run():
        while not stop.is_set() and (times is None or len(kills) < times):
            try:
                slots = list(sweep.slots.items())
                starting = [slot.actor for d, slot in slots if slot.spec.card == card and
                            sweep.scheduler.devices[d].state is scheduler.State.STARTING]
            except RuntimeError:  # the fleet's dicts changed under us: look again
                continue
            for actor in starting:
                if all(actor is not k for k in kills):
                    ray.kill(actor, no_restart=True)
                    kills.append(actor)
            time.sleep(0.01)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return stop


def test_card_type_whose_actor_dies_at_every_start_is_rows_not_measured_then_a_rerun_measures_them(
        ray_session, tmp_path, caplog):
    """The L4's actor is killed every time it starts: it is started max_attempts times in all, then its
    combinations are `error` rows saying they were not measured and why (the cause Ray gives, the count);
    the T4 is measured. A re-run without the fault measures exactly the L4's combinations."""
    j = make_job(tmp_path, [TINY], [64], "T4, L4")
    sweep, kills = sweeploop.Sweep(j), []
    stop = _kill_while_starting(sweep, "L4", kills)
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.sweeploop"):
            sweep.start(cluster.resolve_devices(j.fleet)[0])
        stop.set()
        stats = sweep.run()
    finally:
        stop.set()
        sweep.shutdown()
    table.fold(j.sweep.out)
    assert len(kills) == 3 and stats.actor_restarts == 2
    assert list(stats.not_measured) == ["L4"] and "gave up after 3 attempts" in stats.not_measured["L4"]
    df = table.read(j.sweep.out)
    assert len(df) == 2 and len(set(keys(df))) == 2
    l4 = df[df["card"] == "L4"]
    assert (l4["status"] == "error").all() and (df[df["card"] == "T4"]["status"] == "ok").all()
    for err in l4["error"]:
        assert err.startswith("not measured: device actor for L4 did not start: actor died: ActorDiedError "
                              "(it was killed by `ray.kill`"), err
        assert err.endswith("; gave up after 3 attempts"), err
    assert (stats.rows, stats.errors, stats.not_measured_rows) == (2, 1, 1)
    retries = [r.getMessage() for r in caplog.records if "starting it again" in r.getMessage()]
    assert len(retries) == 2 and "(attempt 1 of 3)" in retries[0], retries

    stats, df = fleet.run_sweep(j)  # the fault gone
    assert (stats.skipped, stats.rows, stats.ok, stats.actor_restarts) == (1, 1, 1, 0)
    assert keys(df[df["card"] == "L4"]) == keys(l4)  # exactly the combinations not measured
    assert len(df) == 2 and (df["status"] == "ok").all() and not stats.not_measured


def _starting_device_actors():
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("DeviceActor.__init__" in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_device_actor_killed_once_while_starting_is_started_again_and_measured(ray_session, tmp_path):
    """SIGKILL of the device actor's process while it starts (importing torch): a new one is started and
    the card type is measured; no row is lost or an error."""
    j = make_job(tmp_path, [TINY], [64], "A10G")
    killed = []

    def killer():
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for p in _starting_device_actors():
                p.kill()
                killed.append(p.pid)
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    stats, df = fleet.run_sweep(j)
    t.join(timeout=5)
    assert len(killed) == 1
    assert stats.actor_restarts == 1 and not stats.not_measured
    assert len(df) == 1 and (df["status"] == "ok").all() and df["card"].tolist() == ["A10G"]
