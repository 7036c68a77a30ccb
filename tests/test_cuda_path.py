"""The CUDA path without a GPU (issue 12): the out-of-memory classifier on the exact texts PyTorch,
cuBLAS and cuDNN raise; the optimizer-state check after each optimizer step."""
import pytest
import torch

import tiny_models
from orchestrator import models, step
from orchestrator.spec import Workload

CPU = torch.device("cpu")


# -- item 1: a skipped optimizer step is loud


def test_every_optimizer_step_of_a_probe_leaves_optimizer_state():
    """The check runs after each optimizer step: with SGD and AdamW every parameter with a gradient has
    state (a probe that gets through ``step.train`` had all of its steps)."""
    for optimizer in ("SGD", "AdamW"):
        w = Workload(model="tiny_models:tiny", imgsz=32, precision="fp16", optimizer=optimizer, nbs=1)
        built = models.build(w)
        assert step.train(built, w, 2, CPU) == step.STEPS
        opt = step.make_optimizer(optimizer, built.module)
        for p in built.module.parameters():
            p.grad = torch.ones_like(p)
        with pytest.raises(step.SkippedStep, match="it created no state"):
            step.check_stepped(opt, None, None, 0)


# -- item 4: the out-of-memory classifier, on the texts PyTorch, cuBLAS and cuDNN raise

OOM = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.74 GiB"),
    torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul( ltHandle, ...)`"),
    RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),  # cuDNN 8
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),  # cuDNN 9
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
]
MAYBE = [
    RuntimeError(tiny_models.CUDNN_NOT_SUPPORTED),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED_SHAPE"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    RuntimeError("GET was unable to find an engine to execute this computation"),
    RuntimeError("FIND was unable to find an engine to execute this computation"),
]
NOT_OOM = [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x10 and 12x4)"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"),
    torch.AcceleratorError(tiny_models.ILLEGAL_ADDRESS),
    ValueError("out of memory"),
]


@pytest.mark.parametrize("exc", OOM, ids=lambda e: str(e)[:48])
def test_out_of_memory_texts(exc):
    assert step.oom_kind(exc) == "oom"


@pytest.mark.parametrize("exc", MAYBE, ids=lambda e: str(e)[:48])
def test_cudnn_failures_that_may_be_memory(exc):
    assert step.oom_kind(exc) == "maybe" and step.is_oom(exc)


@pytest.mark.parametrize("exc", NOT_OOM, ids=lambda e: str(e)[:48])
def test_other_errors_are_errors(exc):
    assert step.oom_kind(exc) is None
