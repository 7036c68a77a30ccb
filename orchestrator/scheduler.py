"""The fleet's scheduling policy: what runs where, what is retried, when to give up.

Plain Python over plain data: no Ray, no clock (every event carries ``now``, in
seconds), no files, no torch. The driver (``fleet.Sweep``) feeds in what Ray
reports and carries out what comes back:

    add_device(now) -> id              spawn an actor for the device
    started / start_failed(device)     the actor reported its device / could not start (died: started again)
    assign(now) -> [Assignment]        submit ``call(*args)`` on the assigned device(s)
    finished / failed(job)             the call returned / raised a Python error (not retried)
    died(device) -> Dropped            the actor died under a job: retried elsewhere, device replaced
    lost(job)                          the process running a CPU-only job died: the job is retried, then
                                       runs on its ``fallback`` (a device) when deaths used up its attempts
    faulted(device) -> Dropped         its CUDA context is poisoned: replaced, the job retried once
    expire(now) -> [Dropped]           start and task timeouts
    outcomes() -> [Outcome]            finished (device type x workload) answers: one table row each

A ``Dropped`` device's actor is killed and its ``replacement`` (if any) spawned.
Jobs say what they need as data (``Need``): one device of a type, one given device,
a group of N devices of one type, or none (CPU-only work, at most ``cpu_slots`` at
once), so the driver has no branches on what a job is.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

log = logging.getLogger(__name__)

DECIDE, PROFILE = 0, 1
"""Priorities (lower runs first): a decision finishes a row (a simulated one replays in milliseconds),
so rows land, and survive an interrupt, before the next workload's expensive profile starts."""


class State(enum.Enum):
    STARTING = "starting"  # spawned; has not reported its device yet
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


@dataclass(frozen=True)
class Need:
    """The devices a job runs on: ``count`` idle devices of one type (``type_key``; None: any one
    type), or exactly ``device``; ``count=0`` is CPU-only work that takes no device."""

    count: int = 1
    type_key: Hashable | None = None
    device: int | None = None

    def __post_init__(self):
        if self.count < 0 or (self.device is not None and self.count != 1):
            raise ValueError(f"Need(count={self.count}, device={self.device}): count must be >= 0, "
                             "and 1 when a device is named")


@dataclass
class Device:
    """One device (one actor process) as the policy sees it."""

    id: int
    type_key: Hashable | None = None  # None until it reports; a replacement inherits its predecessor's
    info: Any = None  # what it reported (opaque here)
    state: State = State.STARTING
    since_s: float = 0.0  # when it entered its state
    job: int | None = None  # BUSY: the job it runs
    reason: str = ""  # DEAD: why
    starts: int = 1  # tries at starting it: a start that died is tried again in its place, counting on


@dataclass
class Job:
    """One unit of work: ``call(*args)`` on the devices ``need`` asks for."""

    id: int
    call: str
    args: tuple
    need: Need
    outcome: Hashable | None = None  # the answer this job's value counts toward; None: it only feeds others
    after: int | None = None  # the job whose value is appended to ``args`` (a decision after its profile)
    priority: int = 0
    label: str = ""
    soft: bool = False
    """When this job fails, the jobs after it run with None for its value instead of failing too (a
    prediction they can do without)."""
    fallback: Need | None = None
    """A CPU-only job whose processes died under it ``max_attempts`` times runs on this instead (a device
    actor can trace too), up to ``max_attempts`` more times: deaths of its workers are not the job's fault;
    its own errors are."""
    fell_back: bool = False  # it runs, or ran, on its fallback
    before_fallback: int = 0  # the attempts it had when it moved there
    attempts: int = 0  # times assigned
    errors: list[str] = field(default_factory=list)
    devices: tuple[int, ...] = ()  # while running
    started_s: float = 0.0


@dataclass(frozen=True)
class Assignment:
    """Run ``call(*args)`` on ``devices`` (none: CPU-only); report back with ``job``."""

    job: int
    call: str
    args: tuple
    devices: tuple[int, ...]


