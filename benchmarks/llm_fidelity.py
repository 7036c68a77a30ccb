"""Language models' simulated step against a real CPU run of the same step (issue 24), tensor by tensor.

For each (model, seq_len, batch, precision, lever) the step (``step.train``: token ids and labels, the
model's own loss, AdamW) runs twice on the CPU: on fake tensors built from the ``meta`` device, as the
simulator runs it (with the CPU's attention kernel: the CUDA kernels are added on top, see
``orchestrator/attention.py``), and on real tensors with real random weights. The table gives both tensor
peaks and the simulated error in percent. Real runs are the slow part.

    python -m benchmarks.llm_fidelity            # GPT-2 small: seq 128/512 x batch 1/4 x fp32/bf16 x levers; Qwen2.5-0.5B
    python -m benchmarks.llm_fidelity --quick    # GPT-2 small at seq 128, batch 1 and 4
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from orchestrator import models, simulated, spec
from orchestrator.units import MiB

from . import report

LEVERS = {"full": {}, "checkpointing": {"checkpointing": True}, "lora 8": {"lora_rank": 8}}
COLUMNS = ["model", "seq_len", "batch", "precision", "lever", "simulated_mib", "real_mib", "error_pct", "seconds"]


def grid(quick: bool) -> list[tuple]:
    if quick:
        return [("hf:gpt2", 128, b, "fp32", "full") for b in (1, 4)]
    gpt2 = list(itertools.product(["hf:gpt2"], [128, 512], [1, 4], ["fp32", "bf16"], LEVERS))
    qwen = [("hf:qwen2.5-0.5b", 128, 1, p, lever) for p in ("fp32", "bf16") for lever in ("full", "lora 8")]
    return gpt2 + qwen


def compare(model: str, seq_len: int, batch: int, precision: str, lever: str) -> dict:
    t0 = time.perf_counter()
    w = spec.make(model=model, seq_len=seq_len, precision=precision, **LEVERS[lever])
    built = models.build(w)
    sim = simulated.tensor_peak(simulated.trace(built, w, batch))
    real = simulated.tensor_peak(simulated.trace(built, w, batch, fake=False, surrogate=True))
    return {"model": model, "seq_len": seq_len, "batch": batch, "precision": precision, "lever": lever,
            "simulated_mib": round(sim / MiB, 1), "real_mib": round(real / MiB, 1),
            "error_pct": round((sim / real - 1) * 100, 2), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="GPT-2 small at seq 128, batch 1 and 4, fp32")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    report.setup_logging()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = []
    for case in grid(args.quick):
        rows.append(compare(*case))
        print(report.markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    worst = max(abs(r["error_pct"]) for r in rows)
    command = "python -m benchmarks.llm_fidelity" + (" --quick" if args.quick else "")
    text = "\n".join([
        "# Language models: the simulated step's tensor peak against a real CPU run", "",
        f"Run {report.now()} on {report.machine()}; orchestrator {report.revision()}. Command: `{command}`. "
        f"Random weights; AdamW; bf16 = autocast. Largest error: {worst:.2f}% over {len(rows)} configurations.", "",
        report.markdown_table(rows, COLUMNS)])
    stem = "llm_fidelity_quick" if args.quick else "llm_fidelity"
    for path in (report.write_markdown(args.out / f"{stem}.md", text),
                 report.write_csv(args.out / f"{stem}.csv", rows, COLUMNS)):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
