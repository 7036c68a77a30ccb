"""The measured training step against arithmetic from the model's own sizes, and the simulated
step's stand-in (the fake grad scaler) against the real one on real tensors (YOLO's loss is not
stood in for: the simulator runs the real one, checked in test_trainer_step).

The fake-vs-real test in test_simulated compares two runs of the *same* step, so it cannot see a
part missing from the step; these tests count what each part must add.
"""
import functools

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from orchestrator import models, simulated
from orchestrator.spec import Workload

MARK = 7 * 11 * 13 * 17 * 19 + 1  # 323324 B: a size no tensor of these steps has (the counts of marks check it)
MODEL, IMGSZ, BATCH = "torchvision:resnet18", 32, 4  # small input: the weights, not the activations, dominate


def _mark(*args, **kwargs):
    """Allocate and free a MARK-byte tensor: a marker in the allocation trace."""
    torch.empty(MARK, dtype=torch.uint8)


def read_marks(events: list[int]) -> tuple[list[int], list[int]]:
    """(live tensor bytes at each marker, peak live bytes between markers); markers themselves not counted."""
    sizes, live, marks, peaks, peak = [], 0, [], [], 0
    for ev in events:
        if ev > 0:
            sizes.append(ev)
            if ev == MARK:
                marks.append(live)
                peaks.append(peak)
                peak = 0
                continue
            live += ev
            peak = max(peak, live)
        elif sizes[-ev - 1] != MARK:
            live -= sizes[-ev - 1]
    return marks, peaks + [peak]


@functools.cache
def built(model: str = MODEL):
    return models.build(Workload(model=model, imgsz=IMGSZ))


def sizes(model: str = MODEL) -> tuple[int, int, int]:
    """(bytes of the weights, bytes of the buffers, number of weight tensors) of the model as built."""
    module = built(model).module
    params = [p for p in module.parameters() if p.requires_grad]
    return (sum(p.numel() * p.element_size() for p in params),
            sum(b.numel() * b.element_size() for b in module.buffers()), len(params))


@functools.cache
def traced(precision: str, optimizer: str, ema: bool, model: str = MODEL, imgsz: int = IMGSZ, batch: int = BATCH,
           forward_marks: bool = False) -> tuple[list[int], list[int], int]:
    """Fake trace of the full step with a marker before every optimizer step (and, with
    ``forward_marks``, before every forward): (live bytes at the markers, peaks between them, tensor peak)."""
    # no accumulation and no validation: two optimizer steps of one iteration each, as the arithmetic counts them
    w = Workload(model=model, imgsz=imgsz, precision=precision, optimizer=optimizer, ema=ema, nbs=1, val_scale=0)
    hooks = [register_optimizer_step_pre_hook(_mark)]
    if forward_marks:
        hooks.append(built(model).module.register_forward_pre_hook(_mark))
    try:
        events = simulated.trace(built(model), w, batch)
    finally:
        for h in hooks:
            h.remove()
    marks, peaks = read_marks(events)
    return marks, peaks, max(peaks)


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_live_bytes_at_each_optimizer_step_are_what_the_weights_say(precision, optimizer, ema):
    """Entering each optimizer step, live = weights + buffers + grads + optimizer state + EMA copy + the loss.

    Grads, optimizer state and the EMA copy are float32 like the weights under AMP too, so the
    count is the same for every precision. State is created inside the first step: none at step 1;
    at step 2 SGD's momentum (1 x weights), AdamW's exp_avg and exp_avg_sq (2 x weights) and a
    float32 step count per weight tensor. The EMA copy is every parameter and buffer.
    """
    weights, buffers, tensors = sizes()
    state = weights if optimizer == "SGD" else 2 * weights + 4 * tensors
    ema_bytes = weights + buffers if ema else 0
    loss = 4  # the float32 scalar loss, alive until after the step
    images = BATCH * 3 * IMGSZ * IMGSZ * 4  # the batch's float images, alive until the next batch replaces them
    base = weights + buffers + weights + ema_bytes + loss + images
    marks, _, _ = traced(precision, optimizer, ema)
    assert marks == [base, base + state], f"{len(marks)} optimizer steps, live bytes {marks}"


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_ema_adds_exactly_one_copy_of_the_weights_and_buffers_to_the_peak(optimizer):
    """The EMA copy lives from before the first forward to the end: it moves the whole curve up by its size."""
    weights, buffers, _ = sizes()
    assert traced("fp16", optimizer, True)[2] - traced("fp16", optimizer, False)[2] == weights + buffers


