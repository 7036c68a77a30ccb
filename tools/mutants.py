"""Put known faults into a copy of the repository, one at a time, and check that the tests catch each.

Each fault is a textual patch (the exact text to replace, which must occur once) and the
tests that should catch it. For every fault the script copies the working tree to a
temporary folder, applies the patch, runs those tests there with pytest (-x, so it stops
at the first failure) and prints whether they failed (caught) or passed (not caught). The
unpatched copy is run first on the union of the tests: a fault only counts as caught when
those tests pass without it.

    python tools/mutants.py                 # every fault
    python tools/mutants.py --list          # names only
    python tools/mutants.py ema momentum    # faults whose name contains any of these words
    python tools/mutants.py --tests-from 7f57a73 --targets tests/test_simulated.py momentum
                                            # would an older suite (its tests/) have caught it?

Run from the repository root, in the project's virtualenv. The copy is imported first
(PYTHONPATH), whatever is installed, and is deleted afterwards.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Fault:
    name: str
    why: str
    path: str
    patches: tuple[tuple[str, str], ...]
    """(text to replace, replacement) pairs, each old text occurring exactly once in ``path``."""
    tests: tuple[str, ...]


FAULTS = (
    # ---- issue 16's table: each was put in by hand and missed by the suite of the time
    Fault("momentum", "the training step drops SGD's momentum buffer", "orchestrator/step.py",
          (("momentum=0.937, nesterov=True, ", ""),),
          ("tests/test_step.py",)),
    Fault("ema", "the training step drops the EMA copy", "orchestrator/step.py",
          (("ema = EMA(model) if workload.ema else None", "ema = None"),),
          ("tests/test_step.py",)),
    Fault("optimizer-step", "the training step never runs the optimizer step", "orchestrator/step.py",
          (("    if scaler is None:\n        optimizer.step()\n    else:\n        scaler.step(optimizer)\n"
            "        scaler.update()\n    check_stepped(optimizer, scaler, scale, step)\n", ""),),
          ("tests/test_step.py",)),
    Fault("adamw-state", "AdamW's state is dropped (a stateless SGD runs instead)", "orchestrator/step.py",
          (("return torch.optim.AdamW(params, lr=0.001, betas=(0.937, 0.999), weight_decay=0.0005, foreach=True)",
            "return torch.optim.SGD(params, lr=0.001, foreach=True)"),),
          ("tests/test_step.py",)),
    Fault("aim-low", "the decision aims 3.5% low and stops within 4.5%", "orchestrator/decision.py",
          (("TOLERANCE = 0.02\n", "TOLERANCE = 0.045\n"),
           ("predicted = fit.predict_batch(s.budget_bytes) if fit else None",
            "predicted = fit.predict_batch(int(s.budget_bytes * 0.965)) if fit else None")),
          ("tests/test_decision.py", "tests/test_engine.py::test_decision_quality_on_simulated_cards")),
    Fault("aim-low-engine", "the engine aims 3.5% low (readings inflated) and so stops within 3.5-4.5% of the limit",
          "orchestrator/engine.py",
          (("        return seen[batch].reserved_bytes\n",
            "        return int(seen[batch].reserved_bytes / 0.965)\n"),
           ("max_batch=max_batch, prior=prior_of(predicted))",
            "max_batch=max_batch, prior=prior_of(predicted), tolerance=0.01)")),
          ("tests/test_engine.py",)),
    Fault("bracket", "the bracket closes one batch early", "orchestrator/decision.py",
          (("if hi - lo <= max(1, math.floor(tolerance * hi)):", "if hi - lo <= max(1, math.floor(tolerance * hi)) + 1:"),),
          ("tests/test_decision.py", "tests/test_engine.py::test_decision_quality_on_simulated_cards")),
    Fault("lsq-extrapolation", "extrapolation uses the plain least-squares slope, not a line above every probe",
          "orchestrator/answers.py",
          (("slope = max([fit.bytes_per_sample] + [(p - fit.fixed_bytes) / b for b, p in points])",
            "slope = fit.bytes_per_sample"),),
          ("tests/test_lookup.py", "-k", "extrapolat or fraction")),
    Fault("worst-fit", "the allocator model reuses the largest free block (worst fit), not the smallest",
          "orchestrator/allocator.py",
          (("        i = bisect.bisect_left(pool, (size, -1, -1))\n        if i == len(pool):\n            return None\n"
            "        return self._oversize_rule(size, self._by_key[pool[i]])\n",
            "        if not pool or pool[-1][0] < size:\n            return None\n"
            "        return self._oversize_rule(size, self._by_key[pool[-1]])\n"),),
          ("tests/test_allocator.py",)),
    Fault("free-noop", "free() in the allocator model does nothing", "orchestrator/allocator.py",
          (("    def free(self, block: _Block) -> None:\n", "    def free(self, block: _Block) -> None:\n        return\n"),),
          ("tests/test_allocator.py",)),
    # ---- README behaviours with a test of their own since issue 16: each removed
    Fault("devices-cli", "`devices` lists nothing", "orchestrator/cli.py",
          (("p.set_defaults(func=cmd_devices)", "p.set_defaults(func=lambda args: 0)"),),
          ("tests/test_cli.py::test_devices_lists_the_simulated_fleet_by_type",)),
    Fault("write-exit-1", "a failed table write exits 0", "orchestrator/cli.py",
          (('        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)\n        return 1\n',
            '        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)\n        return 0\n'),),
          ("tests/test_cli.py::test_failed_table_write_stops_the_sweep_with_exit_1",)),
    Fault("bf16", "bf16 runs without autocast (as fp32)", "orchestrator/step.py",
          (('AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}', 'AMP_DTYPES = {"fp16": torch.float16}'),),
          ("tests/test_step.py",)),
    Fault("affine-fallback", "a trace that is not affine is synthesized anyway", "orchestrator/simulated.py",
          (("if _synthesize(intercept, slope, b1) == e1 and _synthesize(intercept, slope, b3) == e3:", "if True:"),),
          ("tests/test_simulated.py::test_trace_that_is_not_affine_is_traced_at_every_batch",)),
    # ---- issue 15's trace shortcuts: a wrong output is a wrong allocation, silently
    Fault("shortcut-batch", "an output remembered at one batch is built at that batch for another",
          "orchestrator/fastfake.py", (("size = (batch, *shape[1:]) if shape and shape[0] is None else shape",
                                        "size = (2, *shape[1:]) if shape and shape[0] is None else shape"),),
          ("tests/test_simulated.py::test_trace_shortcuts_change_no_event",)),
    # ---- issue 22: slips that passed the tests covering their code
    Fault("accumulate-frees-grads", "with accumulation, the first iteration's gradients are freed before the second "
          "forward", "orchestrator/step.py",
          (("                inputs = None  # the loader's next batch replaces the last one\n",
            "                optimizer.zero_grad(set_to_none=True)\n"
            "                inputs = None  # the loader's next batch replaces the last one\n"),),
          ("tests/test_step.py",)),
    Fault("small-threshold", "the allocator model's small pool takes requests < 1 MiB, not <= 1 MiB",
          "orchestrator/allocator.py", (("        small = size <= SMALL_SIZE\n", "        small = size < SMALL_SIZE\n"),),
          ("tests/test_allocator.py",)),
    Fault("ddp-peer-buffers", "the real card's measurer under DDP is not given the other ranks' NCCL buffers",
          "orchestrator/cuda.py",
          (("        m = StepMeasurer(device, workload, counters, extra_outside_bytes=other_ranks_bytes(workload, name, "
            "total_bytes))\n", "        m = StepMeasurer(device, workload, counters)\n"),),
          ("tests/test_ddp.py", "-k", "other_ranks or measurer")),
    Fault("val-at-1x", "validation runs at 1 x the batch whatever val_scale says", "orchestrator/step.py",
          (("validate(built, workload, batch * workload.val_scale, device, ema, surrogate)",
            "validate(built, workload, batch, device, ema, surrogate)"),),
          ("tests/test_step.py",)),
    Fault("death-retries", "an actor death is retried at most twice whatever max_attempts allows",
          "orchestrator/scheduler.py",
          (("        return self._lost(device, reason, now, self.max_attempts)\n",
            "        return self._lost(device, reason, now, min(2, self.max_attempts))\n"),),
          ("tests/test_scheduler.py",)),
)

IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", ".whl", "*.csv.lock")


def copy_tree(dest: Path, tests_from: str | None = None) -> Path:
    """The working tree (committed or not) without caches and venvs; ``tests_from``: tests/ as at that commit."""
    shutil.copytree(ROOT, dest, ignore=IGNORE)
    if tests_from:
        shutil.rmtree(dest / "tests")
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def apply(root: Path, fault: Fault) -> None:
    path = root / fault.path
    text = path.read_text()
    for old, new in fault.patches:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"fault {fault.name!r}: the text to replace occurs {count} times in {fault.path} "
                             "(the code changed: update the patch)")
        text = text.replace(old, new)
    path.write_text(text)


def pytest(root: Path, tests, timeout_s: int) -> tuple[int, str, float]:
    """(exit code, output, seconds) of pytest on ``tests`` (paths, node ids, -k ...) in the copy at ``root``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
               PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                           cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        code, out = -1, f"timed out after {timeout_s}s"
    return code, out, time.perf_counter() - t0


