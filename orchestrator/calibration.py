"""How far a simulated answer can be trusted: the fitted correction and the errors measured against real GPUs.

Pure data, no torch. The numbers come from ``python -m benchmarks.calibration``, which
simulates published real-GPU readings (``benchmarks/data/calibration_points.csv``: the
trainer's ``GPU_mem`` during training, AutoBatch profile rows; each with its source)
exactly as each was run and read. ``cudacost`` adds what CUDA costs beyond the trace
from first principles (cuDNN's contiguous copies, cuBLAS workspaces per handle); what
is still missing is fitted here, once, on the points marked ``fit`` and judged on the
points marked ``holdout``, which no number in this file was fitted to.
"""
from __future__ import annotations

VERSION = "2026-12-07"
"""This calibration (``HISTORY_FACTOR`` and ``EXPECTED_ERROR``): every simulated row records it."""

HISTORY_FACTOR = 1.052
"""Peak reserved bytes a training run's readings show per peak reserved byte of the simulated steps: the
caching allocator over thousands of steps, batches with different numbers of objects and epochs with a
validation between them holds more than two identical steps do (published logs rise 1-8 % after the
first epoch). Fitted on the ``fit`` training readings' steady state (the readings after the first epoch),
so that an answer is safe for the whole run, not only its first epoch."""

# yolo-segment: its one run (L4, yolo11s-seg) reads -5 % with 10 objects per image assumed, +19 % with 40;
# the log's label counts allow both, and segmentation's memory follows the objects closely
# language-model: benchmarks/llm_calibration.py's 7 published peaks (BERT-large on a V100, TinyLlama on an A10G,
# Llama-3.2-3B on an L40S), 0.78-1.20; its low end is the 2022 BERT stack's fp32 softmax under autocast
EXPECTED_ERROR: dict[str, tuple[float, float]] = {"yolo-detect": (-0.12, 0.03), "yolo-segment": (-0.05, 0.19),
                                                  "language-model": (-0.22, 0.20)}
"""Simulated / real - 1, as the (lowest, highest) seen over the calibration's training readings after the
correction, by the kind of workload (``kind_of``); a kind without published readings has none."""


def kind_of(model: str) -> str:
    """The calibration's kind of a model source: ``yolo-detect``, ``yolo-segment``, ..., ``language-model`` or
    ``other``."""
    if model.startswith("hf:"):
        return "language-model"
    if not model.startswith("ultralytics:"):
        return "other"
    stem = model.split(":", 1)[1]
    for suffix, task in (("-seg", "segment"), ("-pose", "pose"), ("-obb", "obb"), ("-cls", "classify")):
        if suffix in stem:
            return f"yolo-{task}"
    return "yolo-detect"


def expected_error(model: str) -> str:
    """The simulated answer's error band for ``model`` as a row records it (``-3%..+5%``), or ``unknown``
    where no published reading of that kind exists."""
    band = EXPECTED_ERROR.get(kind_of(model))
    if band is None:
        return "unknown"
    lo, hi = band
    return f"{lo * 100:+.0f}%..{hi * 100:+.0f}%"
