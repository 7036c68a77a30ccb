"""One measured training step, as a trainer runs it, and the out-of-memory classifier.

The same code runs on a real device (CUDA, or CPU in tests) and on fake tensors
for the simulated backend; ``surrogate=True`` swaps what fake tensors cannot do
(the grad scaler's ``.item()``) for an equivalent that allocates the same memory;
a loss that indexes by data is run for real by the simulator (``simulated._SplicedLoss``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import ddp
from .models import Built
from .spec import Workload

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
STEPS = 2  # optimizer state is created lazily in the first step; the peak can be in either
RUN_EPOCHS = 2
"""Epochs of ``STEPS`` steps and a validation that model a training run (``train``'s ``epochs``): validation
re-allocates the EMA's weights (half and back), and the second epoch's steps run on the allocator layout
that leaves; its reserved peak is higher than the first's, as real logs show."""


def run_epochs(workload: Workload) -> int:
    """Epochs that model ``workload``'s training run: ``RUN_EPOCHS`` with validation, else 1 (without a
    validation the next epoch repeats the first exactly)."""
    return RUN_EPOCHS if workload.val_scale else 1

# Substrings (lower case) of messages that mean "the device ran out of memory", with where each
# comes from. cuBLAS and cuDNN wrap their status in PyTorch's text: TORCH_CUDABLAS_CHECK gives
# "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", AT_CUDNN_CHECK
# "cuDNN error: CUDNN_STATUS_...".
_OOM_MESSAGES = (
    "out of memory",  # torch.OutOfMemoryError; "CUDA error: out of memory" (cudaErrorMemoryAllocation); HIP, XPU, MPS
    "cublas_status_alloc_failed",  # cuBLAS could not allocate (its handle, its workspace)
    "cublas_status_not_initialized",  # cublasCreate on a full device: the handle's own memory did not fit
    "cudnn_status_alloc_failed",  # cuDNN 8; cuDNN 9 keeps the name as an alias of the next one
    "_allocation_failed",  # cuDNN 9: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED (and _HOST_)
    "defaultcpuallocator: can't allocate memory",
    "not enough memory",  # CPU allocator
)
# cuDNN failures that a failed workspace allocation causes, but that an unsupported shape, layout
# or a library bug causes as well: out of memory only when it depends on the batch (see oom_kind).
_MAYBE_OOM_MESSAGES = (
    "cudnn_status_not_supported",  # also cuDNN 9's CUDNN_STATUS_NOT_SUPPORTED_SHAPE, ...
    "cudnn_status_internal_error",
    "unable to find an engine",  # "GET/FIND was unable to find an engine to execute this computation"
)


def oom_kind(exc: BaseException) -> str | None:
    """``"oom"`` when ``exc`` means the device ran out of memory; ``"maybe"`` for a cuDNN failure that
    out-of-memory causes among other things (the caller tells them apart: the same failure at
    batch 1 with the cache emptied and no allocation failing is an error); None for any other error."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    if not isinstance(exc, RuntimeError):
        return None
    msg = str(exc).lower()
    if any(m in msg for m in _OOM_MESSAGES):
        return "oom"
    if any(m in msg for m in _MAYBE_OOM_MESSAGES):
        return "maybe"
    return None


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` means (or may mean, see ``oom_kind``) that the device ran out of memory."""
    return oom_kind(exc) is not None


class SkippedStep(RuntimeError):
    """An optimizer step of a measured step was skipped: the peak would lack the optimizer's state."""


def check_stepped(optimizer: torch.optim.Optimizer, scaler, scale_before: float | None, step: int) -> None:
    """Raise ``SkippedStep`` unless the optimizer step just taken ran: every parameter with a gradient
    has optimizer state, and the grad scaler (fp16) did not lower its scale, which it does exactly when
    it skips a step for inf/NaN gradients. A skipped first step allocates no state: the peak would be
    low by one (SGD) or two (AdamW) copies of the weights."""
    missing = sum(1 for g in optimizer.param_groups for p in g["params"]
                  if p.grad is not None and not optimizer.state.get(p))
    skipped = scale_before is not None and scaler.get_scale() < scale_before
    if missing or skipped:
        why = "the grad scaler found inf/NaN gradients and skipped it" if skipped else "it created no state"
        raise SkippedStep(
            f"optimizer step {step + 1} of the measured step did not run ({why}; {missing} parameters without "
            "optimizer state): the peak would be too low by the optimizer's state. The model overflows in "
            "float16 on random input at its initial weights: measure it with precision=bf16 or fp32")


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """YOLO's optimizers; ``foreach=True`` as PyTorch picks on CUDA (its temporaries count)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "SGD":
        return torch.optim.SGD(params, lr=0.01, momentum=0.937, nesterov=True, foreach=True)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=0.001, betas=(0.937, 0.999), weight_decay=0.0005, foreach=True)
    raise ValueError(f"optimizer={name!r} must be SGD or AdamW")


class EMA:
    """An exponential moving average of the weights, updated as ultralytics' ModelEMA does.

    Holds a copy of every parameter and buffer (ModelEMA deep-copies the model:
    the same bytes), and updates the floating ones in place with one
    ``torch._foreach_lerp_`` (ultralytics 8.3+ on torch 2.x: no temporaries; older
    releases allocated one temporary per tensor, ``v += (1 - d) * msd[k]``).
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        # keep_vars: the tensors themselves, not detached views (a view allocates nothing, and each
        # detach is one more op for a fake trace to dispatch)
        self.state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        msd = model.state_dict(keep_vars=True)
        pairs = [(v, msd[k]) for k, v in self.state.items() if v.dtype.is_floating_point]
        if pairs:
            torch._foreach_lerp_([v for v, _ in pairs], [m for _, m in pairs], 1 - self.decay)


class _FakeScaler:
    """GradScaler's memory without its host sync: scale the loss, unscale the grads in place."""

    def __init__(self, scale: float = 2.0**16):
        self.scale_value = scale

    def scale(self, loss):
        return loss * self.scale_value

    def step(self, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        found_inf = torch.zeros(1, device=grads[0].device) if grads else None
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale_value)
        del found_inf
        optimizer.step()

    def update(self):
        pass


def _scaler(workload: Workload, device: torch.device, surrogate: bool):
    if workload.precision != "fp16":
        return None
    if surrogate:
        return _FakeScaler()
    # init_scale=1: at the default 2**16 the first steps of a fresh model can overflow and
    # be skipped, and a skipped step allocates no optimizer state: the peak would be too low
    return torch.amp.GradScaler(device.type, init_scale=1.0)


def _flat_temporaries(tensors: list[torch.Tensor], chunks: list[list[int]]) -> None:
    """Allocate and free the flat chunks a coalesced broadcast makes of ``tensors``, at most two alive
    (c10d ``broadcast_coalesced``: a chunk is freed when the one two places later is made)."""
    alive: list[torch.Tensor] = []
    for chunk in chunks:
        if len(alive) >= 2:
            alive.pop(0)
        alive.append(torch.empty(sum(tensors[i].numel() for i in chunk), dtype=tensors[chunk[0]].dtype,
                                 device=tensors[chunk[0]].device))
    alive.clear()


class ReducerSurrogate(nn.Module):
    """DistributedDataParallel's memory on one rank without its communication: what a fake trace runs
    (fake tensors cannot all-reduce), checked against a real gloo DDP step on the CPU (tests/test_ddp.py).

    At construction, the coalesced broadcast of parameters and buffers (temporaries), then the
    reducer's gradient buckets (``ddp.reducer_buckets``: a flat copy of every gradient, alive for the
    whole run) and ``find_unused_parameters``' map of used parameters (int32 each). Each forward
    first broadcasts the buffers (a temporary of their size). Backward copies each gradient into its
    bucket and back after the all-reduce, in place: nothing to allocate there.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        self._buffers_list = list(module.buffers())
        _flat_temporaries(params + self._buffers_list, ddp.broadcast_chunks(_sizes(params + self._buffers_list)))
        with torch.no_grad():
            self.buckets = [torch.empty(sum(params[i].numel() for i in b), dtype=params[b[0]].dtype,
                                        device=params[b[0]].device) for b in ddp.reducer_buckets(_sizes(params))]
            self.used_map = torch.empty(len(params), dtype=torch.int32, device=params[0].device) if params else None

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            _flat_temporaries(self._buffers_list, ddp.broadcast_chunks(_sizes(self._buffers_list)))
        return self.module(*args, **kwargs)


def _sizes(tensors: list[torch.Tensor]) -> list[tuple[object, int]]:
    return [(t.dtype, t.numel() * t.element_size()) for t in tensors]


def data_parallel(model: nn.Module, workload: Workload, device: torch.device, real: bool) -> nn.Module:
    """``model`` as one rank of ``workload.world_size`` trains it: unchanged for 1; otherwise under
    DistributedDataParallel as ultralytics configures it (``find_unused_parameters=True``, PyTorch's
    other defaults: see ``ddp``) on the process group this process has (``real``; RuntimeError without
    one), or its ``ReducerSurrogate`` (a fake trace)."""
    if workload.world_size == 1:
        return model
    if not real:
        return ReducerSurrogate(model)
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"world_size={workload.world_size} runs the step under DistributedDataParallel, which "
                           "needs a process group: call torch.distributed.init_process_group first (the CUDA "
                           "backend makes a one-rank NCCL group itself)")
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def accumulation(workload: Workload, batch: int) -> int:
    """Optimizer steps come every ``round(nbs / batch)`` iterations, as ultralytics' trainer does."""
    return max(round(workload.nbs / batch), 1)


def train(built: Built, workload: Workload, batch: int, device: torch.device, *, surrogate: bool = False,
          steps: int = STEPS, after_step: Callable[[int], bool | None] | None = None,
          accumulate: int | None = None, mark: Callable[[], None] | None = None,
          real_ddp: bool | None = None, epochs: int = 1) -> int:
    """Run ``steps`` optimizer steps at ``batch`` on ``device``, then the validation pass; the caller reads
    the peak. Returns the steps run.

    Mirrors ultralytics' trainer, in the order it allocates (the caching allocator's
    layout, hence peak reserved, depends on it). Each iteration's inputs arrive as the
    family's loader delivers them (``Built.inputs``: YOLO's uint8 images become
    ``float() / 255`` on the device), and stay alive until the next batch replaces
    them (the last one through validation);
    forward and loss under autocast, backward (scaled for fp16). The first step runs
    one iteration and creates the optimizer's state lazily, as a trainer's first step
    (warm-up: no accumulation yet) does; when gradients accumulate (``accumulate``,
    default ``accumulation(workload, batch)``), later steps run two iterations, so that
    a forward runs with the state and the last iteration's gradients alive. Then the
    optimizer step (``check_stepped``: a skipped step raises ``SkippedStep``),
    ``zero_grad(set_to_none=True)`` and the EMA update.
    ``after_step(i)`` runs after step ``i`` and may return True to stop early. With
    ``workload.val_scale``, the cache is emptied as the trainer does, ``mark()`` (the
    phase boundary a caller may record) and ``validate`` follow, with the training
    state alive. ``epochs`` > 1 repeats steps and validation as the next epochs do, the cache
    emptied and ``mark()`` called between them (the phases alternate: training, validation, ...).

    With ``workload.world_size`` > 1 the model is wrapped in DistributedDataParallel first (as
    ultralytics does, before the optimizer and the EMA; see ``data_parallel``): the real one when
    ``real_ddp`` (default: not ``surrogate``), needing a process group, else its ``ReducerSurrogate``.
    The EMA and validation use the unwrapped model, as the trainer's do.
    """
    model = built.module.train()
    model.zero_grad(set_to_none=True)  # a previous probe that ran out of memory can leave grads behind
    wrapped = data_parallel(model, workload, device, not surrogate if real_ddp is None else real_ddp)
    optimizer = make_optimizer(workload.optimizer, model)
    ema = EMA(model) if workload.ema else None
    scaler = _scaler(workload, device, surrogate)
    dtype = AMP_DTYPES.get(workload.precision)
    iterations = min(accumulation(workload, batch) if accumulate is None else accumulate, 2)
    inputs = loss = None
    done, stopped = 0, False
    for epoch in range(epochs):
        if stopped:
            break
        if epoch:  # the trainer empties the cache at every epoch end (ultralytics: above 50 % reserved)
            _new_phase(device, mark)
        first = done
        while done - first < steps:
            for _ in range(iterations if done else 1):
                inputs = None  # the loader's next batch replaces the last one
                inputs = built.inputs(workload, batch, device, torch.float32)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    outputs = wrapped(*inputs)
                    loss = built.loss(outputs, workload, batch, surrogate)
                del outputs
                (loss if scaler is None else scaler.scale(loss)).backward()  # the loss stays alive (the
            _optimizer_step(model, optimizer, scaler, ema, done)             # trainer's self.loss) until the next
            done += 1
            if after_step is not None and after_step(done - 1):
                stopped = True
                break
        if workload.val_scale:
            # ultralytics empties the cache before validating when more than half the card is reserved
            # ("prevent VRAM spike"), which near the answer it always is; mark() tells the tracer so
            _new_phase(device, mark)
            validate(built, workload, batch * workload.val_scale, device, ema, surrogate)
    del optimizer, ema, scaler, inputs, loss, wrapped
    return done


def _new_phase(device: torch.device, mark: Callable[[], None] | None) -> None:
    """The trainer empties the cache (a phase boundary: ``mark()`` tells a caller recording phases)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if mark is not None:
        mark()


def _optimizer_step(model: nn.Module, optimizer, scaler, ema: "EMA | None", step: int) -> None:
    """The trainer's optimizer_step: (unscale and) step, checked (``check_stepped``), zero_grad(set_to_none=True),
    EMA update."""
    scale = scaler.get_scale() if isinstance(scaler, torch.amp.GradScaler) else None
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    check_stepped(optimizer, scaler, scale, step)
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)


@torch.no_grad()
def validate(built: Built, workload: Workload, batch: int, device: torch.device, ema: EMA | None,
             surrogate: bool = False) -> None:
    """The validation pass a trainer runs every epoch: the EMA weights (the model's own without EMA) in eval
    mode, no grad, at ``batch``, half precision when training with AMP (ultralytics converts the EMA model
    to half and back), forward and the loss. The training model and optimizer state stay where they are."""
    model = built.module
    half = workload.precision in AMP_DTYPES
    dtype = torch.float16 if half else torch.float32
    if ema is not None and half:  # model.half(): each float tensor replaced by a half one
        ema.state = {k: v.half() if v.is_floating_point() else v for k, v in ema.state.items()}
    model.eval()
    try:
        inputs = built.inputs(workload, batch, device, dtype)
        if ema is None:
            outputs = model(*inputs)
        else:
            outputs = torch.func.functional_call(model, ema.state, inputs)
        del inputs
        loss = built.loss(outputs, workload, batch, surrogate)
        del outputs, loss
    finally:
        model.train()
        if ema is not None and half:  # model.float() after validation
            ema.state = {k: v.float() if v.is_floating_point() else v for k, v in ema.state.items()}
