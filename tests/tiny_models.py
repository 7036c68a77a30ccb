"""Small user models for tests, importable by Ray workers (tests/ is on PYTHONPATH)."""
import os
import signal
import time

import torch
from torch import nn


class Tiny(nn.Module):
    """A small CNN classifier: cheap to trace, still conv + BN + optimizer state."""

    def __init__(self, fail_at: int | None = None, crash: bool = False, sleep_s: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        self.fail_at, self.crash, self.sleep_s = fail_at, crash, sleep_s

    def forward(self, x):
        if self.crash:
            os.kill(os.getpid(), signal.SIGKILL)  # takes its Ray actor down, every time
        if self.fail_at is not None and x.shape[-1] == self.fail_at:
            raise ValueError(f"Tiny does not support {self.fail_at} px")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.body(x)


def tiny():
    return Tiny()


def tiny_wide():
    """Tiny with a 3 MiB head: its gradients fill more than one DDP bucket (the first closes at 1 MiB)."""
    model = Tiny()
    model.body[-1] = nn.Sequential(nn.Linear(32, 8192), nn.ReLU(), nn.Linear(8192, 64))
    return model


def tiny_fails_at_96():
    return Tiny(fail_at=96)


def tiny_crashes():
    return Tiny(crash=True)


def tiny_slow():
    return Tiny(sleep_s=0.25)


def tiny_slower():
    return Tiny(sleep_s=1.0)


def tiny_hangs():
    return Tiny(sleep_s=120.0)


def not_a_module():
    return "model"


def factory_raises():
    raise RuntimeError("weights file missing")


# -- models that raise what a CUDA device would, for the CUDA path's tests on the CPU

ALLOCATOR_OOMS = [0]
"""Failed allocations that code inside a step caught (a fake of the caching allocator's ``num_ooms``)."""
POISONED = []
"""Set once a model has raised a sticky CUDA error in this process: every later forward fails too."""
SEEN_SETTINGS = []
"""What ``tiny_records_settings`` saw in each forward."""

ILLEGAL_ADDRESS = ("CUDA error: an illegal memory access was encountered\n"
                   "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
                   "below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
                   "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
CUDNN_NOT_SUPPORTED = "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."


class CudaLike(Tiny):
    """Tiny, with one behaviour of a CUDA device or of code running on one (see the factories below)."""

    def __init__(self, behaviour: str, at: int = 0):
        super().__init__()
        self.behaviour, self.at = behaviour, at

    def forward(self, x):
        b, training = x.shape[0], self.training
        if POISONED:
            raise torch.AcceleratorError(ILLEGAL_ADDRESS)
        if self.behaviour == "illegal_address":
            POISONED.append(True)
            raise torch.AcceleratorError(ILLEGAL_ADDRESS)
        if self.behaviour == "oom_above" and b > self.at:  # training or validation (at 2 x batch)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 14.74 GiB of which 1.02 GiB is free.")
        if self.behaviour == "swallows_oom" and training and b >= self.at:
            ALLOCATOR_OOMS[0] += 1  # the allocator failed, the caller caught it and fell back (YOLO's assigner)
        if self.behaviour == "cudnn_not_supported" and b >= self.at:
            raise RuntimeError(CUDNN_NOT_SUPPORTED)
        if self.behaviour == "records":
            SEEN_SETTINGS.append({"deterministic": torch.are_deterministic_algorithms_enabled(),
                                  "cudnn_deterministic": torch.backends.cudnn.deterministic,
                                  "cudnn_benchmark": torch.backends.cudnn.benchmark,
                                  "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")})
        out = super().forward(x)
        if self.behaviour == "overflows_fp16":
            out = out * 1e6  # float16 overflows to inf: the grad scaler skips the step
        return out


def tiny_illegal_address():
    return CudaLike("illegal_address")


def tiny_oom_above_12():
    return CudaLike("oom_above", 12)


def tiny_swallows_oom_from_8():
    return CudaLike("swallows_oom", 8)


def tiny_cudnn_not_supported():
    return CudaLike("cudnn_not_supported", 1)


def tiny_cudnn_not_supported_from_8():
    return CudaLike("cudnn_not_supported", 8)


def tiny_overflows_fp16():
    return CudaLike("overflows_fp16")


def tiny_records_settings():
    return CudaLike("records")


class TinyQuadratic(Tiny):
    """Tiny plus a (batch x batch) buffer per sample pair: a trace that is not affine in batch size."""

    def forward(self, x):
        pairs = x.new_zeros(x.shape[0] ** 2, 4096)  # 16 KiB per pair of samples
        return super().forward(x) + pairs.sum() * 0


def tiny_quadratic():
    return TinyQuadratic()
