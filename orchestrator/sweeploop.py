"""The sweep loop: one job's combinations over the started fleet, rows written as they arrive.

The driver submits everything it can, then waits with ``ray.wait``; an actor that dies has its combination
re-queued (bounded attempts) and is replaced; a combination that runs too long is cancelled by killing its
actor. Those rules are ``scheduler.py``'s (plain Python); ``Sweep`` is the Ray plumbing that carries them
out, with the profile workers in a pool of their own (``profilepool``) and what a failed call means read by
``rayfailures``.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import ray

from . import catalog, cluster, rayfailures, scheduler, table
from .actors import MAX_PROFILE_WORKERS, RemoteDeviceActor, RemoteProfileWorker
from .devicetypes import DeviceInfo
from .profilepool import ProfilePool
from .spec import Workload
from .units import gib

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """The Ray side of one scheduler device: how to start its actor, and the actor."""

    spec: cluster.DeviceSpec
    actor: object = None


class Call(NamedTuple):
    """A Ray call in flight: on device ``device`` (None: a profile worker), for scheduler job ``job`` (None:
    an actor's start, its ``info()``)."""

    device: int | None
    job: int | None


@dataclass
class SweepStats:
    rows: int = 0
    ok: int = 0
    no_fit: int = 0
    errors: int = 0
    skipped: int = 0
    profiles: int = 0
    actor_restarts: int = 0  # device actors replaced (those that died while starting included)
    profile_worker_restarts: int = 0  # profile workers replaced (died, poisoned)
    profile_fallbacks: int = 0  # profiles traced on a device actor because their profile workers kept dying
    seconds: float = 0.0
    devices: dict = field(default_factory=dict)  # type_key -> devices in the fleet (simulated: as asked)
    not_measured_rows: int = 0  # of ``errors``: combinations of a card type that never started
    not_measured: dict = field(default_factory=dict)
    """Simulated card types asked for whose device actor never started: card -> why. Their combinations are
    ``error`` rows "not measured: ..." (counted in ``errors``), which a re-run measures again."""


class Sweep:
    """Runs one job's combinations over the fleet and writes rows as they arrive.

    The plumbing only: spawn, submit, wait, kill. What runs where, retries, timeouts and
    the every-device merge are ``scheduler.Scheduler``'s; this feeds it what Ray reports.
    """

    def __init__(self, job, *, force: bool = False, progress=None):
        """``progress(total)`` returns an object with ``update(n)`` (a tqdm bar), or None."""
        self.job = job
        self.sweep, self.fleet = job.sweep, job.fleet
        self.force = force
        self.progress = progress
        self.scheduler = scheduler.Scheduler(
            max_attempts=self.fleet.max_attempts, start_timeout_s=self.fleet.actor_timeout_s,
            task_timeout_s=self.fleet.task_timeout_s, answer_of=lambda result: result.decision.batch_size)
        self.slots: dict[int, Slot] = {}  # scheduler device id -> its actor
        self.pending: dict = {}  # ObjectRef -> Call
        self.stats = SweepStats()
        self.simulated = False
        self.start_failures: list[tuple[str, str]] = []  # (node address, "" when never placed; why)
        self.not_started: dict[str, str] = {}  # simulated card -> why its actor did not start (the last reason)
        self._starting = False  # starting the fleet: start failures are reported per node at the end
        self.workers = ProfilePool(RemoteProfileWorker, self.scheduler, self.stats, self.fleet.actor_timeout_s,
                                   self.fleet.max_attempts)
        self._unmeasured: list[dict] = []  # "not measured" rows of card types that never started, to write

    # ---- devices ----------------------------------------------------------------
    def _spawn(self, device: int, slot: Slot) -> None:
        # num_cpus=0: an actor holding a CPU for life starves placement on small machines
        opts = {"num_gpus": 1, "num_cpus": 0, "max_restarts": 0, "max_task_retries": 0, **slot.spec.options}
        slot.actor = RemoteDeviceActor.options(**opts).remote(slot.spec.card)
        self.slots[device] = slot
        self.pending[slot.actor.info.remote()] = Call(device, None)

    def start(self, devices: list[cluster.DeviceSpec]) -> None:
        """One actor per ``cluster.DeviceSpec``; blocks until each reports its device or times out."""
        self.simulated = any(d.card is not None for d in devices)
        now = time.monotonic()
        for spec in devices:
            self._spawn(self.scheduler.add_device(now), Slot(spec))
        # profiles are CPU work (a simulated card replays them; a real one starts its search at their
        # prediction): one worker per CPU of the cluster (device actors hold none), no more than there are
        # workloads, and at most MAX_PROFILE_WORKERS on a big real cluster
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = min(cpus, len(self.sweep.workloads()), cpus if self.simulated else MAX_PROFILE_WORKERS)
        # ready() asked now, not after the devices: a device that takes all of actor_timeout_s to fail (never
        # placed) must not leave the workers, up long since, no time to answer
        workers = self.workers.launch(n)
        self._starting = True
        try:
            while self.scheduler.starting():
                self._wait()
        finally:
            self._starting = False
        self.workers.keep_started(workers, now + self.fleet.actor_timeout_s)
        for line in rayfailures.per_node(self.start_failures):
            log.warning("%s", line)
        live = self.scheduler.live()
        if not live:
            raise RuntimeError(self._nothing_started(len(devices)))
        self.stats.devices = collections.Counter()
        for d in live:
            self.stats.devices[d.type_key] += self.slots[d.id].spec.count
        started = {self.slots[d.id].spec.card for d in live}
        self.stats.not_measured = {card: why for card, why in self.not_started.items() if card not in started}
        for key, n in self.stats.devices.items():
            log.info("device type %s x%d", key, n)

    def devices(self) -> list[DeviceInfo]:
        """What each started, live device reported, in start order."""
        return [d.info for d in self.scheduler.live()]

    def _nothing_started(self, n: int) -> str:
        """The error when no actor started: what each node said, and what to do about it."""
        fixes = []
        if any(node for node, _ in self.start_failures):  # actors ran and raised: the device would not open
            fixes.append("give the Ray workers a working NVIDIA driver and a CUDA build of torch (check "
                         "`python -c 'import torch; print(torch.cuda.is_available())'` on each node), "
                         "or plan with a simulated fleet (--simulate 'T4, A100-80GB')")
        if any(not node for node, _ in self.start_failures):
            fixes.append("for actors not placed: check `ray status` or use fewer devices")
        return (f"no device actor started ({n} tried; the cluster has {ray.cluster_resources().get('GPU', 0):g} "
                f"GPUs): {'; '.join(rayfailures.per_node(self.start_failures))}. Fix: {'; '.join(fixes)}")

    def _drop(self, dropped: scheduler.Dropped, node: str = "") -> None:
        """Kill a device's actor (its calls in flight are forgotten) and start its replacement, if any."""
        slot = self.slots[dropped.device]
        for ref in [r for r, call in self.pending.items() if call.device == dropped.device]:
            del self.pending[ref]
        with contextlib.suppress(Exception):  # already gone
            ray.kill(slot.actor, no_restart=True)
        retried = dropped.starting and dropped.replacement is not None
        if dropped.starting and not retried:
            self.start_failures.append((node, dropped.reason))
            if slot.spec.card is not None:
                self.not_started[slot.spec.card] = dropped.reason
        if retried:
            log.warning("device actor for %s died: %s; starting it again", slot.spec.card or "a real GPU",
                        dropped.reason)
        elif not (dropped.starting and self._starting):
            info = self.scheduler.devices[dropped.device].info
            log.warning("device %s dropped: %s", info.name if info else slot.spec.card or "(real GPU)",
                        dropped.reason)
        if dropped.replacement is not None:
            self.stats.actor_restarts += 1
            self._spawn(dropped.replacement, Slot(slot.spec))

    # ---- work -------------------------------------------------------------------
    def _plan(self) -> int:
        """Queue a decision for every (device type x workload) not already in the table; returns the
        number of rows to come (a card type that never started: its rows "not measured", in the count)."""
        done = set() if self.force else table.done_keys(table.read(self.sweep.out))
        work = []
        for key in dict.fromkeys(d.type_key for d in self.scheduler.live()):
            info = self.scheduler.info_of(key)
            for w in self.sweep.workloads():
                if self._row_key(info, w) in done:
                    self.stats.skipped += 1
                else:
                    work.append((key, w))
        self._unmeasured = self._not_measured_rows(done)  # written once the progress bar is up
        every_device = self.sweep.every_device
        if every_device and self.simulated:
            log.warning("--every-device on a simulated fleet: identical simulated cards give identical answers, "
                        "so each card type is measured once (one actor per type; device_batches stays empty)")
            every_device = False
        planned = scheduler.plan_sweep(self.scheduler, work, decide_args=(self.sweep.fraction, self.sweep.max_batch),
                                       every_device=every_device,
                                       shared_profiles=self.workers.any(),
                                       soft_profiles=not self.simulated, label=Workload.label)
        return planned + len(self._unmeasured)

    def _not_measured_rows(self, done: set) -> list[dict]:
        """An ``error`` row "not measured: ..." for each combination of a card type asked for whose actor never
        started (not one already in the table): the table accounts for every combination, a re-run redoes it."""
        from .devices import make_backend

        rows = []
        for card, why in self.stats.not_measured.items():
            try:
                info = make_backend(card).info()  # a catalog card: what its actor would have reported
            except ValueError:  # not a catalog card (resolve_devices refuses those): no row key to give
                continue
            count = sum(s.spec.count for s in self.slots.values() if s.spec.card == card)
            for w in self.sweep.workloads():
                if self._row_key(info, w) in done:
                    self.stats.skipped += 1
                else:
                    rows.append(table.error_row(w, info, self.sweep.fraction,
                                                f"not measured: device actor for {card} did not start: {why}",
                                                gpu_count=count, attempts=0))
        return rows

    def _row_key(self, info: DeviceInfo, w: Workload) -> tuple:
        return table.row_key(info, w, self.sweep.fraction)

    def run(self) -> SweepStats:
        t0 = time.monotonic()
        total = self._plan()
        if self.progress is not None:  # a factory: no bar before there is work to show
            self.progress = self.progress(total)
        self._write_rows(self._unmeasured)
        while True:
            for a in self.scheduler.assign(time.monotonic()):
                self._submit(a)
            self._write(self.scheduler.outcomes())
            if self.scheduler.done():
                break
            if not self.pending and not self.workers.starting:  # the scheduler turns work no device can run into errors: a bug if reached
                raise RuntimeError("work left but no device can run it")
            self._wait()
        self.stats.profiles = self.scheduler.completed["profile"]
        self.stats.profile_fallbacks = self.scheduler.fallbacks
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _submit(self, a: scheduler.Assignment) -> None:
        if not a.devices:  # CPU-only: a free profile worker (the scheduler runs no more than there are)
            worker = self.workers.lend(a.job)
            self.pending[getattr(worker, a.call).remote(*a.args)] = Call(None, a.job)
            return
        (device,) = a.devices  # a sweep's device jobs take one device each; a group job needs its own submit
        ref = getattr(self.slots[device].actor, a.call).remote(*a.args)
        self.pending[ref] = Call(device, a.job)

    def _wait(self) -> None:
        """Wait for one call to return (at most 1 s, or until the next deadline), handle it, then timeouts."""
        deadline = self.scheduler.next_deadline_s()
        timeout = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
        ready, _ = ray.wait(list(self.pending) + list(self.workers.starting), num_returns=1, timeout=timeout)
        for ref in ready:
            if ref in self.workers.starting:
                self.workers.started(ref)
            else:
                self._collect(ref)
        for dropped in self.scheduler.expire(time.monotonic()):
            self._drop(dropped)
        self._cancel_abandoned()
        self.workers.give_up_late()

    def _cancel_abandoned(self) -> None:
        """CPU-only jobs the scheduler no longer waits for (past task_timeout_s): their worker is killed
        (a hang does not return) and replaced, the call forgotten."""
        for ref, (_, job) in [(r, call) for r, call in self.pending.items() if call.device is None]:
            if not self.scheduler.is_running(job):
                del self.pending[ref]
                self.workers.replace(job)

    def _collect(self, ref) -> None:
        device, job = self.pending.pop(ref)
        now = time.monotonic()
        try:
            value = ray.get(ref)  # ready: returns at once
        except ray.exceptions.RayError as e:
            self._failed(device, job, e, now)
            return
        if job is None:
            self.scheduler.started(device, value.type_key, value, now)
            return
        if device is None:  # the profile worker is free again
            self.workers.give_back(job)
        self.scheduler.finished(job, value, now)

    def _failed(self, device: int | None, job: int | None, e: Exception, now: float) -> None:
        what, reason = rayfailures.classify(e, starting=job is None)
        if device is None:  # a CPU-only job on a profile worker
            if what == rayfailures.RAISED:  # the workload is broken
                self.workers.give_back(job)
                self.scheduler.failed(job, reason, now)
            else:  # its process died (crash, OOM-kill, node loss) or is poisoned: a new worker, the job retried
                fault = what == rayfailures.FAULT
                log.warning("profile worker %s under %s (%s, attempt %d); starting a new one",
                            "poisoned" if fault else "died", self.scheduler.jobs[job].label, reason,
                            self.scheduler.jobs[job].attempts)
                self.workers.replace(job)
                self.stats.profile_worker_restarts += 1
                self.scheduler.lost(job, reason if fault else f"profile worker died: {type(e).__name__}", now,
                                    faulted=fault)
        elif job is None:  # the actor never reported its device: its constructor raised, or its process died
            self._drop(self.scheduler.start_failed(device, reason, now, died=what == rayfailures.DIED),
                       node=rayfailures.node_of(e) or "?")
        elif what == rayfailures.FAULT:  # the actor's CUDA context is poisoned
            self._drop(self.scheduler.faulted(device, reason, now))
        elif what == rayfailures.RAISED:  # a Python error: the combination is broken, not the actor
            self.scheduler.failed(job, reason, now)
        else:  # the process died (crash, OOM-kill, node loss) or Ray lost it: retried on another actor
            self._drop(self.scheduler.died(device, reason, now))

    # ---- rows -------------------------------------------------------------------
    def _write(self, outcomes: list[scheduler.Outcome]) -> None:
        self._write_rows([self._row(o) for o in outcomes])

    def _write_rows(self, rows: list[dict]) -> None:
        if not rows:
            return
        table.write_rows(self.sweep.out, rows)
        for row in rows:
            self.stats.rows += 1
            self.stats.ok += row["status"] == "ok"
            self.stats.no_fit += row["status"] == "no-fit"
            self.stats.errors += row["status"] == "error"
            self.stats.not_measured_rows += str(row.get("error") or "").startswith("not measured: ")
        if self.progress is not None:
            self.progress.update(len(rows))

    def _row(self, o: scheduler.Outcome) -> dict:
        type_key, w = o.key
        # one key per type: the name and total of the type's first device, whichever device measured
        info = self.scheduler.info_of(type_key)
        gpu_count = self.stats.devices.get(type_key, 0)
        if o.error:
            row = table.error_row(w, info, self.sweep.fraction, o.error, gpu_count=gpu_count, attempts=o.attempts)
        else:
            row = table.decision_row(o.value, gpu_count=gpu_count, attempts=o.attempts)
            row.update(gpu_name=info.name, gpu_total_bytes=info.total_bytes)
        if o.answers:
            row["device_batches"] = ",".join("error" if a is None else str(a) for a in o.answers)
            if len(set(o.answers)) > 1:
                log.warning("devices of %s disagree on %s: %s", info.name, w.label(), _disagreement(o))
        return row

    def shutdown(self) -> None:
        self.workers.kill_all()
        for device, slot in self.slots.items():
            if self.scheduler.devices[device].state is not scheduler.State.DEAD:
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=True)


