"""The fleet's scheduling policy without Ray: plain data, a fake clock (plain numbers)."""
import subprocess
import sys

import pytest

from orchestrator.scheduler import DECIDE, PROFILE, Need, Scheduler, State, plan_sweep

T4, A100 = ("T4", 15), ("A100", 79)


def fleet(*types, **kw) -> tuple[Scheduler, list[int]]:
    """A scheduler whose devices (one per type given) all started at t=0."""
    s = Scheduler(**kw)
    ids = [s.add_device(0.0) for _ in types]
    for d, t in zip(ids, types):
        s.started(d, t, f"{t[0]}#{d}", 0.0)
    return s, ids


def by_job(assignments):
    return {a.job: a for a in assignments}


def test_jobs_wait_for_an_idle_device_of_their_type():
    """A job runs only on an idle device of its type; the next one waits for it, other types stay idle."""
    s, (t4, a100) = fleet(T4, A100)
    j1 = s.add_job("decide", ("w1",), Need(type_key=T4), outcome=(T4, "w1"))
    j2 = s.add_job("decide", ("w2",), Need(type_key=T4), outcome=(T4, "w2"))
    [a] = s.assign(1.0)
    assert (a.job, a.devices, a.call, a.args) == (j1, (t4,), "decide", ("w1",))
    assert s.assign(2.0) == [] and s.devices[a100].state is State.IDLE
    s.finished(j1, 64, 3.0)
    [a] = s.assign(3.0)
    assert (a.job, a.devices) == (j2, (t4,))
    [o] = s.outcomes()
    assert (o.key, o.value, o.error, o.attempts) == ((T4, "w1"), 64, "", 1)
    assert not s.done()
    s.finished(j2, 32, 4.0)
    assert s.done() and [o.value for o in s.outcomes()] == [32]


def test_decisions_wait_for_their_profile_which_takes_no_device():
    """Profiles are CPU-only work: they run with no device, all devices stay free for decisions. A decision
    starts only once its workload's profile is done, with the profile appended to its arguments."""
    s, (t4, a100) = fleet(T4, A100)
    n = plan_sweep(s, [(T4, "w1"), (A100, "w1"), (T4, "w2")], decide_args=(0.8,), shared_profiles=True)
    assert n == 3
    p1, p2 = s.assign(0.0)  # both profiles, on no device; no decision before its profile
    assert (p1.call, p1.args, p1.devices) == ("profile", ("w1",), ())
    assert (p2.call, p2.args, p2.devices) == ("profile", ("w2",), ())
    assert all(s.devices[d].state is State.IDLE for d in (t4, a100))
    s.finished(p1.job, "trace-w1", 1.0)
    d1, d2 = s.assign(1.0)  # w1's decisions, one per card type, at once
    assert (d1.call, d1.args, d1.devices) == ("decide", ("w1", 0.8, "trace-w1"), (t4,))
    assert (d2.args, d2.devices) == (("w1", 0.8, "trace-w1"), (a100,))
    s.finished(p2.job, "trace-w2", 2.0)
    assert s.assign(2.0) == []  # w2's T4 decision waits for the T4
    s.finished(d1.job, 64, 3.0)
    [d3] = s.assign(3.0)
    assert (d3.args, d3.devices) == (("w2", 0.8, "trace-w2"), (t4,))
    assert s.completed["profile"] == 2


def test_cpu_only_jobs_run_at_most_cpu_slots_at_once():
    """With 2 CPU slots a third CPU-only job waits for one to finish (or die); device jobs do not count
    against the slots, nor wait for them."""
    s, (t4,) = fleet(T4, cpu_slots=2)
    cpu = [s.add_job("profile", (f"w{i}",), Need(count=0)) for i in range(3)]
    dev = s.add_job("decide", ("w",), Need(type_key=T4))
    out = s.assign(0.0)
    assert sorted(a.job for a in out) == [cpu[0], cpu[1], dev]
    assert s.assign(1.0) == []
    s.finished(cpu[0], "trace", 2.0)
    [a] = s.assign(2.0)
    assert (a.job, a.devices) == (cpu[2], ())
    s.lost(cpu[1], "ray failure: WorkerCrashedError", 3.0)  # its slot is free again, and it is queued again
    [a] = s.assign(3.0)
    assert (a.job, a.devices) == (cpu[1], ())
    assert s.jobs[cpu[1]].attempts == 2


