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


class TinyQuadratic(Tiny):
    """Tiny plus a (batch x batch) buffer per sample pair: a trace that is not affine in batch size."""

    def forward(self, x):
        pairs = x.new_zeros(x.shape[0] ** 2, 4096)  # 16 KiB per pair of samples
        return super().forward(x) + pairs.sum() * 0


def tiny_quadratic():
    return TinyQuadratic()
