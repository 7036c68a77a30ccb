"""Sweep jobs: TOML files in jobs/, validated into typed configs, overridden by CLI flags.

```toml
[sweep]
fraction = 0.8
precision = ["fp16"]                # any workload field (spec.Workload): one value or a list to sweep
optimizer = ["SGD"]
out = "results/batch_table.csv"

[[sweep.grid]]                      # the cross product within each grid entry
models = ["ultralytics:yolov8s.yaml"]
imgsz = [640]

[fleet]
mode = "auto"                       # auto | real | simulate
simulate = "T4, A10G, A100-80GB"    # catalog cards with counts: "T4 x2, H100-80GB"
address = ""                        # "" local, "auto", "HOST:PORT", "ray://HOST:10001"
```
"""
from __future__ import annotations

import itertools
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from . import catalog, families, spec
from . import decision as core
from .datasets import with_data
from .errors import SpecError
from .spec import Workload, check_fraction, check_max_batch

DEFAULT_JOB = Path(__file__).resolve().parent.parent / "jobs" / "quickstart.toml"


@dataclass(frozen=True)
class GridEntry:
    """Every model in ``models`` at every size its family's axis has in ``sizes`` (its default if none)."""

    models: tuple[str, ...]
    sizes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(size axis, values) for the axes (``spec.SIZES``) this entry names, e.g. (("imgsz", (320, 640)),)."""

    def sizes_of(self, model: str) -> tuple[int, ...]:
        """The sizes ``model`` is swept at: its family's axis's values here, or that axis's default."""
        axis = families.family_of(model).size
        return dict(self.sizes).get(axis, (spec.DEFAULTS[axis],))

    def with_sizes(self, axis: str, values: tuple[int, ...]) -> "GridEntry":
        return GridEntry(self.models, tuple((a, v) for a, v in self.sizes if a != axis) + ((axis, values),))


@dataclass(frozen=True)
class SweepConfig:
    grid: tuple[GridEntry, ...]
    """Model x size cross products; the sweep measures their union."""
    axes: tuple[tuple[str, tuple], ...] = ()
    """The other workload fields (``spec.AXES``) as (name, values swept); a field not named takes its default."""
    fraction: float = core.FRACTION
    """Whole-device usage at the step's peak <= fraction x total."""
    max_batch: int = core.MAX_BATCH
    """Never answer above this."""
    out: str = "results/batch_table.csv"
    """The lookup table; relative paths are relative to the current directory."""
    every_device: bool = False
    """Measure each combination on every device of a type (to check that they agree), not once per type."""

    def values(self, name: str, model: str) -> tuple:
        """The values swept for workload field ``name`` of ``model``: its default for the model's family alone
        when the job does not name it or the field does not apply to the model."""
        if not spec.applies(name, model):  # a field of other families (objects for a classifier): its default
            return (spec.DEFAULTS[name],)
        return dict(self.axes).get(name, (spec.default(name, model),))

    def workloads(self) -> list[Workload]:
        seen: dict[Workload, None] = {}
        for g in self.grid:
            for m in g.models:
                axis = families.family_of(m).size
                for s, *rest in itertools.product(g.sizes_of(m), *(self.values(n, m) for n in spec.AXES)):
                    seen[Workload(model=m, **{axis: s}, **dict(zip(spec.AXES, rest)))] = None
        return list(seen)


@dataclass(frozen=True)
class FleetConfig:
    mode: str = "auto"
    """auto: real GPUs if the machine or cluster has any, else the simulated fleet; real; simulate."""
    simulate: tuple[tuple[str, int], ...] = (("T4", 1), ("A10G", 1), ("A100-80GB", 1))
    """Catalog cards and counts for a simulated fleet."""
    address: str = ""
    """Ray cluster to join ("auto", "HOST:PORT", "ray://..."); empty starts a local Ray (or uses RAY_ADDRESS)."""
    actor_timeout_s: float = 120.0
    """How long an actor may take to be placed and report its device before it is given up."""
    task_timeout_s: float = 1800.0
    """A combination running longer than this is cancelled (its actor killed) and recorded as an error."""
    max_attempts: int = 3
    """Tries per combination when actors die under it; then it is an error row."""


@dataclass(frozen=True)
class Job:
    sweep: SweepConfig
    fleet: FleetConfig
    source: str = "<built-in>"


_ALLOWED = {
    "sweep": {f.name for f in fields(SweepConfig)} - {"axes"} | {"models", "data", *spec.SIZES, *spec.AXES},
    "grid": {"models", *spec.SIZES},
    "fleet": {f.name for f in fields(FleetConfig)},
}


def parse_fleet(text: str, where: str = "--simulate") -> tuple[tuple[str, int], ...]:
    """'T4 x2, A100-80GB' -> (("T4", 2), ("A100-80GB", 1)); catalog names checked."""
    out = []
    for name, count in catalog.parse_counts(text, where, "T4 x2, A100-80GB"):
        try:
            out.append((catalog.card(name).key, count))
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None
    return tuple(out)


