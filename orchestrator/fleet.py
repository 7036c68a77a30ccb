"""The fleet: one Ray actor per GPU, work queued per device type, results as table rows.

The driver submits everything it can, then waits with ``ray.wait``; an actor that
dies has its combination re-queued (bounded attempts) and is replaced; a
combination that runs too long is cancelled by killing its actor. Probing knows
nothing of Ray: actors call ``engine.decide_on`` on their own backend.

Simulated fleets split the work in two: a card-independent *profile* of each
workload (fake-tensor traces, the expensive part) on whichever actor is free,
then a cheap *decision* per card type that replays the shared profile. Cost grows
with distinct workloads, not with cards x workloads.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import ray

from . import catalog, engine, table
from .devices import DeviceInfo
from .spec import SpecError, Workload

log = logging.getLogger(__name__)


class DeviceActor:
    """Owns one GPU (real or simulated) for the whole sweep."""

    def __init__(self, card: str | None):
        os.environ.setdefault("YOLO_OFFLINE", "1")  # actors never download
        from .devices import make_backend

        self.backend = make_backend(card)

    def info(self) -> DeviceInfo:
        return dataclasses.replace(self.backend.info(), pid=os.getpid(),
                                   node=ray.get_runtime_context().get_node_id())

    def profile(self, workload: Workload):
        return self.backend.profile(workload)

    def decide(self, workload: Workload, fraction: float, max_batch: int, profile=None) -> engine.Result:
        if profile is not None:
            self.backend.add_profile(profile)
        return engine.decide_on(self.backend, workload, fraction, max_batch=max_batch)


RemoteDeviceActor = ray.remote(DeviceActor)


@dataclass
class Slot:
    """One device: its actor handle and what it is doing."""

    card: str | None
    options: dict = field(default_factory=dict)
    actor: object = None
    info: DeviceInfo | None = None  # kept by a replacement: same device, so same type
    ready: bool = False  # reported its device and can take work
    job: "Task | None" = None
    started: float = 0.0
    alive: bool = True

    @property
    def type_key(self):
        return self.info.type_key if self.info else None


@dataclass
class Task:
    kind: str  # "start" | "profile" | "decide"
    workload: Workload | None = None
    type_key: tuple | None = None  # decide: the device type it must run on
    slot: Slot | None = None  # decide with every_device: this device only
    attempts: int = 0
    errors: list = field(default_factory=list)


@dataclass
class SweepStats:
    rows: int = 0
    ok: int = 0
    no_fit: int = 0
    errors: int = 0
    skipped: int = 0
    profiles: int = 0
    actor_restarts: int = 0
    seconds: float = 0.0
    devices: dict = field(default_factory=dict)  # type_key -> count


class Sweep:
    """Runs one job's combinations over the fleet and writes rows as they arrive."""

    def __init__(self, job, *, force: bool = False, progress=None):
        """``progress(total)`` returns an object with ``update(n)`` (a tqdm bar), or None."""
        self.job = job
        self.sweep, self.fleet = job.sweep, job.fleet
        self.force = force
        self.progress = progress
        self.slots: list[Slot] = []
        self.pending: dict = {}  # ObjectRef -> (Slot, Task)
        self.queue: collections.deque[Task] = collections.deque()
        self.profiles: dict[Workload, object] = {}  # workload -> ObjectRef of its Profile
        self.waiting: dict[Workload, list[Task]] = {}  # decide tasks waiting for a profile
        self.stats = SweepStats()
        self.simulated = False
        self._results: dict[tuple, list] = collections.defaultdict(list)  # (type, workload) -> rows so far
        self._expected: collections.Counter = collections.Counter()  # (type, workload) -> rows to wait for

    # ---- devices ----------------------------------------------------------------
    def _spawn(self, slot: Slot) -> None:
        # num_cpus=0: an actor holding a CPU for life starves placement on small machines
        opts = {"num_gpus": 1, "num_cpus": 0, "max_restarts": 0, "max_task_retries": 0, **slot.options}
        slot.actor = RemoteDeviceActor.options(**opts).remote(slot.card)
        self._submit(slot, Task("start"), slot.actor.info.remote())

    def start(self, cards: list[tuple[str | None, dict]]) -> None:
        """One actor per (card, actor options); blocks until each reports its device or times out."""
        self.simulated = any(c is not None for c, _ in cards)
        self.slots = [Slot(card, opts) for card, opts in cards]
        for slot in self.slots:
            self._spawn(slot)
        deadline = time.monotonic() + self.fleet.actor_timeout_s
        while any(t.kind == "start" for _, t in self.pending.values()):
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            self._on_ready(ready[0])
        for ref, (slot, task) in list(self.pending.items()):
            if task.kind == "start":  # never placed: a missing resource, not a slow start
                del self.pending[ref]
                self._drop(slot, f"actor not placed within {self.fleet.actor_timeout_s:.0f}s")
        live = [s for s in self.slots if s.alive and s.ready]
        if not live:
            raise RuntimeError(
                f"no device actor started within {self.fleet.actor_timeout_s:.0f}s: the cluster has "
                f"{ray.cluster_resources().get('GPU', 0):g} GPUs for {len(cards)} actors; "
                "check `ray status` or use fewer devices"
            )
        self.stats.devices = collections.Counter(s.type_key for s in live)
        for key, n in self.stats.devices.items():
            log.info("device type %s x%d", key, n)

    def _drop(self, slot: Slot, reason: str) -> None:
        slot.alive = False
        if slot.actor is not None:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already gone
                pass
        log.warning("device %s dropped: %s", slot.info.name if slot.info else slot.card, reason)

    def types(self) -> dict[tuple, list[Slot]]:
        out: dict[tuple, list[Slot]] = collections.defaultdict(list)
        for s in self.slots:
            if s.info is not None:
                out[s.type_key].append(s)
        return out

    # ---- work -------------------------------------------------------------------
    def plan(self) -> list[Task]:
        """Decide tasks for every (device type x workload) not already in the table."""
        done = set() if self.force else table.done_keys(table.read(self.sweep.out))
        tasks = []
        for key, slots in self.types().items():
            info = slots[0].info
            for w in self.sweep.workloads():
                if self._row_key(info, w) in done:
                    self.stats.skipped += 1
                    continue
                targets = slots if self.sweep.every_device else [None]
                tasks.extend(Task("decide", w, key, slot=s) for s in targets)
        return tasks

    def _row_key(self, info: DeviceInfo, w: Workload) -> tuple:
        return table.row_key(info, w, self.sweep.fraction)

    def run(self) -> SweepStats:
        t0 = time.monotonic()
        tasks = self.plan()
        self._expected = collections.Counter((t.type_key, t.workload) for t in tasks)
        if self.progress is not None:  # a factory: no bar before there is work to show
            self.progress = self.progress(len(self._expected))
        for t in tasks:
            if self.simulated:
                self.waiting.setdefault(t.workload, []).append(t)
            else:
                self.queue.append(t)
        for w in self.waiting:
            self.queue.append(Task("profile", w))
        while self.queue or self._working():
            self._dispatch()
            self._fail_orphans()
            if not self.pending:
                if self.queue:
                    raise RuntimeError("work left but no device can run it")  # _fail_orphans empties it
                break
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            if ready:
                self._on_ready(ready[0])
            self._check_timeouts()
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _working(self) -> bool:
        """Work in flight; replacement actors still starting don't count once nothing waits for them."""
        return any(task.kind != "start" for _, task in self.pending.values())

    def _idle(self, task: Task) -> Slot | None:
        for s in self.slots:
            if not s.alive or not s.ready or s.job is not None:
                continue
            if task.slot is not None and s is not task.slot:
                continue
            if task.kind == "decide" and s.type_key != task.type_key:
                continue
            return s
        return None

    def _dispatch(self) -> None:
        # decisions first: they finish rows (a simulated one replays in milliseconds), so
        # rows land, and survive an interrupt, before the next workload's profile starts
        for task in sorted(self.queue, key=lambda t: t.kind != "decide"):
            slot = self._idle(task)
            if slot is None:
                continue
            self.queue.remove(task)
            if task.kind == "profile":
                ref = slot.actor.profile.remote(task.workload)
            else:
                prof = self.profiles.get(task.workload)
                ref = slot.actor.decide.remote(task.workload, self.sweep.fraction, self.sweep.max_batch, prof)
            self._submit(slot, task, ref)

    def _submit(self, slot: Slot, task: Task, ref) -> None:
        slot.job, slot.started = task, time.monotonic()
        task.attempts += task.kind != "start"
        self.pending[ref] = (slot, task)

    def _fail_orphans(self) -> None:
        """Queued work that no live device can ever run becomes error rows."""
        live_types = {s.type_key for s in self.slots if s.alive and s.info}
        any_live = bool(live_types)
        for task in list(self.queue):
            if task.kind == "profile" and not any_live:
                self.queue.remove(task)
                self._fail_workload(task.workload, "no device left to profile on")
            elif task.kind == "decide" and (task.type_key not in live_types or (task.slot and not task.slot.alive)):
                self.queue.remove(task)
                why = "; ".join(task.errors[-1:]) or "device died"
                self._error(task, f"no device of this type left ({why})")

    def _on_ready(self, ref) -> None:
        slot, task = self.pending.pop(ref)
        slot.job = None
        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # a Python error: the combination is broken, not the actor
            cause = e.cause if getattr(e, "cause", None) is not None else e
            self._failed(task, f"{type(cause).__name__}: {cause}", retry=False, slot=slot)
            return
        except ray.exceptions.RayActorError as e:  # the process died (crash, OOM-kill, node loss)
            self._actor_died(slot, task, f"actor died: {type(e).__name__}")
            return
        except ray.exceptions.RayError as e:  # lost object, dead node, Ray's memory monitor: retry elsewhere
            self._drop(slot, f"{type(e).__name__}")
            self._actor_died(slot, task, f"ray failure: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return
        if task.kind == "start":
            slot.info, slot.ready = value, True
        elif task.kind == "profile":
            self.profiles[task.workload] = ray.put(value)
            self.stats.profiles += 1
            self.queue.extend(self.waiting.pop(task.workload, []))
        else:
            self._done(task, value)

    def _actor_died(self, slot: Slot, task: Task, reason: str) -> None:
        slot.alive = False
        if task.kind == "start":  # a device that cannot even start is not retried
            self._drop(slot, reason)
            return
        log.warning("%s on %s: %s (attempt %d)", task.workload.label(), slot.info.name, reason, task.attempts)
        self._failed(task, reason, retry=True, slot=slot)
        self._replace(slot)

    def _replace(self, slot: Slot) -> None:
        """A new actor for the same device; it takes work once it reports (its start task)."""
        self.stats.actor_restarts += 1
        new = Slot(slot.card, slot.options, info=slot.info)
        self.slots.append(new)
        self._spawn(new)
        # --every-device work queued for the old actor goes to its replacement
        for task in list(self.queue) + [t for ts in self.waiting.values() for t in ts]:
            if task.slot is slot:
                task.slot = new

    def _failed(self, task: Task, reason: str, *, retry: bool, slot: Slot) -> None:
        task.errors.append(reason)
        if task.kind == "start":
            self._drop(slot, reason)
            return
        if retry and task.attempts < self.fleet.max_attempts:
            if task.slot is not None:
                task.slot = None  # its device is gone: any device of the type will do
            self.queue.append(task)
            return
        if retry:
            reason = f"{reason}; gave up after {task.attempts} attempts"
        if task.kind == "profile":
            self._fail_workload(task.workload, reason)
        else:
            self._error(task, reason)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for ref, (slot, task) in list(self.pending.items()):
            limit = self.fleet.actor_timeout_s if task.kind == "start" else self.fleet.task_timeout_s
            if now - slot.started <= limit:
                continue
            del self.pending[ref]
            slot.job = None
            if task.kind == "start":
                self._drop(slot, f"actor not placed within {limit:.0f}s")
                continue
            self._drop(slot, f"{task.workload.label()} ran past task_timeout_s={limit:g}")
            task.errors.append(f"cancelled after {limit:g}s (task_timeout_s)")
            task.attempts = self.fleet.max_attempts  # a hang is not retried: it would hang again
            self._failed(task, task.errors[-1], retry=False, slot=slot)
            self._replace(slot)

    # ---- rows -------------------------------------------------------------------
    def _fail_workload(self, w: Workload, reason: str) -> None:
        for t in self.waiting.pop(w, []):
            self._error(t, reason)

    def _error(self, task: Task, reason: str) -> None:
        info = self.types()[task.type_key][0].info
        gpu_count = self.stats.devices.get(task.type_key, 0)
        row = table.error_row(task.workload, info, self.sweep.fraction, reason, gpu_count=gpu_count,
                              attempts=task.attempts)
        self._finish(task, row, None)

    def _done(self, task: Task, result: engine.Result) -> None:
        row = table.decision_row(result, gpu_count=self.stats.devices.get(task.type_key, 0),
                                 attempts=task.attempts)
        # one key per type: the name and total of the type's first device, whichever device measured
        canonical = self.types()[task.type_key][0].info
        row.update(gpu_name=canonical.name, gpu_total_bytes=canonical.total_bytes)
        self._finish(task, row, result)

    def _finish(self, task: Task, row: dict, result) -> None:
        key = (task.type_key, task.workload)
        self._results[key].append(row)
        if len(self._results[key]) < self._expected[key]:
            return  # every_device: wait for every device of the type
        rows = self._results.pop(key)
        row = _combine(rows)
        table.write_rows(self.sweep.out, [row])
        self.stats.rows += 1
        status = row["status"]
        self.stats.ok += status == "ok"
        self.stats.no_fit += status == "no-fit"
        self.stats.errors += status == "error"
        if self.progress is not None:
            self.progress.update(1)

    def shutdown(self) -> None:
        for s in self.slots:
            if s.actor is not None and s.alive:
                try:
                    ray.kill(s.actor, no_restart=True)
                except Exception:
                    pass


def _combine(rows: list[dict]) -> dict:
    """Rows of one type measured on several devices: the smallest answer is the safe one."""
    if len(rows) == 1:
        return rows[0]
    best = min(rows, key=lambda r: (r["status"] != "error", r["batch_size"]))
    best = dict(best)
    best["device_batches"] = ",".join(str(r["batch_size"]) for r in rows)
    if len({r["batch_size"] for r in rows}) > 1:
        log.warning("devices of %s disagree on %s@%s: %s", best["gpu_name"], best["model"], best["imgsz"],
                    best["device_batches"])
    return best


# ---- the whole sweep: Ray up, fleet, work, Ray down ----------------------------------

RAY_QUIET = {"log_to_driver": False, "logging_level": "error"}


def connect(fleet, simulated_gpus: int) -> bool:
    """Join the configured cluster or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = fleet.address or os.environ.get("RAY_ADDRESS", "")
    # ray.init installs its own SIGTERM handler (exit 1); keep the caller's
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **RAY_QUIET)
        else:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     num_gpus=simulated_gpus or None, **RAY_QUIET)
    except ConnectionError as e:
        raise SpecError(f"address={address!r}: cannot reach a Ray cluster ({e}); "
                        "check `ray status` there, or leave --address empty to run locally") from None
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    return True


def _local_simulated_gpus(fleet) -> int:
    """Logical GPUs for a local Ray: the simulated fleet's size when it will be simulated, else 0
    (Ray counts the real GPUs itself)."""
    from .devices import cuda_count

    remote = fleet.address or os.environ.get("RAY_ADDRESS")
    simulate = fleet.mode == "simulate" or (fleet.mode == "auto" and not remote and cuda_count() == 0)
    return sum(n for _, n in fleet.simulate) if simulate else 0


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when HOST:PORT does not answer (Ray itself retries for long)."""
    if address == "auto":
        return  # Ray looks for a local cluster and says so quickly when there is none
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"address={address!r} must be auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise SpecError(f"address={address!r}: nothing answers there ({e}); check `ray status` on the head "
                        "node, or leave --address empty to run locally") from None


