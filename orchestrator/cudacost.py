"""What a CUDA device spends on a training step that a trace on the CPU cannot show.

A fake-tensor trace records every tensor a step creates; the simulator replays those
through the caching allocator model. On a real card some memory is taken *inside*
operators and through the same caching allocator, so it raises ``memory_reserved()``
(and the peak) without ever being a tensor of the step. Each effect modelled here,
with where it comes from:

- **Contiguous copies for cuDNN** (``transients``). ``at::native::_convolution`` hands
  cuDNN ``input.contiguous(backend_memory_format)``, and ``convolution_backward`` does the
  same for the saved input and (inside ``cudnn_convolution_backward``) for
  ``grad_output`` (aten/src/ATen/native/Convolution.cpp, cudnn/ConvShared.cpp). A
  convolution fed by a ``chunk``/``split`` view (ultralytics' C2f and C3k2 blocks) or
  receiving the gradient of a ``cat`` (a ``narrow`` of it) therefore allocates a copy of
  that tensor for the kernel's duration. The CPU kernels do the same below the dispatcher
  (so a real CPU run shows nothing either); on CUDA each copy is a caching-allocator block.
- **cuDNN workspaces** are *not* modelled. PyTorch allocates each convolution's
  workspace through the caching allocator for the call's duration (cudnn/Conv_v8.cpp,
  ``try_plans``), but its size depends on the engine cuDNN's heuristics pick on the card.
  Modelled as a fraction of the bytes a kernel reads and writes (the form of
  layout-transforming tensor-core kernels), fractions from 0 to 1 moved the simulated
  peaks of the calibration points by at most 3 % and mostly under 1 %: transient blocks
  fit into the cache that the step's own frees leave, except at the very peak. So no
  fraction could be fitted from published readings; ``benchmarks/calibrate_cuda.py`` on
  a real card is what will measure it.
- **cuBLAS workspaces** (``cublas_workspace_bytes``). One workspace per (handle,
  stream), allocated through the caching allocator at a handle's first use and kept
  (aten/src/ATen/cuda/CublasHandlePool.cpp, ``getNewWorkspace``). Its size:
  ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE:COUNT`` pairs, SIZE in KiB; ultralytics'
  ``deterministic=True`` sets ``:4096:8``: 32 MiB since torch 2.1 multiplies by COUNT,
  4 MiB before), else the default: 4096 KiB x 2 + 16 KiB x 8 (8.125 MiB), 32 MiB on
  Hopper (sm90). A training step uses two handles: the forward's thread and the
  autograd engine's device thread, which runs the backward's matmuls (YOLO's DFL
  decode, attention blocks); so two workspaces.

What is left after these (the allocator's history over many steps and epochs, varying
objects per batch, kernels this model does not know) is one fitted factor on the
simulated peak (``over_a_run``, ``calibration.HISTORY_FACTOR``): see ``calibration``.
"""
from __future__ import annotations

import torch

from . import calibration
from .units import KiB, MiB


_CONV = torch.ops.aten.convolution.default
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _copy(t) -> int:
    """The bytes ``t.contiguous()`` allocates (0 when it is contiguous already)."""
    return 0 if not isinstance(t, torch.Tensor) or t.is_contiguous() else _bytes(t)


CUBLAS_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "mm", "bmm", "addmm", "baddbmm", "addmv", "mv", "dot", "addbmm"))
"""Ops whose CUDA kernels are cuBLAS calls (``at::cuda::blas``): a handle's first one allocates its workspace."""


def transients(func, args) -> list[int]:
    """Sizes of the blocks a CUDA kernel for ``func`` allocates and frees inside the call (all alive at
    once), beyond the op's own outputs: cuDNN's contiguous copies of its inputs; [] for other ops."""
    if func is _CONV:
        sizes = [_copy(args[0])]
    elif func is _CONV_BACKWARD:
        sizes = [_copy(args[1]), _copy(args[0])]  # the saved input, then grad_output
    else:
        return []
    return [s for s in sizes if s > 0]


def _version(text: str) -> tuple[int, int]:
    parts = (text or "0.0").split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


def cublas_workspace_bytes(deterministic: bool, torch_version: str = torch.__version__,
                           capability: str = "8.0") -> int:
    """One cuBLAS handle's workspace (CublasHandlePool.cpp's parse of ``CUBLAS_WORKSPACE_CONFIG``):
    ``:4096:8`` under ultralytics' ``deterministic=True`` (32 MiB; 4 MiB before torch 2.1, which
    did not multiply by the count), else PyTorch's default, 32 MiB on Hopper (sm90)."""
    if deterministic:
        return 4096 * KiB * (8 if _version(torch_version) >= (2, 1) else 1)
    if _version(capability) == (9, 0):
        return 32 * MiB
    return 4096 * KiB * 2 + 16 * KiB * 8


def cublas_context() -> str:
    """Which cuBLAS handle a matmul dispatched now would use: the autograd engine's device thread runs
    the backward (its own handle, so its own workspace), the calling thread everything else."""
    return "backward" if torch._C._current_autograd_node() is not None else "forward"


def over_a_run(reserved: int) -> int:
    """The reserved bytes a training run's readings show for ``reserved`` in the simulated steps
    (``calibration.HISTORY_FACTOR``)."""
    return -(-int(reserved * calibration.HISTORY_FACTOR * 1024) // 1024)