def load(path: str | os.PathLike | None = None) -> Job:
    """Read and validate a job file (the built-in quickstart when None)."""
    p = Path(path) if path else DEFAULT_JOB
    src = str(path) if path else "jobs/quickstart.toml"
    if not p.is_file():
        raise SpecError(f"job file {src!r} does not exist; see jobs/ for examples")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{src}: not valid TOML ({e}); fix the file") from None
    return from_dict(data, src, base=p.parent)


def from_dict(data: dict, src: str = "<dict>", base: str | os.PathLike | None = None) -> Job:
    """The job ``data`` (a parsed job file named ``src``) holds; ``base``: the folder relative paths in it
    (``data``) are read from (None: the current directory). ``[sweep]`` may name no models: a job for
    ``devices``, or for ``sweep --models`` (``require_models``)."""
    _check_keys(data, {"sweep", "fleet"}, src, "")
    sweep_d = data.get("sweep", {})
    fleet_d = data.get("fleet", {})
    _check_keys(sweep_d, _ALLOWED["sweep"], src, "[sweep] ")
    _check_keys(fleet_d, _ALLOWED["fleet"], src, "[fleet] ")
    return Job(_sweep(sweep_d, src, base), _fleet(fleet_d, src), src)


def require_models(job: Job) -> Job:
    """``job``, once its sweep names models (from the file or ``--models``); SpecError saying where to name them."""
    if not any(g.models for g in job.sweep.grid):
        raise SpecError(f"{job.source}: [sweep] names no models: add models = [\"torchvision:resnet50\"] (or "
                        "[[sweep.grid]] entries) to it, or pass --models")
    return job


def _check_keys(d, allowed, src, section):
    if not isinstance(d, dict):
        raise SpecError(f"{src}: {section.strip() or 'top level'} must be a table")
    for k in d:
        if k not in allowed:
            raise SpecError(f"{src}: {section}unknown key {k!r}; allowed: {', '.join(sorted(allowed))}")


def _typed(d, key, kind, src, section, default):
    v = d.get(key, default)
    ok = isinstance(v, kind) and not (kind in (int, float, (int, float)) and isinstance(v, bool))
    if not ok:
        name = kind.__name__ if isinstance(kind, type) else "number"
        raise SpecError(f"{src}: {section}{key}={v!r} must be a {name}")
    return v