def resolve_devices(fleet) -> tuple[list[tuple[str | None, dict]], bool]:
    """The devices to start actors for: (card or None for a real GPU, actor options), and simulated?"""
    mode = fleet.mode
    if mode == "auto":
        if fleet.address or os.environ.get("RAY_ADDRESS"):
            mode = "real" if ray.cluster_resources().get("GPU", 0) >= 1 else "simulate"
        else:
            from .devices import cuda_count

            mode = "real" if cuda_count() else "simulate"
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if mode == "real":
        if gpus < 1:
            raise SpecError("the Ray cluster has no GPUs: start it with GPUs, or use a simulated fleet "
                            "(--simulate 'T4, A100-80GB')")
        return [(None, {}) for _ in range(gpus)], False
    cards = [key for key, n in fleet.simulate for _ in range(n)]
    if len(cards) > gpus:
        raise SpecError(f"--simulate asks for {len(cards)} devices but the Ray cluster has {gpus} GPUs "
                        "(logical GPUs count): simulate fewer cards or add GPUs to the cluster")
    out = []
    for key in cards:
        rt = catalog.card(key).ray_type
        # pin to nodes labelled with this accelerator type, where the cluster has such labels
        opts = {"resources": {f"accelerator_type:{rt}": 0.001}} if rt and f"accelerator_type:{rt}" in resources else {}
        out.append((key, opts))
    return out, True


