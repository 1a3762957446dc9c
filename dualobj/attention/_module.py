"""Multi-head self-attention as an ``nn.Module`` on top of :func:`dualobj.attention.attention`."""

from __future__ import annotations

import torch
from torch import nn

from dualobj._errors import check_tensor, describe, fail
from dualobj.attention._api import attention
from dualobj.attention._backends import Backend
from dualobj.attention._rope import apply_rope, rope_frequencies
from dualobj.attention._spec import document_positions


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary embeddings, switchable between causal and bidirectional.

    One bias-free ``Linear(dim, 3·dim)`` makes q, k, v (split without a transpose into ``[B, T, H, D]``), RoPE
    rotates q and k, :func:`~dualobj.attention.attention` mixes, and a bias-free ``Linear(dim, dim)`` projects
    back. With ``doc_ids``, rotary positions restart at 0 in every packed document, so a document reads the same
    whether it was packed first or later in a row; without them positions are ``0 .. T-1``.

    Args:
        dim: model width; a multiple of ``heads``.
        heads: number of attention heads; the head dimension ``dim // heads`` must be even when ``rope``.
        rope: apply rotary position embeddings to q and k.
        backend: passed to :func:`~dualobj.attention.attention`.
        rope_base: the RoPE base θ.
    """

    def __init__(
        self, dim: int, heads: int, *, rope: bool = True, backend: str | Backend = "auto", rope_base: float = 10000.0
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise fail(name, "a positive int", describe(value))
        if dim % heads:
            raise fail("dim", f"a multiple of heads={heads}", dim)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        if rope and self.head_dim % 2:
            raise fail("dim // heads", "an even head dimension for rope=True", self.head_dim)
        self.rope, self.backend = rope, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        freqs = rope_frequencies(self.head_dim, rope_base) if rope else torch.empty(0)
        self.register_buffer("inv_freq", freqs, persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool | torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over ``x``.

        Args:
            x: ``[B, T, dim]``.
            causal: a bool, or a bool tensor ``[B]`` (per row).
            doc_ids: ``[B, T]`` packed-document ids, or ``None``.
            prefix_lengths: ``[B]`` prefix-LM prefix lengths, or ``None``.

        Returns:
            ``[B, T, dim]``.
        """
        check_tensor("x", x, ndim=3, floating=True)
        B, T, C = x.shape
        if C != self.dim:
            raise fail("x", f"shape [B, T, {self.dim}]", f"shape {list(x.shape)}")
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).unbind(dim=2)
        if self.rope:
            if doc_ids is not None:
                check_tensor("doc_ids", doc_ids, shape=(B, T), integer=True)
                positions = document_positions(doc_ids.to(x.device))
            else:
                positions = torch.arange(T, device=x.device)
            q = apply_rope(q, positions, inv_freq=self.inv_freq)
            k = apply_rope(k, positions, inv_freq=self.inv_freq)
        y = attention(q, k, v, causal=causal, doc_ids=doc_ids, prefix_lengths=prefix_lengths, backend=self.backend)
        return self.out(y.reshape(B, T, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, rope={self.rope}, backend={self.backend!r}"
