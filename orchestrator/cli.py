"""Command line: one function per subcommand, each a few calls into the library.

Exit codes: 0 done, 1 runtime failure, 2 bad input, 3 a sweep that finished but wrote
``error`` rows, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback

from . import decision as core
from . import spec
from .errors import SpecError
from .units import gib, mib

log = logging.getLogger("orchestrator")

EXIT_ERROR_ROWS = 3
"""``sweep`` finished, but some rows are ``error`` (those of a card type asked for and never measured included):
a script can tell (``ok`` and ``no-fit`` rows exit 0)."""


def _add_decision_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fraction", type=float, default=core.FRACTION,
                   help="share of the card's total memory the whole device may use at the step's peak "
                        f"(default {core.FRACTION}, as YOLO; lower it if other jobs share the card)")
    p.add_argument("--max-batch", type=int, default=core.MAX_BATCH,
                   help=f"never answer above this (default {core.MAX_BATCH}, as YOLO's autobatch)")


def cmd_autobatch(args) -> int:
    from .engine import autobatch

    r = autobatch(workload_from_args(args), fraction=args.fraction, gpu=args.gpu, max_batch=args.max_batch)
    d, dev = r.decision, r.device
    if args.json:
        print(json.dumps({"workload": r.workload.as_dict(), "device": dev.as_dict(), "fraction": r.fraction,
                          "batch_size": d.batch_size, "status": d.status, "peak_bytes": d.peak_bytes,
                          "budget_bytes": d.budget_bytes, "bytes_per_sample": d.bytes_per_sample,
                          "fixed_bytes": d.fixed_bytes, "r2": d.r2, "clamped": d.clamped, "reason": d.reason,
                          "probes": [[p.batch, p.peak_bytes] for p in d.probes], "seconds": r.seconds,
                          **_calibration(r.workload.model, dev.backend)}))
        return 0
    print(f"{r.workload.label()} on {dev.name} ({dev.backend}, {gib(dev.total_bytes)} total, "
          f"{gib(dev.outside_bytes)} outside the allocator)")
    print(f"  budget      {gib(d.budget_bytes)}  (fraction {r.fraction:g} of total, less outside)")
    print(f"  batch size  {d.batch_size}  status {d.status}  peak {gib(d.peak_bytes)}"
          + (f"  ({d.reason})" if d.reason else ""))
    if d.bytes_per_sample is not None:
        print(f"  fit         {mib(d.bytes_per_sample)}/sample + {mib(d.fixed_bytes)} fixed  R^2 {d.r2:.4f}")
    probes = "  ".join(f"{p.batch}:{'OOM' if p.oom else gib(p.peak_bytes, unit=False)}" for p in d.probes)
    print(f"  probes      {probes}  (GiB; {d.measurements} measurements, {r.seconds:.1f} s)")
    if dev.backend == "simulated":
        from . import calibration

        error = calibration.expected_error(r.workload.model)
        print(f"  simulated   against published real-GPU readings of {calibration.kind_of(r.workload.model)} "
              f"workloads: {error if error != 'unknown' else 'none published; verify on a card'} "
              f"(calibration {calibration.VERSION})")
    return 0


def _calibration(model: str, backend: str) -> dict:
    """A simulated answer's calibration and error band, as the table's row records them."""
    if backend != "simulated":
        return {}
    from . import calibration

    return {"calibration": calibration.VERSION, "sim_error": calibration.expected_error(model)}


def cmd_sweep(args) -> int:
    from tqdm import tqdm

    from . import fleet, job as jobs, summary

    job = jobs.with_overrides(
        jobs.load(args.job), models=args.models, fraction=args.fraction, simulate=args.simulate,
        address=args.address, out=args.out, max_batch=args.max_batch, every_device=args.every_device or None,
        real=args.real, data=args.data, **overrides_from_args(args),
    )
    jobs.require_models(job)  # a job file may hold only [fleet]: then --models names them
    bars = []

    def progress(total: int):
        log.info("sweep %s: %d workloads -> %s", job.source, len(job.sweep.workloads()), job.sweep.out)
        bars.append(tqdm(total=total, desc="combinations", unit="row", file=sys.stderr, dynamic_ncols=True))
        return bars[-1]

    try:
        stats, df = fleet.run_sweep(job, force=args.force, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    mine = df[df["fraction"].round(6) == round(job.sweep.fraction, 6)]
    mine = mine[mine["model"].isin({w.model for w in job.sweep.workloads()})]
    print(summary.pivot(mine).to_string())
    print(f"\n{stats.rows} rows written ({stats.ok} ok, {stats.no_fit} no-fit, {stats.errors} error"
          + (f", of which {stats.not_measured_rows} not measured" if stats.not_measured_rows else "")
          + f"), {stats.skipped} already in the table, {stats.actor_restarts} actor restarts"
          + (f", {stats.profile_worker_restarts} profile worker restarts" if stats.profile_worker_restarts else "")
          + (f", {stats.profile_fallbacks} profiles traced on a device actor" if stats.profile_fallbacks else "")
          + f", {stats.seconds:.1f} s")
    for card, why in stats.not_measured.items():
        print(f"not measured: {card} (asked for; its device actor did not start: {why})")
    print(f"table: {job.sweep.out}")
    if stats.errors:
        not_measured = f" ({', '.join(stats.not_measured)} not measured)" if stats.not_measured else ""
        print(f"error: {stats.errors} rows are `error`{not_measured} (see their `error` column, or `python -m "
              f"orchestrator report {job.sweep.out}`); fix the cause and run again: `error` rows are measured "
              "again, `ok` rows kept", file=sys.stderr)
        return EXIT_ERROR_ROWS
    return 0


def cmd_devices(args) -> int:
    import collections

    from . import catalog, fleet, job as jobs

    fleet_cfg = jobs.with_overrides(jobs.load(args.job), simulate=args.simulate, address=args.address,
                                    real=args.real).fleet
    infos, counts, simulated = fleet.survey(fleet_cfg)
    groups = collections.defaultdict(list)
    for info in infos:
        groups[info.type_key].append(info)
    print(f"{'simulated' if simulated else 'real'} fleet: {sum(counts.values())} devices in {len(groups)} types")
    print(f"  {'GPU':<28} {'count':>5} {'total':>11} {'outside':>11} {'usable':>11}  backend  hosts")
    for (name, _), group in sorted(groups.items(), key=lambda kv: kv[1][0].total_bytes):
        d = group[0]
        hosts = ",".join(sorted({i.host for i in group}))
        print(f"  {name:<28} {counts[d.type_key]:>5} {gib(d.total_bytes):>11} {gib(d.outside_bytes):>11} "
              f"{gib(d.total_bytes - d.outside_bytes):>11}  {d.backend:<8} {hosts}")
    print("\ncatalog (simulate any of these with --simulate 'T4 x2, A100-80GB'):")
    for c in catalog.CATALOG.values():
        print(f"  {c.key:<10} {c.name:<28} {gib(c.total_bytes):>11}  sm_{c.capability[0]}{c.capability[1]}")
    return 0


# -- lookup

def _register_lookup(sub, common) -> None:
    p = sub.add_parser("lookup", parents=list(common),
                         help="print the batch size for one model on one card, read from a table")
    p.add_argument("table", help="batch table CSV written by `sweep`, e.g. results/batch_table.csv")
    add_workload_flags(p, many=False)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", help="catalog card (A100-80GB) or device name ('Tesla T4'); "
                                     "default: the current CUDA device of this machine")
    where.add_argument("--gpus", metavar="'CARD xN, ...'",
                       help="a DDP job's ranks on several GPU types, e.g. 'A10G x4, T4 x4': prints the batch per "
                            "rank that fits every rank (the smallest), and on stderr the global batch and the card "
                            "that limits it; world_size is the total count")
    where.add_argument("--gpu-memory", type=float, metavar="GB",
                       help="a card the table does not name, by the memory it is sold as (24 for an L4, A10G or "
                            "RTX 4090: read as the smallest such catalog card) or, for any other size, the total "
                            "in GiB as torch reports it; the answer is extrapolated")
    p.add_argument("--fraction", type=float, default=None,
                   help="share of the card to use at peak (default: the table's; another value is extrapolated)")
    p.add_argument("--max-batch", type=int, default=core.MAX_BATCH,
                   help=f"cap on extrapolated answers (default {core.MAX_BATCH}, the sweep's)")
    p.add_argument("--measured-only", action="store_true",
                   help="exit 2 instead of extrapolating when the table did not measure this card and fraction")
    p.set_defaults(func=cmd_lookup)


def cmd_lookup(args: argparse.Namespace) -> int:
    """Only the integer goes to stdout, so `batch=$(python -m orchestrator lookup ...)` works."""
    from .answers import lookup

    gpu = args.gpu if args.gpu_memory is None else args.gpu_memory
    if args.gpus is not None:
        return _lookup_ranks(args)
    w = workload_from_args(args)
    a = lookup(args.table, w, gpu=gpu, fraction=args.fraction, max_batch=args.max_batch,
               measured_only=args.measured_only)
    if a.extrapolated:
        print("warning: extrapolated, not measured on this card or fraction; check it on the first run "
              f"(`python -m orchestrator autobatch --model {w.model} --{w.size_axis.replace('_', '-')} {w.size} ...`)", file=sys.stderr)
    print(a.explanation, file=sys.stderr)
    print(a.batch_size)
    return 0


def _lookup_ranks(args: argparse.Namespace) -> int:
    """``--gpus``: the per-rank integer on stdout; each card's answer, the global batch and the limit on stderr."""
    from .answers import lookup_ranks

    world_size, args.world_size = args.world_size, None  # the total unless given (checked against it)
    w = workload_from_args(args)
    r = lookup_ranks(args.table, w, gpus=args.gpus, world_size=world_size, fraction=args.fraction,
                     max_batch=args.max_batch, measured_only=args.measured_only)
    for name, a in r.answers.items():
        print(f"{name}: {a.explanation}", file=sys.stderr)
    if r.extrapolated:
        print("warning: extrapolated for some card, not measured on it; check it on the first run", file=sys.stderr)
    print(r.explanation(), file=sys.stderr)
    print(r.batch_size)
    return 0