def _list(d, key, kind, src, section, default):
    v = d.get(key, default)
    if isinstance(v, (str, int)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v:
        raise SpecError(f"{src}: {section}{key}={v!r} must be a non-empty list")
    for x in v:
        if not isinstance(x, kind) or isinstance(x, bool):
            raise SpecError(f"{src}: {section}{key} entry {x!r} must be a {kind.__name__}")
    return tuple(v)


def _grid(entries, src) -> tuple[GridEntry, ...]:
    out = []
    for i, g in enumerate(entries):
        sec = f"[[sweep.grid]] #{i + 1} "
        _check_keys(g, _ALLOWED["grid"], src, sec)
        models = _list(g, "models", str, src, sec, None)
        for m in models:
            spec.check_model(m)
        sizes = _sizes(g, src, sec)
        used = {families.family_of(m).size for m in models}
        for axis, _ in sizes:
            if axis not in used:
                raise SpecError(f"{src}: {sec}{axis} sizes none of its models ({', '.join(models)}): "
                                f"their sizes are {', '.join(sorted(used))}; leave {axis} out or add a model it sizes")
        out.append(GridEntry(models, sizes))
    return tuple(out)


def _sizes(d, src, section) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The size axes (``spec.SIZES``) table ``d`` names, each a non-empty list of valid sizes."""
    out = []
    for axis in spec.SIZES:
        if axis in d:
            sizes = _list(d, axis, int, src, section, None)
            for size in sizes:
                spec.check_value(axis, size, f"{src}: {section}")
            out.append((axis, sizes))
    return tuple(out)


def _axes(d: dict, where: str) -> tuple[tuple[str, tuple], ...]:
    """The workload fields a ``[sweep]`` table (or the flags) names: one value or a list each, checked.
    ``where`` starts each error (``"FILE: [sweep] "``, ``"--"``)."""
    out = []
    for name in spec.AXES:
        if name not in d:
            continue
        values = d[name] if isinstance(d[name], (list, tuple)) else [d[name]]
        if not values:
            raise SpecError(f"{where}{name}=[] must be one value or a non-empty list")
        out.append((name, tuple(dict.fromkeys(spec.check_value(name, v, where) for v in values))))
    return tuple(out)


def _sweep(d, src, base=None) -> SweepConfig:
    sec = "[sweep] "
    sized = [k for k in ("models", *spec.SIZES) if k in d]
    if "grid" in d and sized:
        raise SpecError(f"{src}: {sec}use either {'/'.join(sized)} or [[sweep.grid]] entries, not both")
    if "grid" in d:
        if not isinstance(d["grid"], list) or not d["grid"]:
            raise SpecError(f"{src}: {sec}grid must be one or more [[sweep.grid]] tables")
        grid = _grid(d["grid"], src)
    elif "models" in d:
        grid = _grid([{k: d[k] for k in sized}], src)
    else:  # no models yet (``require_models``): the sizes wait for --models
        grid = (GridEntry((), _sizes(d, src, sec)),)
    fraction = check_fraction(_typed(d, "fraction", (int, float), src, sec, core.FRACTION), f"{src}: {sec}fraction")
    if "data" in d:
        d = with_data(d, _typed(d, "data", str, src, sec, ""), f"{src}: {sec}", base=base)
    return SweepConfig(
        grid=grid, axes=_axes(d, f"{src}: {sec}"), fraction=fraction,
        max_batch=check_max_batch(_typed(d, "max_batch", int, src, sec, core.MAX_BATCH), f"{src}: {sec}max_batch"),
        out=_typed(d, "out", str, src, sec, SweepConfig.out),
        every_device=_typed(d, "every_device", bool, src, sec, SweepConfig.every_device),
    )


def _fleet(d, src) -> FleetConfig:
    sec = "[fleet] "
    default = FleetConfig()  # a key the file leaves out has FleetConfig's default
    mode = _typed(d, "mode", str, src, sec, default.mode)
    if mode not in ("auto", "real", "simulate"):
        raise SpecError(f"{src}: {sec}mode={mode!r} must be auto, real or simulate")
    sim = d.get("simulate")
    if sim is not None and not isinstance(sim, (str, list)):
        raise SpecError(f"{src}: {sec}simulate={sim!r} must be a string like 'T4 x2, A100-80GB' or a list")
    cfg = FleetConfig(
        mode=mode, simulate=default.simulate if sim is None else parse_fleet(sim, f"{src}: {sec}simulate"),
        address=_typed(d, "address", str, src, sec, default.address),
        actor_timeout_s=float(_typed(d, "actor_timeout_s", (int, float), src, sec, default.actor_timeout_s)),
        task_timeout_s=float(_typed(d, "task_timeout_s", (int, float), src, sec, default.task_timeout_s)),
        max_attempts=_typed(d, "max_attempts", int, src, sec, default.max_attempts),
    )
    for k in ("actor_timeout_s", "task_timeout_s", "max_attempts"):
        if getattr(cfg, k) <= 0:
            raise SpecError(f"{src}: {sec}{k}={getattr(cfg, k)} must be > 0")
    return cfg


def with_overrides(job: Job, *, models=None, fraction=None, simulate=None, address=None, out=None,
                   max_batch=None, every_device=None, real=False, data=None, **workload_values) -> Job:
    """The job with command-line flags applied (None leaves a setting as the file has it).

    ``workload_values``: workload fields to sweep instead of the job's, a value or a list each: the size
    axes (``spec.SIZES``: ``imgsz=[320, 640]``) replace the grid's sizes, the others (``spec.AXES``) the
    job's values.
    """
    s, f = job.sweep, job.fleet
    unknown = sorted(set(workload_values) - set(spec.AXES) - set(spec.SIZES))
    if unknown:
        raise SpecError(f"unknown workload field {unknown[0]!r}; known: {', '.join(spec.SIZES + spec.AXES)}")
    sizes = {k: list(v) if isinstance(v, (list, tuple)) else [v]
             for k in spec.SIZES if (v := workload_values.pop(k, None)) is not None}
    grid = s.grid
    if models is not None:  # the sizes the job had, for each axis the flags leave alone
        had = {a: tuple(dict.fromkeys(x for g in grid for axis, xs in g.sizes if axis == a for x in xs))
               for a in spec.SIZES}
        named = {a: list(had[a]) for a in spec.SIZES if had[a]} | sizes
        used = {families.family_of(m).size for m in models}
        grid = _grid([{"models": list(models), **{a: v for a, v in named.items() if a in used or a in sizes}}],
                     "--models")
    elif sizes:
        for axis, values in sizes.items():
            checked = dict(_sizes({axis: values}, f"--{axis.replace('_', '-')}", ""))[axis]
            if grid[0].models and not any(families.family_of(m).size == axis for g in grid for m in g.models):
                raise SpecError(f"--{axis.replace('_', '-')}: no model of {job.source} is sized by {axis}")
            grid = tuple(g.with_sizes(axis, checked)
                         if not g.models or any(families.family_of(m).size == axis for m in g.models) else g
                         for g in grid)
    given = {k: v for k, v in workload_values.items() if v is not None}
    if data is not None:
        given = with_data(given, data, "--")
    axes = dict(s.axes) | dict(_axes(given, "--"))
    s = replace(
        s, grid=grid, axes=tuple((n, axes[n]) for n in spec.AXES if n in axes),
        fraction=s.fraction if fraction is None else check_fraction(fraction, "--fraction"),
        out=s.out if out is None else out,
        max_batch=s.max_batch if max_batch is None else check_max_batch(max_batch, "--max-batch"),
        every_device=s.every_device if every_device is None else every_device,
    )
    if simulate is not None:
        f = replace(f, mode="simulate", simulate=parse_fleet(simulate))
    elif real:
        f = replace(f, mode="real")
    if address is not None:
        f = replace(f, address=address)
    return Job(s, f, job.source)