def test_cpu_job_whose_process_dies_is_retried_then_fails_its_decisions():
    """A CPU-only job (no fallback) whose process dies is queued again (no device to replace), up to
    max_attempts; then every decision waiting for it is an error naming the cause and the attempts."""
    s, (t4, a100) = fleet(T4, A100, max_attempts=2)
    p = s.add_job("profile", ("w",), Need(count=0))
    decs = [s.add_job("decide", ("w",), Need(type_key=k), outcome=(k, "w"), after=p) for k in (T4, A100)]
    [a] = s.assign(0.0)
    s.lost(p, "ray failure: WorkerCrashedError", 1.0)
    assert s.outcomes() == [] and len(s.devices) == 2  # nothing replaced
    [a2] = s.assign(1.0)
    assert a2.job == p and a2.devices == ()
    s.lost(p, "ray failure: WorkerCrashedError", 2.0)
    outs = s.outcomes()
    assert {o.key for o in outs} == {(T4, "w"), (A100, "w")} and len(decs) == 2
    assert all((o.error, o.attempts) == ("ray failure: WorkerCrashedError; gave up after 2 attempts", 2)
               for o in outs)
    assert s.assign(2.0) == [] and s.done() and s.fallbacks == 0
    s.lost(p, "late", 3.0)  # a report for a job no longer running changes nothing
    assert s.outcomes() == []


@pytest.mark.parametrize("max_attempts", [2, 3, 4])
def test_profile_whose_workers_keep_dying_is_traced_on_a_device_after_exactly_max_attempts(max_attempts):
    """A sweep's profile whose worker dies max_attempts times (not fewer) runs once more on a device actor
    (any idle one; none is replaced), and its decisions then run with that profile."""
    s, (t4, a100) = fleet(T4, A100, max_attempts=max_attempts, cpu_slots=1)
    plan_sweep(s, [(T4, "w"), (A100, "w")], decide_args=(0.8,), shared_profiles=True)
    for t in range(max_attempts):
        [a] = s.assign(float(t))
        assert a.call == "profile" and a.devices == ()  # on a profile worker while attempts are left
        s.lost(a.job, "profile worker died: ActorDiedError", t + 0.5)
    assert s.fallbacks == 1 and s.outcomes() == []
    [a] = s.assign(10.0)
    assert a.call == "profile" and len(a.devices) == 1 and s.jobs[a.job].attempts == max_attempts + 1
    s.finished(a.job, "trace-w", 11.0)
    d1, d2 = s.assign(11.0)
    assert {d1.args, d2.args} == {("w", 0.8, "trace-w")}
    s.finished(d1.job, 64, 12.0)
    s.finished(d2.job, 96, 12.0)
    assert sorted(o.error for o in s.outcomes()) == ["", ""] and s.done()
    assert all(d.state is State.IDLE for d in s.devices.values()) and len(s.devices) == 2


def test_profile_that_raises_is_not_retried_nor_moved_to_a_device():
    """The profile's own error (a Python exception) is its answer at once: no retry, no fallback."""
    s, _ = fleet(T4, max_attempts=3)
    plan_sweep(s, [(T4, "w")], shared_profiles=True)
    [a] = s.assign(0.0)
    s.failed(a.job, "ValueError: bad model", 1.0)
    [o] = s.outcomes()
    assert (o.error, o.attempts, s.fallbacks) == ("ValueError: bad model", 1, 0) and s.done()


