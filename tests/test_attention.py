"""Attention in a fake trace of a CUDA step runs the fused kernels a CUDA card picks, never the seq x seq weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator import cudacost, simulated, spec
from orchestrator.models import Built

SEQ, HEADS, DIM = 256, 4, 32


class Attend(nn.Module):
    """One self-attention layer with attention dropout (the CPU runs its math path, holding the weights)."""

    def __init__(self, masked: bool = False, kv_heads: int = HEADS):
        super().__init__()
        self.q = nn.Linear(HEADS * DIM, HEADS * DIM)
        self.kv = nn.Linear(HEADS * DIM, 2 * kv_heads * DIM)
        self.masked, self.kv_heads = masked, kv_heads

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x).view(b, SEQ, HEADS, DIM).transpose(1, 2)
        k, v = self.kv(x).view(b, SEQ, 2, self.kv_heads, DIM).permute(2, 0, 3, 1, 4)
        mask = torch.ones(SEQ, SEQ, dtype=torch.bool, device=x.device).tril() if self.masked else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1, is_causal=not self.masked,
                                             enable_gqa=self.kv_heads != HEADS)
        return out.transpose(1, 2).reshape(b, SEQ, HEADS * DIM)


def _built(module):
    def inputs(workload, batch, device, dtype):
        return (torch.randn(batch, SEQ, HEADS * DIM, device=device),)
    return Built(module, lambda out, w, b, s: out.float().pow(2).mean(), inputs)


@pytest.mark.parametrize("precision,masked,kv_heads", [("bf16", False, HEADS), ("fp32", False, HEADS),
                                                      ("bf16", True, HEADS), ("bf16", False, 2)])
def test_cuda_trace_never_holds_the_attention_weights(precision, masked, kv_heads):
    w = spec.make(model="torchvision:resnet18", imgsz=32, precision=precision, ema=False, val_scale=0, nbs=1)
    built = _built(Attend(masked, kv_heads))
    batch = 2
    weights = batch * HEADS * SEQ * SEQ * 2  # one bf16 copy of the attention weights
    cpu = simulated.trace(built, w, batch)
    cuda = simulated.trace(built, w, batch, cuda_costs=True)
    assert max(cpu) >= weights  # the CPU's math path materialises them (dropout: no CPU flash kernel)
    workspace = cudacost.cublas_workspace_bytes(w.deterministic)
    handles = sum(1 for e in cuda[:2] if e == workspace)  # held first: one per cuBLAS handle
    assert handles >= 1
    biggest = max(cuda[handles:])
    assert biggest < weights, biggest  # the largest block: a projection, not a seq x seq tensor per head
    assert simulated.tensor_peak(cuda) - handles * workspace < simulated.tensor_peak(cpu) - weights / 2
