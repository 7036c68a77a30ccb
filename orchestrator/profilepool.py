"""The profile workers: a pool of one-CPU Ray actors for CPU-only jobs (a workload's simulated profile),
one slot each. The pool keeps the scheduler's CPU slots equal to the workers that are up: a worker that
dies or hangs is killed and replaced, its slot reopening when the replacement is up (bounded tries)."""
from __future__ import annotations

import contextlib
import logging
import time

import ray

from . import rayfailures

log = logging.getLogger(__name__)


class ProfilePool:
    """Profile workers: ``launch`` them, ``keep_started`` those up in time, ``lend`` one to a job and take it
    back (``give_back``), ``replace`` one that died or hangs; ``started``/``give_up_late`` follow the
    replacements (their ``ready()`` refs are ``starting``'s keys, which the sweep waits on)."""

    def __init__(self, remote_worker, scheduler, stats, actor_timeout_s: float, max_attempts: int):
        self.remote_worker = remote_worker  # the Ray actor class (``actors.RemoteProfileWorker``)
        self.scheduler, self.stats = scheduler, stats
        self.actor_timeout_s, self.max_attempts = actor_timeout_s, max_attempts
        self.idle: list = []  # workers free for a CPU-only job
        self.busy: dict = {}  # job id -> the worker running it
        self.starting: dict = {}  # ready() ref -> (a replacement worker, give-up time, starts)

    def launch(self, n: int) -> dict:
        """Start ``n`` workers: their ``ready()`` ref -> worker, for ``keep_started``."""
        return {w.ready.remote(): w for w in (self.remote_worker.remote() for _ in range(n))}

    def lend(self, job: int):
        worker = self.busy[job] = self.idle.pop()
        return worker

    def give_back(self, job: int) -> None:
        self.idle.append(self.busy.pop(job))

    def any(self) -> bool:
        """Workers up or coming up."""
        return bool(self.idle or self.starting)

    def kill_all(self) -> None:
        for worker in [*self.idle, *self.busy.values(), *(w for w, *_ in self.starting.values())]:
            with contextlib.suppress(Exception):
                ray.kill(worker, no_restart=True)

    def keep_started(self, ready: dict, deadline: float) -> None:
        """Keep the profile workers (``ready()`` ref -> worker) that are up by ``deadline``; none at all is an
        error naming the cause."""
        workers = list(ready.values())
        done, late = ray.wait(list(ready), num_returns=len(ready), timeout=max(0.0, deadline - time.monotonic()))
        errors = []
        for ref in done:
            try:
                ray.get(ref)
                self.idle.append(ready[ref])
            except ray.exceptions.RayError as e:
                if not self._start_again(e, starts=1):
                    errors.append(rayfailures.reason_of(e))
        for ref in late:
            errors.append(f"not placed within {self.actor_timeout_s:.0f}s (actor_timeout_s)")
            with contextlib.suppress(Exception):
                ray.kill(ready[ref], no_restart=True)
        if workers and not self.idle and not self.starting:
            raise RuntimeError(f"no profile worker started ({len(workers)} tried, one CPU each): "
                               f"{'; '.join(dict.fromkeys(errors))}. Fix: check `ray status` for free CPUs")
        if errors:
            log.warning("%d of %d profile workers did not start: %s", len(errors), len(workers),
                        "; ".join(dict.fromkeys(errors)))
        self.scheduler.cpu_slots_up(len(self.idle))

    def replace(self, job: int) -> None:
        """The worker that ran ``job`` died or hangs: killed, its slot closed, and a new one started; the
        slot reopens when the new one is up (a lost node's CPU may be gone: then it never is, and after
        ``actor_timeout_s`` the pool goes on smaller)."""
        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.busy.pop(job), no_restart=True)
        self.scheduler.cpu_slot_lost()
        self._start_one()

    def _start_again(self, e: Exception, starts: int) -> bool:
        """A worker's ``starts``-th start failed with ``e``: when its process died (killed while starting) and
        tries are left, a new one is started in its place (True); else False (the caller gives it up)."""
        if not (rayfailures.died(e) and starts < self.max_attempts):
            return False
        self.stats.profile_worker_restarts += 1
        log.warning("a profile worker died while starting (%s, attempt %d of %d); starting it again",
                    rayfailures.reason_of(e), starts, self.max_attempts)
        self._start_one(starts + 1)
        return True

    def _start_one(self, starts: int = 1) -> None:
        """A new profile worker; its slot opens when it is up (``starts``: tries at this slot's start)."""
        worker = self.remote_worker.remote()
        self.starting[worker.ready.remote()] = (worker, time.monotonic() + self.actor_timeout_s, starts)

    def started(self, ref) -> None:
        """A replacement's ``ready()`` returned: its slot opens, or it is started again or given up."""
        worker, _, starts = self.starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            if not self._start_again(e, starts):
                self._lost(worker, rayfailures.reason_of(e))
            return
        self.idle.append(worker)
        self.scheduler.cpu_slot_back()

    def give_up_late(self) -> None:
        """Replacements not up by their deadline are given up (their slot stays closed)."""
        now = time.monotonic()
        for ref, (worker, deadline, _) in list(self.starting.items()):
            if now > deadline:
                del self.starting[ref]
                self._lost(worker, f"not placed within {self.actor_timeout_s:.0f}s "
                                   "(actor_timeout_s; the cluster may have lost the CPUs)")

    def _lost(self, worker, reason: str) -> None:
        with contextlib.suppress(Exception):
            ray.kill(worker, no_restart=True)
        log.warning("a replacement profile worker did not start: %s; %d left", reason, self.scheduler.cpu_slots)
        if self.scheduler.cpu_slots <= 0 and not self.starting:
            self.scheduler.no_cpu_left(f"no profile worker left ({reason})")