@pytest.mark.parametrize("max_attempts", [2, 3])
def test_profile_that_kills_its_devices_too_is_an_error_after_max_attempts_more_on_devices(max_attempts):
    """A profile whose process dies on its fallback devices as well (a poison workload) is retried there up
    to max_attempts times (not fewer), each device replaced, then is an error saying where it ran."""
    s, (t4,) = fleet(T4, max_attempts=max_attempts, cpu_slots=1)
    plan_sweep(s, [(T4, "w")], shared_profiles=True)
    for t in range(max_attempts):
        [a] = s.assign(float(t))
        s.lost(a.job, "profile worker died: ActorDiedError", t + 0.5)
    device = t4
    for t in range(max_attempts):
        assert s.outcomes() == []
        [a] = s.assign(10.0 + t)
        assert a.call == "profile" and a.devices == (device,)
        drop = s.died(device, "actor died: ActorDiedError", 10.5 + t)
        device = drop.replacement
        s.started(device, T4, "T4#new", 10.6 + t)
    [o] = s.outcomes()
    assert o.error == (f"actor died: ActorDiedError; gave up after {2 * max_attempts} attempts ({max_attempts} on "
                       f"profile workers, {max_attempts} on devices)") and o.attempts == 2 * max_attempts
    assert s.done() and s.fallbacks == 1


def test_profiles_move_to_devices_when_no_profile_worker_is_left():
    """No CPU slot left or coming: queued profiles with a fallback run on devices instead of failing."""
    s, (t4,) = fleet(T4, cpu_slots=0)
    plan_sweep(s, [(T4, "w")], shared_profiles=True)
    assert s.assign(0.0) == []
    s.no_cpu_left("no profile worker left (not placed)")
    [a] = s.assign(1.0)
    assert (a.call, a.devices, s.fallbacks) == ("profile", (t4,), 1)
    for t in (2.0, 3.0):  # it never ran on a worker: all max_attempts (3) tries are on devices
        t4 = s.died(t4, "actor died", t).replacement
        s.started(t4, T4, "T4#new", t)
        [a] = s.assign(t)
    t4 = s.died(t4, "actor died", 4.0).replacement
    [o] = s.outcomes()
    assert o.error == "actor died; gave up after 3 attempts (0 on profile workers, 3 on devices)"


def test_decision_is_assigned_before_an_older_profile():
    """With one device free, a ready decision goes before a profile queued earlier."""
    s, (t4,) = fleet(T4)
    prof = s.add_job("profile", ("w2",), Need(), priority=PROFILE)
    dec = s.add_job("decide", ("w1",), Need(type_key=T4), outcome=(T4, "w1"), priority=DECIDE)
    [a] = s.assign(0.0)
    assert a.job == dec and prof != dec


def test_actor_death_retries_on_another_device_then_gives_up():
    """A job whose actor dies is re-queued on another device of its type and the device replaced;
    after max_attempts deaths it is an error naming the cause and the attempts."""
    s, (d0, d1) = fleet(T4, T4, max_attempts=2)
    j = s.add_job("decide", ("w",), Need(type_key=T4), outcome=(T4, "w"), label="w@64")
    [a] = s.assign(0.0)
    drop = s.died(a.devices[0], "actor died: ActorDiedError", 1.0)
    assert drop.device == d0 and drop.replacement is not None and not drop.starting
    assert "under w@64 (attempt 1)" in drop.reason
    assert s.devices[drop.replacement].state is State.STARTING and s.devices[drop.replacement].type_key == T4
    [a] = s.assign(1.0)
    assert a.devices == (d1,) and s.outcomes() == []
    drop2 = s.died(d1, "actor died: ActorDiedError", 2.0)
    assert drop2.replacement not in (None, drop.replacement)
    [o] = s.outcomes()
    assert o.error == "actor died: ActorDiedError; gave up after 2 attempts" and o.attempts == 2
    assert s.jobs[j].errors == ["actor died: ActorDiedError"] * 2 and s.done()


@pytest.mark.parametrize("max_attempts", [3, 4])
def test_actor_deaths_are_retried_exactly_as_many_times_as_max_attempts_allows(max_attempts):
    """Every death under the job re-queues it on the replacement device, until it has run max_attempts
    times: then it is an error with that count (a cap of 2, or one attempt short, fails here)."""
    s, (d,) = fleet(T4, max_attempts=max_attempts)
    s.add_job("decide", ("w",), Need(type_key=T4), outcome=(T4, "w"), label="w@64")
    runs = 0
    for t in range(10):
        assigned = s.assign(float(t))
        if not assigned:
            break
        [a] = assigned
        runs += 1
        assert s.outcomes() == []
        drop = s.died(a.devices[0], "actor died: ActorDiedError", t + 0.5)
        s.started(drop.replacement, T4, f"T4#{drop.replacement}", t + 0.6)
    assert runs == max_attempts
    [o] = s.outcomes()
    assert (o.error, o.attempts) == (f"actor died: ActorDiedError; gave up after {max_attempts} attempts", max_attempts)
    assert s.done()


