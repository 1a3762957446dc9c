"""Self-attention used by the model until :mod:`dualobj.attention` provides ``SelfAttention``.

Plain torch: rotary embeddings and one boolean mask for causal / bidirectional / document / prefix attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(
    B: int,
    L: int,
    *,
    causal: bool | torch.Tensor,
    doc_ids: torch.Tensor | None,
    prefix_lengths: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """``[B, L, L]`` bool, True where query ``i`` may attend to key ``j``."""
    i = torch.arange(L, device=device)
    lower = (i[:, None] >= i[None, :]).expand(B, L, L)
    if prefix_lengths is not None:
        p = prefix_lengths.to(device)[:, None, None]
        lower = lower | ((i[None, :, None] < p) & (i[None, None, :] < p))
    c = torch.as_tensor(causal, device=device).reshape(-1).expand(B)[:, None, None]
    allowed = torch.where(c, lower, torch.ones_like(lower))
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return allowed


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x [B, L, H, D]`` (half-split convention)."""
    L, D = x.shape[1], x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention ``[B, L, D] -> [B, L, D]`` with rotary embeddings."""

    def __init__(self, dim: int, heads: int, *, rope: bool = True, rope_theta: float = 10_000.0,
                 backend: str = "auto") -> None:
        super().__init__()
        self.heads, self.rope, self.rope_theta = heads, rope, rope_theta
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, *, causal: bool | torch.Tensor, doc_ids: torch.Tensor | None = None,
                prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        if self.rope:
            q, k = rotate(q, self.rope_theta), rotate(k, self.rope_theta)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        all_causal = causal is True or (isinstance(causal, torch.Tensor) and bool(causal.all()))
        if all_causal and doc_ids is None and prefix_lengths is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif causal is False and doc_ids is None and prefix_lengths is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = attention_mask(B, L, causal=causal, doc_ids=doc_ids, prefix_lengths=prefix_lengths,
                                  device=x.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.out(o.transpose(1, 2).reshape(B, L, D))