def failures(output: str) -> list[str]:
    """The failing tests' names (without the file), from pytest's -rf summary."""
    names = []
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            names.append(line.split(" - ")[0].split(" ", 1)[1].split("::", 1)[-1])
    return names


def grouped(names: list[str]) -> str:
    """``test_x [3 cases], test_y``: parametrized cases of one test counted, not listed."""
    counts = {}
    for n in names:
        base = n.split("[", 1)[0]
        counts[base] = counts.get(base, 0) + 1
    return ", ".join(f"{base} [{k} cases]" if k > 1 else base for base, k in counts.items())


def check_imports_the_copy(root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(root))
    where = subprocess.run([sys.executable, "-c", "import orchestrator; print(orchestrator.__file__)"], cwd=root,
                           env=env, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root)):
        raise SystemExit(f"the copy is not what gets imported ({where}); check PYTHONPATH handling")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="*", help="run the faults whose name contains any of these words")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    p.add_argument("--timeout-s", type=int, default=1200, help="per pytest run (default 1200)")
    p.add_argument("--tests-from", metavar="REV", help="run the tests as they were at this commit")
    p.add_argument("--targets", nargs="+", help="pytest targets to run for every fault instead of its own")
    args = p.parse_args(argv)
    faults = [f for f in FAULTS if not args.only or any(w in f.name for w in args.only)]
    if args.targets:
        faults = [dataclasses.replace(f, tests=tuple(args.targets)) for f in faults]
    if args.list:
        for f in faults:
            print(f"{f.name:<18} {f.why}  [{' '.join(f.tests)}]")
        return 0
    caught = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        clean = copy_tree(Path(tmp) / "clean", args.tests_from)
        check_imports_the_copy(clean)
        for tests in dict.fromkeys(f.tests for f in faults):  # each set of tests passes without a fault
            code, out, seconds = pytest(clean, tests, args.timeout_s)
            print(f"unpatched  {'pass' if code == 0 else 'FAIL'}  {' '.join(tests)}  ({seconds:.0f}s)", flush=True)
            if code != 0:
                print(out[-3000:])
                return 2
        for f in faults:
            root = copy_tree(Path(tmp) / f.name, args.tests_from)
            apply(root, f)
            code, out, seconds = pytest(root, f.tests, args.timeout_s)
            failed = failures(out)
            caught.append(code not in (0, -1) and bool(failed))
            by = ("timed out" if code == -1 else f"{len(failed)} failed: {grouped(failed)}" if failed
                  else "every test passed" if code == 0 else out.strip().splitlines()[-1])
            print(f"{'caught    ' if caught[-1] else 'NOT CAUGHT'}  {f.name:<18} {f.why}\n"
                  f"            {' '.join(f.tests)} ({seconds:.0f}s): {by}", flush=True)
            shutil.rmtree(root)
    print(f"{sum(caught)} of {len(caught)} faults caught")
    return 0 if all(caught) else 1


if __name__ == "__main__":
    sys.exit(main())