# -- report

def _register_report(sub, common) -> None:
    p = sub.add_parser("report", parents=list(common),
                       help="write a Markdown summary and a heatmap PNG of a batch table")
    p.add_argument("table", help="batch table CSV written by `sweep`, e.g. results/batch_table.csv")
    p.add_argument("--out", help="folder for TABLE.md and TABLE.png (default: report/ next to the table)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write

    md_path, png_path = write(args.table, args.out)
    print(md_path)
    print(png_path)
    return 0


# -- command-line flags, derived from the fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_workload_flags(parser: argparse.ArgumentParser, *, many: bool) -> None:
    """One flag per workload field, and ``--data``. ``many`` (sweep): comma-separated lists (``;`` for the fields
    of ``LIST_SEPARATOR``) that replace the job's values; otherwise one value. Every flag defaults to None: not
    given (the job's, or the field's default)."""
    parser.add_argument("--data", help="an ultralytics data yaml: objects = 4 x the most labels on one training "
                                       "image (mosaic), classes = its names (read offline from its label files)")
    for f in spec.FIELDS:
        kind, meta = spec.TYPES[f.name], f.metadata
        if f.name == "model":
            if many:
                parser.add_argument("--models", type=csv_list(str), help=f"comma-separated, replacing the job's "
                                                                         f"grid; {meta['help']}")
            else:
                parser.add_argument("--model", required=True, help=meta["help"])
            continue
        dest = f.name
        if kind is bool:
            on = not f.default  # the flag turns the default around
            text = meta["help"] if on else f"leave out: {meta['help']}"
            flag = _flag(f.name) if on else "--no-" + f.name.replace("_", "-")
            parser.add_argument(flag, dest=dest, action="store_const", const=on, default=None, help=text)
        elif many:
            sep = LIST_SEPARATOR.get(f.name, ",")
            parser.add_argument(_flag(f.name), dest=dest, type=csv_list(kind, sep),
                                help=f"{'comma' if sep == ',' else 'semicolon'}-separated; {meta['help']}")
        else:
            parser.add_argument(_flag(f.name), dest=dest, type=kind, default=None,
                                choices=list(meta["choices"]) if meta["choices"] else None, help=meta["help"])


def workload_from_args(args: argparse.Namespace) -> spec.Workload:
    """The workload a single-value command (``autobatch``, ``lookup``) names (``--data`` read here)."""
    values = {k: getattr(args, k) for k in spec.KEYS if getattr(args, k) is not None}
    if args.data is not None:
        from .datasets import with_data

        values = with_data(values, args.data, "--")
    return spec.make(**values)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The workload values ``sweep``'s flags set (None: not given), keyed by field name: sizes and the rest."""
    out = {k: getattr(args, k) for k in spec.SIZES + spec.AXES if getattr(args, k) is not None}
    return {k: v if isinstance(v, list) else [v] for k, v in out.items()}


LIST_SEPARATOR = {"alloc_conf": ";", "lora_targets": ";"}
"""``sweep``'s list separator for fields whose values hold commas themselves (``--alloc-conf
'default;expandable_segments:True,max_split_size_mb:128'``); others are comma-separated."""


def csv_list(kind, sep: str = ","):
    def parse(text: str):
        try:
            return [kind(x.strip()) for x in text.split(sep) if x.strip()]
        except ValueError:
            word = "comma" if sep == "," else f"{sep!r}"
            raise argparse.ArgumentTypeError(f"{text!r} must be a {word}-separated list of {kind.__name__}") from None

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _common_flags(suppress: bool) -> argparse.ArgumentParser:
    """-v and --debug, accepted before and after the subcommand (after: SUPPRESS keeps the value given before)."""
    p = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else False
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress (INFO) on stderr")
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks for errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m orchestrator", description="Largest training batch sizes for GPU fleets.",
                     parents=[_common_flags(suppress=False)])
    common = [_common_flags(suppress=True)]
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("autobatch", parents=common, help="decide the batch size for one model on one device")
    add_workload_flags(p, many=False)
    p.add_argument("--gpu", default=None,
                   help="simulate this catalog card (T4, A100-80GB, ...); default: the current real CUDA device")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_decision_flags(p)
    p.set_defaults(func=cmd_autobatch)

    p = sub.add_parser("sweep", parents=common, help="build the batch table for every GPU type x workload in a job")
    p.add_argument("job", nargs="?", default=None,
                   help="job file (TOML, see jobs/); default: the built-in jobs/quickstart.toml")
    add_workload_flags(p, many=True)
    p.add_argument("--fraction", type=float,
                   help=f"share of each card's memory to use at peak (job default {core.FRACTION})")
    p.add_argument("--max-batch", type=int, help=f"never answer above this (default {core.MAX_BATCH})")
    p.add_argument("--simulate", help="simulate this fleet of catalog cards, e.g. 'T4 x2, A100-80GB'")
    p.add_argument("--real", action="store_true", help="require real GPUs (fail instead of simulating)")
    p.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:10001 "
                                     "(default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--out", help="table path (default results/batch_table.csv); rows merge into an existing table")
    p.add_argument("--force", action="store_true", help="re-measure combinations already ok in the table")
    p.add_argument("--every-device", action="store_true",
                   help="measure on every device of a type (checks that they agree) instead of once per type")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("devices", parents=common, help="list the fleet's device types and the card catalog")
    p.add_argument("job", nargs="?", default=None, help="job file whose [fleet] to use (default: quickstart)")
    p.add_argument("--simulate", help="a simulated fleet of catalog cards, e.g. 'T4 x2, A100-80GB'")
    p.add_argument("--real", action="store_true", help="require real GPUs")
    p.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:10001")
    p.set_defaults(func=cmd_devices)

    _register_lookup(sub, common)
    _register_report(sub, common)
    return parser


_TERMINATED = []


def _on_sigterm(signum, frame):
    # raised as KeyboardInterrupt, which Ray's blocking calls pass through cleanly (another
    # exception type raised inside ray.wait surfaces as SystemError); the flag keeps exit 143
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SpecError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        what = "terminated" if _TERMINATED else "interrupted"
        print(f"{what}: the table holds every finished row; run again to do the rest", file=sys.stderr)
        return 143 if _TERMINATED else 130
    except Exception as e:  # a runtime failure: one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
