"""Scaled dot-product attention as a CUDA card runs it, for fake traces of a CUDA step.

``F.scaled_dot_product_attention`` picks a kernel by device: on the CPU (and so in a
fake trace on the CPU) a math or CPU-flash path that can hold the ``seq x seq`` attention
weights, dropout masks included; on a CUDA card a fused kernel that never materialises
them (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, ``select_sdp_backend``):
FlashAttention for fp16/bf16 inputs without an explicit mask (head dim <= 256, sm80 and
later; grouped-query heads as they are), else memory-efficient attention (fp32 inputs, or
a mask, which becomes its additive bias), and the math kernel for grouped-query heads
that flash cannot take. Inside ``CudaAttention`` the call runs those kernels' own ops
(``_scaled_dot_product_flash_attention`` / ``_efficient_attention`` and their backward
ops), whose fake implementations allocate what the CUDA kernels return: the output and
its log-sum-exp (fp32, ``batch x heads x seq``), saved for a backward that returns the
three input gradients.

Simplification: one trace serves every card, so cards before sm80 (T4, V100), which run
memory-efficient attention where a later card runs flash, are traced with flash; both
keep O(seq) memory per head, and their saved tensors differ by a log-sum-exp padded to
32 rows. The CPU path (``trace(cuda_costs=False)``, what a real CPU run checks) is unchanged.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention
_HALF = (torch.float16, torch.bfloat16)


class CudaAttention(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to the fused kernel a CUDA card would run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return attention(*args, **kwargs)
        return func(*args, **kwargs)


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint``: the recomputation in the backward, which runs outside
    the forward's function modes, runs attention as the forward did (``CudaAttention`` when it was active)."""
    from torch.overrides import _get_current_function_mode_stack

    active = any(isinstance(m, CudaAttention) for m in _get_current_function_mode_stack())
    return contextlib.nullcontext(), (CudaAttention() if active else contextlib.nullcontext())


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False) -> torch.Tensor:
    if torch.is_autocast_enabled(query.device.type) and query.dtype == torch.float32:  # sdpa runs in half
        half = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(half), key.to(half), value.to(half)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    if attn_mask is None and query.dtype in _HALF and query.shape[-1] <= 256:  # flash: grouped heads as they are
        return _Flash.apply(query, key, value, float(dropout_p), bool(is_causal), scale)
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention without flash: CUDA runs the math kernel
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)  # (called inside the mode's handler: not routed again)
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:  # sdpa turns a boolean mask into an additive bias
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=bias.device).masked_fill(~bias, -math.inf)
    elif bias is not None and bias.dtype != query.dtype:
        bias = bias.to(query.dtype)
    return _Efficient.apply(query, key, value, bias, float(dropout_p), bool(is_causal), scale)


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dropout_p, is_causal, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset)
        ctx.args = (cum_q, cum_k, max_q, max_k, dropout_p, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, seed, offset = ctx.saved_tensors
        cum_q, cum_k, max_q, max_k, dropout_p, is_causal, scale = ctx.args
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset,
            scale=scale)
        return dq, dk, dv, None, None, None


class _Efficient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, dropout_p, is_causal, scale):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, dropout_p, is_causal, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse, seed, offset)
        ctx.args = (dropout_p, is_causal, scale, bias is not None and bias.requires_grad)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, out, lse, seed, offset = ctx.saved_tensors
        dropout_p, is_causal, scale, bias_grad = ctx.args
        dq, dk, dv, dbias = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad.contiguous(), q, k, v, bias, out, lse, seed, offset, dropout_p, (True, True, True, bias_grad),
            is_causal, scale=scale)
        return dq, dk, dv, dbias if bias_grad else None, None, None, None