def test_poisoned_device_is_replaced_and_its_job_retried_once():
    """A sticky CUDA error (the device's process can no longer use it) replaces the device like a death,
    but retries the job only once, whatever max_attempts allows: a second fault is the job's."""
    s, (d0, d1) = fleet(T4, T4, max_attempts=3)
    s.add_job("decide", ("w",), Need(type_key=T4), outcome=(T4, "w"), label="w@64")
    [a] = s.assign(0.0)
    drop = s.faulted(a.devices[0], "DeviceFault: illegal memory access", 1.0)
    assert drop.replacement is not None and s.devices[d0].state is State.DEAD
    [a] = s.assign(1.0)
    assert a.devices == (d1,)
    drop2 = s.faulted(d1, "DeviceFault: illegal memory access", 2.0)
    assert drop2.replacement is not None
    [o] = s.outcomes()
    assert o.error == "DeviceFault: illegal memory access; gave up after 2 attempts" and o.attempts == 2
    assert s.done()


def test_python_error_is_not_retried_and_the_device_goes_on():
    """A Python error is the job's answer at once (attempts 1); its device is idle and takes more work."""
    s, (d0,) = fleet(T4)
    s.add_job("decide", ("bad",), Need(type_key=T4), outcome=(T4, "bad"))
    j2 = s.add_job("decide", ("good",), Need(type_key=T4), outcome=(T4, "good"))
    [a] = s.assign(0.0)
    s.failed(a.job, "ValueError: no 96 px", 1.0)
    [o] = s.outcomes()
    assert (o.error, o.attempts, o.value) == ("ValueError: no 96 px", 1, None)
    [a2] = s.assign(1.0)
    assert (a2.job, a2.devices) == (j2, (d0,))
    assert len(s.devices) == 1  # nothing was replaced


def test_device_that_never_reports_is_dropped_at_the_start_timeout():
    """A STARTING device past start_timeout_s is dropped once, not replaced; the deadline says when."""
    s = Scheduler(start_timeout_s=120.0)
    d = s.add_device(5.0)
    assert s.next_deadline_s() == 125.0
    assert s.expire(125.0) == []
    [drop] = s.expire(125.5)
    assert (drop.device, drop.starting, drop.replacement) == (d, True, None)
    assert drop.reason == "actor not placed within 120s"
    assert s.devices[d].state is State.DEAD and not s.starting() and s.expire(500.0) == []


@pytest.mark.parametrize("max_attempts", [2, 3, 4])
def test_device_that_dies_while_starting_is_started_again_up_to_max_attempts(max_attempts):
    """A process that dies before its device reports is started again in its place, each start with its own
    start_timeout_s, until max_attempts starts have died: then it is dead with the cause and the count. Its
    type's work waits meanwhile and runs on the start that succeeds."""
    s = Scheduler(max_attempts=max_attempts, start_timeout_s=60.0)
    d = s.add_device(0.0)
    starts = 1
    for t in range(1, 10):
        drop = s.start_failed(d, "actor died: ActorDiedError: killed", float(t), died=True)
        assert drop.starting and s.devices[d].state is State.DEAD
        if drop.replacement is None:
            break
        assert drop.reason == f"actor died: ActorDiedError: killed while starting (attempt {starts} of {max_attempts})"
        d, starts = drop.replacement, starts + 1
        assert s.starting() and s.next_deadline_s() == t + 60.0
    assert starts == max_attempts
    assert drop.reason == f"actor died: ActorDiedError: killed; gave up after {max_attempts} attempts"
    assert not s.starting()