@dataclass(frozen=True)
class Dropped:
    """A device given up on: kill its actor, and spawn ``replacement`` (a new STARTING device) if set."""

    device: int
    reason: str
    replacement: int | None = None
    starting: bool = False  # it never reported its device


@dataclass(frozen=True)
class Outcome:
    """The answer for one outcome key: the kept ``value``, or ``error`` (non-empty) when none is."""

    key: Hashable
    value: Any
    error: str
    attempts: int
    answers: tuple[int | None, ...] = ()
    """When several devices answered (every-device mode): each one's answer in device order, None for an error."""
    values: tuple[Any, ...] = ()
    """With ``answers``: each device's value (None for an error), to tell why they differ."""


@dataclass(frozen=True)
class _Result:
    job: int
    value: Any
    error: str
    attempts: int


class Scheduler:
    """Devices, a job queue and the rules that join them."""

    def __init__(self, *, max_attempts: int = 3, start_timeout_s: float = 120.0, task_timeout_s: float = 1800.0,
                 answer_of: Callable[[Any], int] = int, cpu_slots: int | None = None):
        """``answer_of(value)``: the number the every-device merge keeps the smallest of (a batch size).
        ``cpu_slots``: CPU-only jobs running at once, at most (the cluster's CPUs; None: no limit). Work
        beyond it waits here, not in the cluster's queue, so ``task_timeout_s`` counts running time only."""
        self.max_attempts = max_attempts
        self.cpu_slots = cpu_slots
        self.start_timeout_s = start_timeout_s
        self.task_timeout_s = task_timeout_s
        self.answer_of = answer_of
        self.devices: dict[int, Device] = {}
        self.jobs: dict[int, Job] = {}
        self.completed: collections.Counter[str] = collections.Counter()  # finished jobs by call
        self.fallbacks = 0  # CPU-only jobs moved to their fallback (their worker processes kept dying)
        self._device_ids = itertools.count()
        self._job_ids = itertools.count()
        self._queue: list[int] = []  # jobs waiting to run
        self._running: dict[int, Job] = {}
        self._feeds: set[int] = set()  # jobs that others run after
        self._values: dict[int, Any] = {}  # their values
        self._expected: collections.Counter = collections.Counter()  # outcome key -> jobs reporting to it
        self._results: dict[Hashable, list[_Result]] = collections.defaultdict(list)
        self._outcomes: list[Outcome] = []

    # ---- devices ------------------------------------------------------------------
    def add_device(self, now: float, *, type_key: Hashable | None = None, info: Any = None) -> int:
        """A new STARTING device; the driver spawns its actor. It is given up after ``start_timeout_s``."""
        dev = Device(next(self._device_ids), type_key, info, since_s=now)
        self.devices[dev.id] = dev
        return dev.id

    def started(self, device: int, type_key: Hashable, info: Any, now: float) -> None:
        """The device reported itself: it takes work from now on."""
        dev = self.devices[device]
        if dev.state is State.STARTING:
            dev.type_key, dev.info, dev.state, dev.since_s = type_key, info, State.IDLE, now

    def start_failed(self, device: int, reason: str, now: float, *, died: bool = False) -> Dropped:
        """The device could not start. Its constructor raised or it was not placed within ``start_timeout_s``:
        dead, not replaced (it would raise again; the cluster lacks the resources). Its process ``died``
        while starting (killed, crashed, node lost): as for a busy actor's death, it is started again, up to
        ``max_attempts`` starts in all, then dead with "...; gave up after N attempts"."""
        dev = self.devices[device]
        if died and dev.starts < self.max_attempts:
            self._kill(dev, reason, now)
            new = self._replace(dev, now)
            self.devices[new].starts = dev.starts + 1
            return Dropped(device, f"{reason} while starting (attempt {dev.starts} of {self.max_attempts})", new,
                           starting=True)
        if died:
            reason = f"{reason}; gave up after {dev.starts} attempts"
        self._kill(dev, reason, now)
        return Dropped(device, reason, starting=True)

    def died(self, device: int, reason: str, now: float) -> Dropped:
        """The device's process died (crash, node loss): it is replaced, and the job it ran is
        retried (up to ``max_attempts`` in all) or becomes an error "...; gave up after N attempts"."""
        return self._lost(device, reason, now, self.max_attempts)

    def faulted(self, device: int, reason: str, now: float) -> Dropped:
        """The device's process can no longer use its device (a sticky CUDA error under a job): it is
        replaced like a death, and the job retried once (a second fault is the job's, not the card's)."""
        return self._lost(device, reason, now, min(2, self.max_attempts))

    def expire(self, now: float) -> list[Dropped]:
        """Devices not started within ``start_timeout_s`` (dropped, not replaced) and jobs running past
        ``task_timeout_s`` (an error with the attempts they had, not retried: a hang would hang again;
        their devices are dropped and replaced; a CPU-only job has none: ``is_running`` turns False, and
        the driver cancels its call)."""
        dropped = [self.start_failed(d.id, f"actor not placed within {self.start_timeout_s:.0f}s", now)
                   for d in list(self.devices.values())
                   if d.state is State.STARTING and now - d.since_s > self.start_timeout_s]
        for job in [j for j in self._running.values() if now - j.started_s > self.task_timeout_s]:
            dropped += self._cancel(job, now)
        return dropped

    def live(self, type_key: Hashable | None = None) -> list[Device]:
        """Started devices not dead (of ``type_key`` when given), in the order they were added."""
        return [d for d in self.devices.values() if d.state in (State.IDLE, State.BUSY)
                and (type_key is None or d.type_key == type_key)]

    def starting(self) -> bool:
        return any(d.state is State.STARTING for d in self.devices.values())

    def info_of(self, type_key: Hashable) -> Any:
        """The type's canonical info: that of its first device, whichever device measured."""
        return next(d.info for d in self.devices.values() if d.type_key == type_key and d.info is not None)

    def next_deadline_s(self) -> float | None:
        """The earliest time at which ``expire`` would drop something, if nothing else happens."""
        starts = [d.since_s + self.start_timeout_s for d in self.devices.values() if d.state is State.STARTING]
        tasks = [j.started_s + self.task_timeout_s for j in self._running.values()]
        return min(starts + tasks, default=None)

    # ---- jobs ---------------------------------------------------------------------
    def add_job(self, call: str, args: tuple = (), need: Need = Need(), *, outcome: Hashable | None = None,
                after: int | None = None, priority: int = 0, label: str = "", soft: bool = False,
                fallback: Need | None = None) -> int:
        """Queue a job; jobs with the same ``outcome`` are merged into one Outcome when all have answered.
        ``soft``: its failure gives the jobs after it None instead of failing them (``Job.soft``).
        ``fallback``: where a CPU-only job runs once more when its processes keep dying (``Job.fallback``)."""
        job = Job(next(self._job_ids), call, tuple(args), need, outcome, after, priority, label or call, soft,
                  fallback)
        self.jobs[job.id] = job
        self._queue.append(job.id)
        if outcome is not None:
            self._expected[outcome] += 1
        if after is not None:
            self._feeds.add(after)
        return job.id

    def assign(self, now: float) -> list[Assignment]:
        """Everything that can run now, by (priority, age). Queued work no device can ever run becomes
        an error first. A group that cannot start yet holds its type: later jobs do not take its
        idle devices, so it is not starved."""
        self._fail_orphans()
        out, idle = [], [d for d in self.devices.values() if d.state is State.IDLE]
        cpus = self._free_cpu_slots()
        for job in sorted((self.jobs[i] for i in self._queue), key=lambda j: (j.priority, j.id)):
            if job.after is not None and job.after not in self._values:
                continue
            if job.need.count == 0:
                if cpus > 0:
                    cpus -= 1
                    out.append(self._start(job, (), now))
                continue
            devices = self._pick(job.need, idle)
            if devices is not None:
                out.append(self._start(job, devices, now))
                idle = [d for d in idle if d.id not in devices]
            elif job.need.count > 1:
                idle = [d for d in idle if d.type_key != job.need.type_key]
        return out

    def finished(self, job_id: int, value: Any, now: float) -> None:
        """The job returned ``value``; a late answer from a job no longer running is ignored."""
        job = self._running.pop(job_id, None)
        if job is None:
            return
        self._release(job, now)
        self.completed[job.call] += 1
        if job.id in self._feeds:
            self._values[job.id] = value
        if job.outcome is not None:
            self._record(job, _Result(job.id, value, "", job.attempts))

    def failed(self, job_id: int, error: str, now: float) -> None:
        """The job raised a Python error: its answer is that error (not retried: it would raise again)."""
        job = self._running.pop(job_id, None)
        if job is None:
            return
        self._release(job, now)
        job.errors.append(error)
        self._fail(job, error, job.attempts)

    def lost(self, job_id: int, reason: str, now: float, *, faulted: bool = False) -> None:
        """The process running CPU-only job ``job_id`` died (crash, OOM-kill, node loss): the job is queued
        again, up to ``max_attempts`` in all, then it is an error "...; gave up after N attempts".
        ``faulted``: the process's CUDA context was poisoned under it (a sticky CUDA error): as for a
        device, retried once only (a second fault is the job's)."""
        job = self._running.pop(job_id, None)
        if job is None:
            return
        job.errors.append(reason)
        if job.attempts < (min(2, self.max_attempts) if faulted else self.max_attempts):
            self._queue.append(job.id)
        elif not faulted and self._fall_back(job, f"its worker process died {job.attempts} times (last: {reason})"):
            self._queue.append(job.id)
        else:
            self._fail(job, f"{reason}; gave up after {job.attempts} attempts", job.attempts)

    def _fall_back(self, job: Job, why: str) -> bool:
        """Move ``job`` to its fallback need (once); False when it has none or has used it."""
        if job.fallback is None or job.fell_back:
            return False
        job.need, job.fell_back, job.before_fallback = job.fallback, True, job.attempts
        self.fallbacks += 1
        log.warning("%s: %s: %s; running it on a device actor instead", job.label, job.call, why)
        return True

    def running(self) -> list[Job]:
        return list(self._running.values())

    def cpu_slots_up(self, n: int) -> None:
        """``n`` CPU slots (profile workers) are up: CPU-only jobs run on at most that many at once."""
        self.cpu_slots = n

    def cpu_slot_lost(self) -> None:
        """A CPU slot's worker died or was killed; a replacement may bring it back (``cpu_slot_back``)."""
        self.cpu_slots -= 1

    def cpu_slot_back(self) -> None:
        self.cpu_slots += 1

    def no_cpu_left(self, reason: str) -> None:
        """No CPU-only slot is left or coming (the workers' nodes are gone): queued CPU-only jobs run on
        their fallback; those without one end in error with ``reason``, and so does the work waiting for them."""
        for job in [self.jobs[i] for i in self._queue if self.jobs[i].need.count == 0]:
            if job.id in self._queue and not self._fall_back(job, reason):
                self._fail(job, reason, job.attempts)

    def is_running(self, job_id: int) -> bool:
        """Whether a result of ``job_id`` is still awaited (a cancelled job's is not)."""
        return job_id in self._running

    def outcomes(self) -> list[Outcome]:
        """Outcomes completed since the last call."""
        out, self._outcomes = self._outcomes, []
        return out

    def done(self) -> bool:
        """No job queued or running (devices still starting do not count)."""
        return not self._queue and not self._running

    # ---- rules --------------------------------------------------------------------
    def _free_cpu_slots(self) -> int | float:
        if self.cpu_slots is None:
            return float("inf")
        return self.cpu_slots - sum(1 for j in self._running.values() if j.need.count == 0)

    @staticmethod
    def _pick(need: Need, idle: list[Device]) -> tuple[int, ...] | None:
        """Devices out of ``idle`` for ``need``, all of one type, or None when there are not enough."""
        if need.count == 0:
            return ()
        by_type: dict[Hashable, list[int]] = collections.defaultdict(list)
        for d in idle:
            if need.device in (None, d.id) and need.type_key in (None, d.type_key):
                by_type[d.type_key].append(d.id)
        return next((tuple(ids[:need.count]) for ids in by_type.values() if len(ids) >= need.count), None)

    def _start(self, job: Job, devices: tuple[int, ...], now: float) -> Assignment:
        self._queue.remove(job.id)
        job.attempts += 1
        job.devices, job.started_s = devices, now
        self._running[job.id] = job
        for d in devices:
            dev = self.devices[d]
            dev.state, dev.job, dev.since_s = State.BUSY, job.id, now
        inputs = (self._values[job.after],) if job.after is not None else ()
        return Assignment(job.id, job.call, job.args + inputs, devices)

    def _release(self, job: Job, now: float) -> None:
        """The job's devices that are still alive go back to idle."""
        for d in job.devices:
            dev = self.devices[d]
            if dev.state is State.BUSY:
                dev.state, dev.job, dev.since_s = State.IDLE, None, now
        job.devices = ()

    def _kill(self, dev: Device, reason: str, now: float) -> None:
        dev.state, dev.job, dev.reason, dev.since_s = State.DEAD, None, reason, now

    def _replace(self, dev: Device, now: float) -> int:
        """A new device of the same type in place of ``dev``; work queued for ``dev`` moves to it."""
        new = self.add_device(now, type_key=dev.type_key, info=dev.info)
        for i in self._queue:
            job = self.jobs[i]
            if job.need.device == dev.id:
                job.need = dataclasses.replace(job.need, device=new)
        return new

    def _lost(self, device: int, reason: str, now: float, attempts: int) -> Dropped:
        """The device is gone under its job (if any): replaced; the job retried up to ``attempts`` in all."""
        dev = self.devices[device]
        job = self._running.pop(dev.job, None) if dev.job is not None else None
        self._kill(dev, reason, now)
        if job is not None:
            self._release(job, now)
            job.errors.append(reason)
            if job.attempts - job.before_fallback < attempts:  # a fallen-back job counts its tries on devices
                self._queue.append(job.id)
            else:
                on = job.attempts - job.before_fallback
                where = (f" ({job.before_fallback} on {job.call} workers, {on} on device{'s' * (on > 1)})"
                         if job.fell_back else "")
                self._fail(job, f"{reason}; gave up after {job.attempts} attempts{where}", job.attempts)
            reason = f"{reason} under {job.label} (attempt {job.attempts})"
        return Dropped(device, reason, self._replace(dev, now))

    def _cancel(self, job: Job, now: float) -> list[Dropped]:
        del self._running[job.id]
        reason = f"cancelled after {self.task_timeout_s:g}s (task_timeout_s)"
        job.errors.append(reason)
        dropped = []
        for d in job.devices:
            dev = self.devices[d]
            self._kill(dev, f"{job.label} ran past task_timeout_s={self.task_timeout_s:g}", now)
            dropped.append(Dropped(d, dev.reason, self._replace(dev, now)))
        job.devices = ()
        self._fail(job, reason, job.attempts)
        return dropped

    def _fail_orphans(self) -> None:
        alive = collections.Counter(d.type_key for d in self.devices.values() if d.state is not State.DEAD)
        for i in list(self._queue):
            job = self.jobs[i]
            why = self._unrunnable(job, alive) if i in self._queue else None  # _fail may have taken it already
            if why:
                self._fail(job, why, job.attempts)

    def _unrunnable(self, job: Job, alive: collections.Counter) -> str | None:
        """Why no device can ever run ``job`` (``alive``: devices not dead per type), or None."""
        need = job.need
        if need.count == 0:
            return None
        if need.device is not None:
            runnable = self.devices[need.device].state is not State.DEAD
        else:
            runnable = (alive[need.type_key] if need.type_key is not None else max(alive.values(), default=0)) \
                >= need.count
        if runnable:
            return None
        dead = [d.reason for d in self.devices.values() if d.state is State.DEAD
                and need.device in (None, d.id) and need.type_key in (None, d.type_key)]
        why = (job.errors or dead or ["device died"])[-1]
        what = "no device" if need.count == 1 else f"fewer than {need.count} devices"
        return f"{what}{' of this type' if need.type_key is not None else ''} left ({why})"

    def _fail(self, job: Job, reason: str, attempts: int) -> None:
        """``job`` ends in error; so does every job waiting for its value, with the same reason."""
        if job.id in self._queue:
            self._queue.remove(job.id)
        if job.outcome is not None:
            self._record(job, _Result(job.id, None, reason, attempts))
        if job.soft:
            log.warning("%s: %s failed (%s); what runs after it runs without it", job.label, job.call, reason)
            self._values[job.id] = None
            return
        for dep in [self.jobs[i] for i in self._queue if self.jobs[i].after == job.id]:
            self._fail(dep, reason, attempts)

    def _record(self, job: Job, result: _Result) -> None:
        results = self._results[job.outcome]
        results.append(result)
        if len(results) == self._expected[job.outcome]:
            del self._results[job.outcome]
            self._outcomes.append(self._merge(job.outcome, sorted(results, key=lambda r: r.job)))

    def _merge(self, key: Hashable, results: list[_Result]) -> Outcome:
        """One answer from several devices: the smallest real answer (the safe one); an error only
        when every device failed (then the first error)."""
        answers = tuple(None if r.error else self.answer_of(r.value) for r in results)
        real = [i for i, a in enumerate(answers) if a is not None]
        best = results[min(real, key=answers.__getitem__) if real else 0]
        several = len(results) > 1
        return Outcome(key, best.value, best.error, best.attempts, answers if several else (),
                       tuple(None if r.error else r.value for r in results) if several else ())


