"""The fleet: one Ray actor per GPU (per card type when simulated), work queued per device type,
results as table rows.

``run_sweep`` brings Ray up (``cluster``), starts the actors (``actors``) and runs the sweep loop
(``sweeploop.Sweep``), whose rules are ``scheduler.py``'s (plain Python). Probing knows nothing of Ray:
actors call ``engine.decide_on`` on their own backend.

Simulated fleets split the work in two: a card-independent *profile* of each
workload (fake-tensor traces, the expensive part), CPU-only work run by a pool of
``ProfileWorker`` actors (one CPU each, ``num_gpus=0``, one per CPU of the cluster),
then a cheap *decision* per card type on that type's actor, which replays the
shared profile. Cost grows with distinct workloads, not with cards x workloads.
A profile whose worker died is retried on a fresh worker; when workers died under it
``max_attempts`` times it is traced on a device actor (any card type's) instead, up to
``max_attempts`` more times, and only a profile that raises (or keeps killing those too)
is an error row.
Identical simulated cards give identical answers, so a simulated fleet starts one
actor per card *type*; the count the user asked for is data (the rows' ``gpu_count``).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import sys

from . import cluster, table
from .devicetypes import DeviceInfo
from .errors import SpecError
from .sweeploop import Sweep, SweepStats

log = logging.getLogger(__name__)


# ---- the whole sweep: Ray up, fleet, work, Ray down ----------------------------------


def validate_models(sweep) -> None:
    """Build each model once here, before any actor starts: unknown models, factories that
    raise, sizes that do not suit a model (an image size off its stride) and family fields it cannot take
    (LoRA on a model without linear layers) are bad input, not hours-later error rows."""
    from . import models

    workloads = sweep.workloads()
    for g in sweep.grid:
        for m in g.models:
            try:
                built = models.build_source(m)
            except SpecError:
                raise
            except Exception as e:
                raise SpecError(f"model={m!r}: building it raised {type(e).__name__}: {e}; fix the model source") from None
            for s in g.sizes_of(m):
                models.check_size(built, m, s)
            if built.configure is not None:  # family fields (LoRA, attention): set up on a copy (meta: free)
                for w in (w for w in workloads if w.model == m):
                    built.configure(copy.deepcopy(built.module), w)
            del built


@contextlib.contextmanager
def _started_fleet(job, **sweep_options):
    """Ray up (joined or local), one actor per device started; yields (sweep, simulated?); all down after.

    While Ray is up, this process's ``sys.stdout`` is its stderr: Ray's driver prints what the cluster
    reports (raylet warnings such as "N PYTHON worker processes have been started", worker deaths) to
    ``sys.stdout`` from a thread of its own, and stdout is for the command's output only.
    """
    with contextlib.redirect_stdout(sys.stderr):
        with _fleet(job, **sweep_options) as out:
            yield out


@contextlib.contextmanager
def _fleet(job, **sweep_options):
    started = cluster.connect(job.fleet, cluster.local_simulated_gpus(job.fleet))
    sweep = None
    try:
        devices, simulated = cluster.resolve_devices(job.fleet)
        log.info("%d %s devices", len(devices), "simulated" if simulated else "real")
        sweep = Sweep(job, **sweep_options)
        sweep.start(devices)
        yield sweep, simulated
    finally:
        if sweep is not None:
            sweep.shutdown()
        if started:
            cluster.shutdown_ray()


def run_sweep(job, *, force: bool = False, progress=None) -> tuple[SweepStats, "object"]:
    """Measure every combination of ``job`` on its fleet; returns stats and the final table.

    Rows are journaled into ``job.sweep.out`` as they arrive and folded into its CSV when the
    sweep ends (and when it is interrupted, as far as it can); an interrupted or killed sweep
    keeps every finished row and a re-run skips them (unless ``force``).
    """
    from .job import require_models

    require_models(job)
    table.check_writable(job.sweep.out)
    validate_models(job.sweep)
    try:
        with _started_fleet(job, force=force, progress=progress) as (sweep, _):
            stats = sweep.run()
    except BaseException:
        try:  # best effort: leave plain CSV readers every finished row; the journal keeps them anyway
            table.fold(job.sweep.out)
        except Exception as e:
            log.warning("the table's journal was not folded into %s (%s); `read` and the next sweep see its rows",
                        job.sweep.out, e)
        raise
    table.fold(job.sweep.out)
    return stats, table.read(job.sweep.out)


def survey(fleet_cfg) -> tuple[list[DeviceInfo], dict, bool]:
    """Start the fleet's actors, collect what each device reports, stop them: (infos, devices per type,
    simulated?). A simulated type reports once, from its one actor, with the count the fleet asked for."""
    from .job import Job, SweepConfig

    with _started_fleet(Job(SweepConfig(grid=()), fleet_cfg)) as (sweep, simulated):
        return sweep.devices(), dict(sweep.stats.devices), simulated