def test_adamw_peak_exceeds_sgd_by_one_copy_of_the_weights_when_activations_dominate():
    """Where the peak is in the second step's forward/backward (state alive, no step temporaries),
    AdamW's peak is SGD's plus one copy of the weights (2 state tensors instead of 1) and its step counts."""
    weights, _, tensors = sizes()
    sgd = traced("fp32", "SGD", True, imgsz=128, batch=16, forward_marks=True)
    adamw = traced("fp32", "AdamW", True, imgsz=128, batch=16, forward_marks=True)
    # markers: forward 1, step 1, forward 2, step 2; peaks[3] is the second forward/backward
    for marks, peaks, peak in (sgd, adamw):
        assert peaks[3] == peak, "the peak should be in the second forward/backward at this size"
    assert adamw[2] - sgd[2] == weights + 4 * tensors


def test_amp_keeps_less_for_backward_and_bf16_matches_fp16():
    """Autocast keeps conv outputs for backward in 2-byte floats: from the second forward's start to
    its backward's peak, fp16 and bf16 add well under fp32's 0.8 (measured 0.68 here; without autocast
    it is 1.0), and the same as each other to within the grad scaler's scalars (fp16 only)."""
    rise = {}
    for precision in ("fp32", "fp16", "bf16"):
        marks, peaks, _ = traced(precision, "SGD", True, imgsz=128, batch=16, forward_marks=True)
        rise[precision] = peaks[3] - marks[2]
    assert rise["fp16"] < 0.8 * rise["fp32"] and rise["bf16"] < 0.8 * rise["fp32"], rise
    assert abs(rise["fp16"] - rise["bf16"]) <= 512, rise


def _real_peaks(w: Workload, batch: int) -> tuple[int, int]:
    """Tensor peaks of the step on real CPU tensors: (the trainer's own loss and GradScaler, the stand-ins)."""
    b = models.build(w)
    own = simulated.tensor_peak(simulated.trace(b, w, batch, fake=False, surrogate=False))
    stand_in = simulated.tensor_peak(simulated.trace(b, w, batch, fake=False, surrogate=True))
    return own, stand_in


def test_fake_grad_scaler_matches_gradscaler():
    """On real tensors, the fake scaler and torch's GradScaler peak within 2 KiB of each other.

    GradScaler's extra memory is scalars (scale, growth tracker, found_inf and inv_scale per device):
    at most four 512-byte blocks, whatever the model. Measured: 8 B apart, here (a small CNN, fp16) as
    on resnet18 and mobilenet_v3_small (32 px, batch 4).
    """
    own, stand_in = _real_peaks(Workload(model="tiny_models:tiny", imgsz=IMGSZ, precision="fp16"), BATCH)
    print(f"\nGradScaler {own} B, fake scaler {stand_in} B: {stand_in - own:+d} B")
    assert abs(stand_in - own) <= 2048



def test_with_accumulation_the_first_iteration_s_gradients_live_through_the_second_forward():
    """nbs = 2 x batch: the second optimizer step runs two iterations, and the second forward starts with
    the first's gradients alive (the optimizer steps, and zero_grad frees them, only after it): entering
    it, exactly one copy of the weights more is live than entering the first iteration's forward."""
    weights, _, _ = sizes()
    w = Workload(model=MODEL, imgsz=IMGSZ, precision="fp32", optimizer="SGD", ema=False, nbs=2 * BATCH, val_scale=0)
    hook = built().module.register_forward_pre_hook(_mark)
    try:
        marks, _ = read_marks(simulated.trace(built(), w, BATCH))
    finally:
        hook.remove()
    assert len(marks) == 3, f"forwards: step 1, then step 2's two iterations; got {len(marks)}"
    assert marks[2] - marks[1] == weights, marks


def _validation_rise(val_scale: int, batch: int) -> int:
    """Peak live bytes the validation pass adds over what the training left alive (fp32, no EMA, the model's
    own weights; no cap, no allocator: tensor bytes alone)."""
    w = Workload(model="tiny_models:tiny", imgsz=IMGSZ, precision="fp32", ema=False, nbs=1, val_scale=val_scale)
    events = simulated.trace(models.build(w), w, batch)
    peaks = simulated.phase_tensor_peaks(events)
    live_at_mark = simulated.phase_tensor_peaks(events[:events.index(0) + 1])[-1]
    return peaks[1] - live_at_mark


def test_validation_runs_at_val_scale_times_the_batch():
    """Validation at val_scale 2 and batch b is validation at 2b: it adds what val_scale 1 at batch 2b adds,
    nearly twice what val_scale 1 at batch b does."""
    assert _validation_rise(2, 8) == _validation_rise(1, 16)
    assert _validation_rise(2, 8) > 1.8 * _validation_rise(1, 8) > 0