def plan_sweep(sched: Scheduler, work: Iterable[tuple[Hashable, Any]], *, decide_args: tuple = (),
               every_device: bool = False, shared_profiles: bool = False, soft_profiles: bool = False,
               label: Callable[[Any], str] = str) -> int:
    """Queue a decision for each (type_key, workload) in ``work``: on any device of the type, or on
    each live device of it (``every_device``, merged into one outcome). With ``shared_profiles``
    (simulated fleets) each workload is first profiled once, as CPU-only work (no device: the traces
    do not depend on the card), and its decisions run after it with the profile appended to their
    arguments. ``soft_profiles`` (real fleets: the profile only predicts where a device's search
    starts): a profile that fails gives its decisions None instead of failing them. A profile whose
    worker processes keep dying (``max_attempts`` deaths) is traced on any device's actor instead, up to
    ``max_attempts`` more times (``Job.fallback``); one that raises is an error at once. Returns the number of outcomes."""
    work = list(work)
    profiles: dict[Any, int] = {}
    if shared_profiles:
        for w in dict.fromkeys(w for _, w in work):
            profiles[w] = sched.add_job("profile", (w,), Need(count=0), priority=PROFILE, label=label(w),
                                        soft=soft_profiles, fallback=Need())
    for key, w in work:
        needs = [Need(type_key=key, device=d.id) for d in sched.live(key)] if every_device else [Need(type_key=key)]
        for need in needs:
            sched.add_job("decide", (w, *decide_args), need, outcome=(key, w), after=profiles.get(w),
                          priority=DECIDE, label=label(w))
    return len(work)