def test_device_that_dies_once_while_starting_takes_its_work():
    """The start that succeeds in place of one that died is its type's device: the work runs there."""
    s = Scheduler(max_attempts=3)
    d = s.add_device(0.0)
    drop = s.start_failed(d, "actor died", 1.0, died=True)
    s.started(drop.replacement, T4, "T4", 2.0)
    plan_sweep(s, [(T4, "w")])
    [a] = s.assign(2.0)
    assert a.devices == (drop.replacement,)


def test_constructor_error_or_no_placement_is_not_started_again():
    """A constructor that raised would raise again, and an actor not placed lacks the resources: both dead at
    once, not replaced."""
    s = Scheduler(max_attempts=3, start_timeout_s=5.0)
    raised, unplaced = s.add_device(0.0), s.add_device(0.0)
    drop = s.start_failed(raised, "ValueError: unknown GPU", 1.0)
    assert (drop.replacement, drop.reason) == (None, "ValueError: unknown GPU")
    [drop] = s.expire(6.0)
    assert (drop.device, drop.replacement) == (unplaced, None) and not s.starting()


def test_hang_is_cancelled_not_retried_with_its_real_attempts():
    """A job past task_timeout_s becomes an error with the attempts it had (1 on a first try, 2 after one
    death), its device dropped and replaced; a late answer from it is ignored."""
    s, (d0, d1) = fleet(T4, T4, task_timeout_s=10.0)
    hang = s.add_job("decide", ("hang",), Need(type_key=T4), outcome=(T4, "hang"), label="hang@64")
    dies = s.add_job("decide", ("dies",), Need(type_key=T4), outcome=(T4, "dies"))
    a_hang, a_dies = s.assign(0.0)
    assert s.next_deadline_s() == 10.0 and s.expire(10.0) == []
    s.died(a_dies.devices[0], "actor died: ActorDiedError", 4.0)  # dies is re-queued: attempt 2 is next
    [drop] = s.expire(10.5)
    assert drop.device == a_hang.devices[0] and drop.replacement is not None
    assert drop.reason == "hang@64 ran past task_timeout_s=10"
    [o] = s.outcomes()
    assert (o.key, o.error, o.attempts) == ((T4, "hang"), "cancelled after 10s (task_timeout_s)", 1)
    s.finished(hang, 7, 11.0)  # the killed actor's late answer
    assert s.outcomes() == []
    for d in list(s.devices):
        if s.devices[d].state is State.STARTING:
            s.started(d, T4, "T4", 11.0)
    [a] = s.assign(11.0)
    assert a.job == dies
    s.expire(30.0)
    [o] = s.outcomes()
    assert (o.key, o.attempts) == ((T4, "dies"), 2)
    assert s.done()


def test_work_of_a_type_whose_last_device_is_gone_becomes_errors():
    """While a replacement is starting the type's work waits; once it fails to start, every queued job
    of the type is an error with the reason; other types are untouched."""
    s, (t4, a100) = fleet(T4, A100)
    running = s.add_job("decide", ("w1",), Need(type_key=T4), outcome=(T4, "w1"))
    waiting = s.add_job("decide", ("w2",), Need(type_key=T4), outcome=(T4, "w2"))
    other = s.add_job("decide", ("w1",), Need(type_key=A100), outcome=(A100, "w1"))
    assert {a.job for a in s.assign(0.0)} == {running, other}
    drop = s.died(t4, "actor died: ActorDiedError", 1.0)
    assert s.assign(1.0) == [] and s.outcomes() == []  # the replacement may still come up
    s.start_failed(drop.replacement, "actor not placed within 120s", 2.0)
    assert s.assign(2.0) == []
    errors = {o.key: o for o in s.outcomes()}
    assert set(errors) == {(T4, "w1"), (T4, "w2")}
    assert errors[(T4, "w1")].error == "no device of this type left (actor died: ActorDiedError)"
    assert errors[(T4, "w2")].error == "no device of this type left (actor not placed within 120s)"
    assert errors[(T4, "w1")].attempts == 1 and errors[(T4, "w2")].attempts == 0
    assert not s.done() and s.jobs[waiting].attempts == 0
    s.finished(other, 900, 3.0)
    assert [o.key for o in s.outcomes()] == [(A100, "w1")] and s.done()


