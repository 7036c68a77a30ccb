"""What each language-model lever does to the answer (issue 24), on simulated cards.

Llama 3.2 1B shape at 512, 2048 and 8192 tokens on L4, A10G, A100-80GB and H100-80GB: the largest
micro-batch at fraction 0.9 for full fine-tuning (AdamW, bf16 autocast over fp32 weights, sdpa attention
as a CUDA card runs it), gradient checkpointing, LoRA (rank 16, every linear layer but the head), both,
LoRA on bfloat16 base weights (``bf16-pure``: a model loaded in bfloat16), and eager attention (the
attention weights kept). Each workload is traced once and replayed on every card. Simulated answers: no
real GPU checked them.

    python -m benchmarks.llm_levers            # the grid above
    python -m benchmarks.llm_levers --quick    # gpt2 at 512 tokens on L4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from orchestrator import simulated, spec
from orchestrator.engine import decide_on
from orchestrator.simdevice import SimulatedBackend

from . import report

MODELS = [("hf:llama-3.2-1b", 512), ("hf:llama-3.2-1b", 2048), ("hf:llama-3.2-1b", 8192)]
CARDS = ["L4", "A10G", "A100-80GB", "H100-80GB"]
LEVERS = {"full": {}, "checkpointing": {"checkpointing": True}, "lora 16": {"lora_rank": 16},
          "lora 16 + checkpointing": {"lora_rank": 16, "checkpointing": True},
          "lora 16, bf16 weights": {"precision": "bf16-pure", "lora_rank": 16},
          "lora 16, bf16 weights + checkpointing": {"precision": "bf16-pure", "lora_rank": 16, "checkpointing": True},
          "eager attention": {"attention": "eager"}}
FRACTION = 0.9


def run(models, cards) -> list[dict]:
    rows = []
    for model, seq_len in models:
        for lever, fields in LEVERS.items():
            w = spec.make(model=model, seq_len=seq_len, **fields)
            t0 = time.perf_counter()
            prof = simulated.profile(w)
            traced = time.perf_counter() - t0
            row = {"model": model, "seq_len": seq_len, "lever": lever}
            for card in cards:
                backend = SimulatedBackend(card)
                backend.add_profile(prof)
                d = decide_on(backend, w, FRACTION).decision
                row[card] = d.batch_size if d.status == "ok" else d.status
            row.update(trace_s=round(traced, 1), total_s=round(time.perf_counter() - t0, 1))
            rows.append(row)
            print(report.markdown_table([row], list(row)).splitlines()[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="gpt2 at 512 tokens on L4")
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    report.setup_logging()
    models, cards = ([("hf:gpt2", 512)], ["L4"]) if args.quick else (MODELS, CARDS)
    rows = run(models, cards)
    command = "python -m benchmarks.llm_levers" + (" --quick" if args.quick else "")
    columns = ["model", "seq_len", "lever", *cards, "trace_s", "total_s"]
    text = "\n".join([
        "# Language models: the largest micro-batch with each memory lever (simulated)", "",
        f"Run {report.now()} on {report.machine()}; orchestrator {report.revision()}. Command: `{command}`. "
        f"Fraction {FRACTION}; AdamW; bf16 autocast over fp32 weights unless `bf16 weights` (`precision = "
        "\"bf16-pure\"`: the model built in bfloat16, its gradients and AdamW state too, no autocast); full "
        "fine-tuning unless LoRA (rank 16, alpha 32, every linear layer but the output head: peft's "
        "`all-linear`); attention as a CUDA card runs sdpa (flash) unless `eager attention`. `trace_s`: the "
        "profile (card-independent traces); `total_s`: with the searches on every card. No real GPU has checked "
        "these answers.", "",
        report.markdown_table(rows, columns)])
    stem = "llm_levers_quick" if args.quick else "llm_levers"
    for path in (report.write_markdown(args.out / f"{stem}.md", text),
                 report.write_csv(args.out / f"{stem}.csv", rows, columns)):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
