"""Language models' memory levers on simulated cards (issue 24): the largest micro-batch with each lever.

For each model and card: full fine-tuning (AdamW, bf16 autocast, sdpa attention as a CUDA card runs it),
then gradient checkpointing, LoRA (rank 16, every linear layer), both, LoRA on bfloat16 base weights,
bfloat16 weights and optimizer state, and eager attention (the attention weights kept), at fraction 0.9. Simulated answers: no real GPU checked them.

    python -m benchmarks.llm_levers                   # qwen2.5-0.5b, llama-3.2-1b, llama-3.1-8b at 2048 tokens
    python -m benchmarks.llm_levers --quick           # gpt2 at 512 tokens on L4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from orchestrator import spec
from orchestrator.engine import autobatch

from . import report

MODELS = [("hf:qwen2.5-0.5b", 2048), ("hf:llama-3.2-1b", 2048), ("hf:llama-3.1-8b", 2048)]
CARDS = ["L4", "A100-80GB"]
LEVERS = {"full": {}, "checkpointing": {"checkpointing": True}, "lora 16": {"lora_rank": 16},
          "lora 16 + checkpointing": {"lora_rank": 16, "checkpointing": True},
          "bf16 weights + lora 16": {"precision": "bf16-pure", "lora_rank": 16},
          "bf16 weights": {"precision": "bf16-pure"}, "eager attention": {"attention": "eager"}}
COLUMNS = ["model", "seq_len", "lever", *CARDS, "seconds"]


def run(models, cards, fraction: float = 0.9) -> list[dict]:
    rows = []
    for model, seq_len in models:
        for lever, fields in LEVERS.items():
            w = spec.make(model=model, seq_len=seq_len, **fields)
            t0 = time.perf_counter()
            row = {"model": model, "seq_len": seq_len, "lever": lever}
            for card in cards:
                d = autobatch(w, fraction=fraction, gpu=card).decision
                row[card] = d.batch_size if d.status == "ok" else d.status
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(report.markdown_table([row], ["model", "seq_len", "lever", *cards, "seconds"]).splitlines()[-1],
                  flush=True)
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
    columns = ["model", "seq_len", "lever", *cards, "seconds"]
    text = "\n".join([
        "# Language models: the largest micro-batch with each memory lever (simulated)", "",
        f"Run {report.now()} on {report.machine()}; orchestrator {report.revision()}. Command: `{command}`. "
        "Fraction 0.9; bf16 autocast (fp32 weights), AdamW, full fine-tuning unless the lever says otherwise "
        "(`bf16 weights`: `precision = \"bf16-pure\"`, the model built in bfloat16, no autocast); attention as a "
        "CUDA card runs sdpa (flash / memory-efficient) except `eager attention`. LoRA: rank 16, alpha 32, every "
        "linear layer but the output head (peft's `all-linear`). No real GPU has checked these answers.", "",
        report.markdown_table(rows, columns)])
    stem = "llm_levers_quick" if args.quick else "llm_levers"
    for path in (report.write_markdown(args.out / f"{stem}.md", text),
                 report.write_csv(args.out / f"{stem}.csv", rows, columns)):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