def test_every_device_merge_keeps_the_smallest_real_answer():
    """Every device of a type answers; the outcome keeps the smallest answer, an error loses to real
    answers, all answers are recorded in device order; when all fail the outcome is the first error."""
    s, devs = fleet(T4, T4, T4)
    assert plan_sweep(s, [(T4, "w1"), (T4, "w2")], every_device=True) == 2
    first = s.assign(0.0)
    assert [a.devices for a in first] == [(d,) for d in devs] and {a.args for a in first} == {("w1",)}
    values = {devs[0]: 40, devs[1]: 32}
    for a in first:
        if a.devices[0] in values:
            s.finished(a.job, values[a.devices[0]], 1.0)
        else:
            s.failed(a.job, "RuntimeError: flaky", 1.0)
    [o] = s.outcomes()
    assert (o.key, o.value, o.error, o.answers) == ((T4, "w1"), 32, "", (40, 32, None))
    for i, a in enumerate(s.assign(2.0)):
        s.failed(a.job, f"RuntimeError: {i}", 3.0)
    [o] = s.outcomes()
    assert (o.value, o.error, o.answers) == (None, "RuntimeError: 0", (None, None, None))


def test_group_job_waits_for_n_idle_devices_of_its_type():
    """A group of 3 devices of one type starts only when 3 are idle, all of that type; while it waits,
    later jobs do not take that type's devices from it."""
    s, (d0, d1, d2, a100) = fleet(T4, T4, T4, A100)
    busy = s.add_job("decide", ("w0",), Need(type_key=T4))
    [a] = s.assign(0.0)
    group = s.add_job("ddp", ("w",), Need(count=3, type_key=T4))
    later = s.add_job("decide", ("w1",), Need(type_key=T4))
    elsewhere = s.add_job("decide", ("w1",), Need(type_key=A100))
    assert [x.job for x in s.assign(1.0)] == [elsewhere]
    s.finished(busy, 1, 2.0)
    [g] = s.assign(2.0)
    assert (g.job, g.devices) == (group, (d0, d1, d2))
    assert all(s.devices[d].state is State.BUSY for d in (d0, d1, d2))
    s.finished(group, 1, 3.0)
    assert [x.job for x in s.assign(3.0)] == [later] and a.job == busy


def test_group_job_larger_than_its_type_is_an_error():
    """A group needing more devices than its type has left can never start: an error with the reason."""
    s, _ = fleet(T4, T4)
    s.add_job("ddp", ("w",), Need(count=4, type_key=T4), outcome=(T4, "w"))
    assert s.assign(0.0) == []
    [o] = s.outcomes()
    assert o.error.startswith("fewer than 4 devices of this type left")


def test_cpu_only_jobs_never_take_a_device():
    """CPU-only work runs with no device, even with none idle (or none at all), and leaves devices idle."""
    s = Scheduler()
    cpu = s.add_job("profile", ("w",), Need(count=0))
    [a] = s.assign(0.0)
    assert (a.job, a.devices) == (cpu, ())
    s2, (d0,) = fleet(T4)
    s2.add_job("decide", ("w",), Need(type_key=T4))
    s2.add_job("profile", ("w",), Need(count=0))
    s2.add_job("profile", ("w2",), Need(count=0))
    out = s2.assign(0.0)
    assert sorted(a.devices for a in out) == [(), (), (d0,)]
    assert s2.devices[d0].state is State.BUSY and len(s2.running()) == 3


