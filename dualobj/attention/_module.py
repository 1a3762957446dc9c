"""Multi-head self-attention as an ``nn.Module`` on top of :func:`dualobj.attention.attention`."""

from __future__ import annotations

import torch
from torch import nn

from dualobj._errors import check_int, check_number, check_tensor, fail, fail_type
from dualobj.attention._api import attention
from dualobj.attention._backends import Backend
from dualobj.attention._rope import apply_rope, rope_frequencies
from dualobj.attention._spec import AttentionLayout


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary embeddings, switchable between causal and bidirectional.

    One bias-free ``Linear(dim, 3·dim)`` makes q, k, v (split without a transpose into ``[B, T, H, D]``), RoPE
    rotates q and k, :func:`~dualobj.attention.attention` mixes, and a bias-free ``Linear(dim, dim)`` projects
    back. Rotary positions come from the layout (:meth:`~dualobj.attention.AttentionLayout.positions`): its
    ``position_ids`` when set, else restarting at 0 in every packed document, so a document reads the same whether
    it was packed first or later in a row (without documents ``0 .. T-1``; ``0 .. L-1`` in both halves of a
    block-diffusion row).

    The input must have the dtype of the parameters (convert the module with ``.to(dtype)`` for float64 or
    bfloat16); a mismatch raises :class:`~dualobj.DualObjError` naming ``x``.

    Args:
        dim: model width; a multiple of ``heads``.
        heads: number of attention heads; the head dimension ``dim // heads`` must be even when ``rope``.
        rope: apply rotary position embeddings to q and k.
        backend: passed to :func:`~dualobj.attention.attention`.
        rope_base: the RoPE base θ, a finite number > 0.
    """

    def __init__(
        self, dim: int, heads: int, *, rope: bool = True, backend: str | Backend = "auto", rope_base: float = 10000.0
    ) -> None:
        super().__init__()
        check_int("dim", dim, low=1)
        check_int("heads", heads, low=1)
        if rope:
            check_number("rope_base", rope_base, low=0.0, low_open=True)
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
        layout: AttentionLayout | None = None,
        *,
        causal: bool | torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over ``x``.

        Args:
            x: ``[B, T, dim]``, in the dtype of the parameters.
            layout: the attention layout (for example ``batch.layout``); or give the keywords below instead.
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
        weight = self.qkv.weight
        if x.dtype != weight.dtype:
            raise fail_type("x", f"dtype {weight.dtype} (that of the module's parameters; convert the module with "
                       ".to(dtype) or cast x)", str(x.dtype))
        layout = resolve_layout(layout, causal, doc_ids, prefix_lengths)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).unbind(dim=2)
        if self.rope:
            positions = layout.positions(B, T, x.device)
            q = apply_rope(q, positions, inv_freq=self.inv_freq)
            k = apply_rope(k, positions, inv_freq=self.inv_freq)
        y = attention(q, k, v, layout=layout, backend=self.backend)
        return self.out(y.reshape(B, T, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, rope={self.rope}, backend={self.backend!r}"


def resolve_layout(
    layout: AttentionLayout | None,
    causal: bool | torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    prefix_lengths: torch.Tensor | None,
) -> AttentionLayout:
    """One :class:`AttentionLayout` from either ``layout`` or the keywords ``causal`` / ``doc_ids`` /
    ``prefix_lengths`` (the older calling convention), never both."""
    if layout is not None:
        if not isinstance(layout, AttentionLayout):
            raise fail_type("layout", "an AttentionLayout (for example batch.layout) or None", type(layout).__name__)
        if causal is not None or doc_ids is not None or prefix_lengths is not None:
            raise fail("layout", "either layout= or the causal/doc_ids/prefix_lengths keywords", "both")
        return layout
    if causal is None:
        raise fail("causal", "a bool or a [B] bool tensor (or pass layout=)", "None")
    return AttentionLayout(causal=causal, doc_ids=doc_ids, prefix_lengths=prefix_lengths)