def _disagreement(o: scheduler.Outcome) -> str:
    """Each device's answer, where it ran and what it had left, and why the smallest is smallest."""
    parts, results = [], [v for v in o.values if v is not None]
    for answer, value in zip(o.answers, o.values):
        if value is None:
            parts.append("error")
            continue
        d = value.device
        near = (f", {d.neighbours} other process{'es' * (d.neighbours > 1)} held {gib(d.neighbour_bytes)}"
                if d.neighbours else "")
        parts.append(f"{answer} on {d.host} {d.uuid or f'pid {d.pid}'} (outside the allocator "
                     f"{gib(d.outside_bytes)}{near})")
    low = min(results, key=lambda r: r.decision.batch_size).device
    others = [r.device for r in results if r.device is not low]
    if low.neighbour_bytes > catalog.NEIGHBOUR_WARN_BYTES:
        why = f"other processes held {gib(low.neighbour_bytes)} on {low.uuid or low.host} while it was measured"
    elif others and low.outside_bytes > max(d.outside_bytes for d in others) + catalog.NEIGHBOUR_WARN_BYTES:
        why = f"{low.uuid or low.host} had more memory in use outside the allocator"
    else:
        why = "same budget, different measured peaks (driver, cuDNN or clock differences)"
    return f"{'; '.join(parts)}. Smallest because: {why}"