def validate_models(sweep) -> None:
    """Build each model once here, before any actor starts: unknown models, factories that
    raise and image sizes that break a model's stride are bad input, not hours-later error rows."""
    from . import models

    for g in sweep.grid:
        for m in g.models:
            try:
                built = models.build_source(m)
            except SpecError:
                raise
            except Exception as e:
                raise SpecError(f"model={m!r}: building it raised {type(e).__name__}: {e}; fix the model source") from None
            for s in g.imgsz:
                models.check_imgsz(built, m, s)
            del built


@contextlib.contextmanager
def _started_fleet(job, **sweep_options):
    """Ray up (joined or local), one actor per device started; yields (sweep, simulated?); all down after."""
    started = connect(job.fleet, _local_simulated_gpus(job.fleet))
    sweep = None
    try:
        devices, simulated = resolve_devices(job.fleet)
        log.info("%d %s devices", len(devices), "simulated" if simulated else "real")
        sweep = Sweep(job, **sweep_options)
        sweep.start(devices)
        yield sweep, simulated
    finally:
        if sweep is not None:
            sweep.shutdown()
        if started:
            _shutdown_ray()


def run_sweep(job, *, force: bool = False, progress=None) -> tuple[SweepStats, "object"]:
    """Measure every combination of ``job`` on its fleet; returns stats and the final table.

    Rows are merged into ``job.sweep.out`` as they arrive; an interrupted sweep keeps
    every finished row and a re-run skips them (unless ``force``).
    """
    table.check_writable(job.sweep.out)
    validate_models(job.sweep)
    with _started_fleet(job, force=force, progress=progress) as (sweep, _):
        stats = sweep.run()
    return stats, table.read(job.sweep.out)


def _shutdown_ray() -> None:
    """ray.shutdown() that a second Ctrl-C or SIGTERM cannot cut short (it would leave Ray running)."""
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def survey(fleet_cfg) -> tuple[list[DeviceInfo], bool]:
    """Start the fleet's actors, collect what each device reports, stop them: (infos, simulated?)."""
    from .job import Job, SweepConfig

    with _started_fleet(Job(SweepConfig(grid=()), fleet_cfg)) as (sweep, simulated):
        return [s.info for s in sweep.slots if s.ready], simulated
