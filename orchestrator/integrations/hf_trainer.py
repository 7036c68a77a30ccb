"""Hugging Face ``Trainer`` with the table's batch size (extra ``hf``).

``table_arguments`` gives ``TrainingArguments``' ``per_device_train_batch_size`` for this
rank's card, and with ``global_batch`` the ``gradient_accumulation_steps`` that reach it:

    args = TrainingArguments("out", bf16=True, **table_arguments(
        "results/llm_batch_table.csv", "hf:qwen2.5-0.5b", 2048, global_batch=64))

With accumulation, a step's gradients stay alive through the next micro-batch's forward:
sweep such jobs with ``nbs`` = the samples per rank per optimizer step (``global_batch /
world_size``), and ``table_arguments`` reads those rows (a table without them raises
``NoAnswer`` naming what is missing).
"""
from __future__ import annotations

import logging
import math
import os

from . import per_rank_batch

log = logging.getLogger(__name__)


def table_arguments(table, model: str, seq_len: int, *, gpu=None, fraction: float | None = None,
                    global_batch: int | None = None, world_size: int | None = None, **fields) -> dict:
    """``{"per_device_train_batch_size": B}`` (and ``"gradient_accumulation_steps": A`` with ``global_batch``) for
    ``model`` at ``seq_len`` on this rank's card (``gpu`` None: the current CUDA device; in a job over several card
    types pass the smallest). ``world_size``: ranks (default ``WORLD_SIZE`` as torchrun/accelerate set it, else 1).
    With ``global_batch``: the fewest accumulation steps A whose micro-batch B (at most the table's answer) gives
    B x A x ranks = ``global_batch`` exactly, if one needs at most twice the fewest steps; else the fewest steps,
    and B x A x ranks just above ``global_batch`` (logged).
    ``fields``: the other workload fields as the table was swept."""
    from ..spec import SpecError  # noqa: PLC0415

    ranks = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise SpecError(f"world_size={world_size!r} must be a positive int: the number of ranks")
    if global_batch is not None:
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < ranks:
            raise SpecError(f"global_batch={global_batch!r} must be an int >= world_size ({ranks}): samples per "
                            "optimizer step over all ranks")
        fields.setdefault("nbs", global_batch // ranks)
    most = per_rank_batch(table, model, seq_len=seq_len, gpu=gpu, fraction=fraction, world_size=ranks, **fields)
    if global_batch is None:
        return {"per_device_train_batch_size": most}
    per_rank = global_batch // ranks
    fewest = math.ceil(per_rank / most)  # accumulation steps at the table's micro-batch
    exact = [n for n in range(fewest, 2 * fewest + 1) if per_rank % n == 0] if global_batch % ranks == 0 else []
    steps = exact[0] if exact else fewest  # an exact global batch for at most twice the steps, else the fewest
    micro = math.ceil(per_rank / steps)
    if micro * steps * ranks != global_batch:
        log.warning("global batch %d: %d ranks x %d samples x %d steps = %d", global_batch, ranks, micro, steps,
                    micro * steps * ranks)
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": steps}