def test_replacement_takes_work_queued_for_the_dead_device():
    """Work pinned to a device (every-device mode), queued or running when it died, goes to its
    replacement, never to the type's other devices."""
    s, (d0, d1) = fleet(T4, T4)
    plan_sweep(s, [(T4, "w1"), (T4, "w2")], every_device=True)
    first = {a.devices[0]: a for a in s.assign(0.0)}
    assert set(first) == {d0, d1}
    s.finished(first[d1].job, 16, 1.0)
    drop = s.died(d0, "actor died: ActorDiedError", 1.0)
    assert [(a.args, a.devices) for a in s.assign(1.0)] == [(("w2",), (d1,))]  # d1's own w2 only
    s.started(drop.replacement, T4, "T4#new", 2.0)
    [a] = s.assign(2.0)
    assert (a.args, a.devices) == (("w1",), (drop.replacement,))
    s.finished(a.job, 24, 3.0)
    [a] = s.assign(3.0)
    assert (a.args, a.devices) == (("w2",), (drop.replacement,))
    [o] = s.outcomes()
    assert (o.key, o.value, o.answers, o.attempts) == ((T4, "w1"), 16, (24, 16), 1)


def test_failed_profile_fails_its_decisions_with_its_reason_and_attempts():
    """A profile that hangs is cancelled at task_timeout_s (no device to drop: the driver cancels the
    call, which is no longer awaited) and ends every decision waiting for it as an error with its
    reason and its attempts; no decision runs."""
    s, _ = fleet(T4, A100, task_timeout_s=5.0)
    plan_sweep(s, [(T4, "w"), (A100, "w")], shared_profiles=True)
    [p] = s.assign(0.0)
    assert p.call == "profile" and p.devices == () and s.is_running(p.job)
    assert s.next_deadline_s() == 5.0
    assert s.expire(6.0) == [] and not s.is_running(p.job)
    outs = s.outcomes()
    assert {o.key for o in outs} == {(T4, "w"), (A100, "w")}
    assert all((o.error, o.attempts) == ("cancelled after 5s (task_timeout_s)", 1) for o in outs)
    assert s.assign(6.0) == [] and s.done()


def test_need_rejects_a_named_device_with_a_count():
    with pytest.raises(ValueError, match="1 when a device is named"):
        Need(count=2, device=0)


def test_the_pure_modules_import_no_ray_torch_or_pandas():
    """The policy, the decision core and the workload's definition import neither ray, torch nor pandas
    (the package's names load lazily), as the house rules say."""
    code = ("import sys\nimport orchestrator.scheduler, orchestrator.decision, orchestrator.spec\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'torch', 'pandas')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_a_soft_profile_that_fails_lets_its_decisions_run_without_it():
    """On a real fleet the profile only predicts where a device's search starts: when it fails (here it
    raises), its decisions still run, with None for the profile, and their answers are the outcomes."""
    s, (t4, a100) = fleet(T4, A100)
    plan_sweep(s, [(T4, "w"), (A100, "w")], decide_args=(0.8,), shared_profiles=True, soft_profiles=True)
    [p] = s.assign(0.0)
    s.failed(p.job, "TypeError: fake tensors cannot run this model", 1.0)
    d1, d2 = s.assign(1.0)
    assert {d1.args, d2.args} == {("w", 0.8, None)} and {d1.devices, d2.devices} == {(t4,), (a100,)}
    s.finished(d1.job, 64, 2.0)
    s.finished(d2.job, 96, 2.0)
    assert sorted((o.key, o.value, o.error) for o in s.outcomes()) == [((A100, "w"), 96, ""), ((T4, "w"), 64, "")]
    assert s.done()


def test_a_cpu_job_whose_process_is_poisoned_is_retried_once():
    """A sticky CUDA error under a CPU-only job (its worker is replaced) retries it once, whatever
    max_attempts allows; a plain death is retried up to max_attempts."""
    s, _ = fleet(T4, max_attempts=5, cpu_slots=1)
    j = s.add_job("profile", ("w",), Need(count=0), outcome="p")
    for t in (0.0, 1.0):
        [a] = s.assign(t)
        s.lost(a.job, "DeviceFault: illegal memory access", t + 0.5, faulted=True)
    [o] = s.outcomes()
    assert (o.error, o.attempts) == ("DeviceFault: illegal memory access; gave up after 2 attempts", 2)
    k = s.add_job("profile", ("v",), Need(count=0), outcome="q")
    for t in (2.0, 3.0):
        [a] = s.assign(t)
        s.lost(a.job, "profile worker died: ActorDiedError", t + 0.5)
    assert s.assign(4.0)[0].job == k  # a third attempt
    assert s.jobs[j].attempts == 2
