"""A small reference transformer: pre-RMSNorm blocks of rotary self-attention and a SwiGLU feed-forward."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dualobj._errors import check_ids, check_int, check_number, check_tensor, describe, fail, fail_type
from dualobj.attention import AttentionLayout, SelfAttention
from dualobj.attention._module import resolve_layout


@dataclass
class TransformerConfig:
    """The shape of a :class:`Transformer`.

    Attributes:
        vocab_size: number of token ids ``V``.
        dim: model width ``D`` (a multiple of ``heads``).
        layers: number of blocks.
        heads: attention heads (head size ``D / heads``).
        max_len: the longest sequence accepted.
        ffn_multiple: the SwiGLU hidden size is ``ffn_multiple · dim``, rounded up to a multiple of 16.
        rope_theta: the rotary embedding base θ (the paper uses 160,000 at length 2048; 10,000 is the usual).
        norm_eps: RMSNorm epsilon.
        backend: the attention backend passed to :mod:`dualobj.attention` (``"auto"`` picks the fastest that runs).
    """

    vocab_size: int = 260
    dim: int = 128
    layers: int = 2
    heads: int = 4
    max_len: int = 512
    ffn_multiple: float = 8 / 3
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "layers", "heads", "max_len"):
            check_int(name, getattr(self, name), low=1)
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise fail("dim", f"a multiple of heads={self.heads} with an even head size", self.dim)
        for name in ("ffn_multiple", "rope_theta", "norm_eps"):
            check_number(name, getattr(self, name), low=0.0, low_open=True)

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU hidden size."""
        return 16 * math.ceil(self.ffn_multiple * self.dim / 16)

    def to_dict(self) -> dict:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)


class SwiGLU(nn.Module):
    """``w_down(silu(w_gate(x)) · w_up(x))``: ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(nn.functional.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))``: ``[B, L, D] -> [B, L, D]``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = SelfAttention(config.dim, config.heads, rope=True, backend=config.backend,
                                  rope_base=config.rope_theta)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = SwiGLU(config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), layout)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """A decoder-shaped transformer whose attention is chosen per call: causal, bidirectional, per-row mixed,
    document-packed, prefix-LM or block diffusion, so one set of weights serves AR, MD, the dual objective and
    block diffusion.

    Token embedding, ``layers`` pre-RMSNorm blocks (rotary self-attention from :mod:`dualobj.attention`, SwiGLU
    feed-forward), a final RMSNorm, and an untied output layer ``lm_head`` (``nn.Linear(dim, vocab_size)``, no
    bias) that :meth:`forward` does not apply: pass it to the loss so only labelled positions are projected.

    Args:
        config: the :class:`TransformerConfig`.

    Example:
        >>> import torch
        >>> from dualobj.objectives import ARObjective
        >>> model = Transformer(TransformerConfig(vocab_size=16, dim=32, layers=1, heads=2))
        >>> batch = ARObjective().prepare(torch.randint(0, 16, (2, 8)))
        >>> hidden = model(batch.input_ids, layout=batch.layout)  # or causal=batch.causal, doc_ids=batch.doc_ids
        >>> hidden.shape
        torch.Size([2, 8, 32])
        >>> loss = ARObjective().loss(hidden, batch, head=model.lm_head).loss
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise fail_type("config", "a TransformerConfig", describe(config))
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; the projections into the residual stream are scaled by ``1/√(2·layers)``."""
        out_std = 0.02 / math.sqrt(2 * self.config.layers)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue
            is_out = name.endswith(("w_down.weight", "out.weight", "proj.weight", "o.weight", "wo.weight"))
            nn.init.normal_(p, std=out_std if is_out else 0.02)

    def num_parameters(self) -> int:
        """The number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(
        self,
        input_ids: torch.Tensor,
        layout: AttentionLayout | None = None,
        *,
        causal: bool | torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm.

        Give the attention either as ``layout`` (``batch.layout``: needed for block diffusion, whose rows
        ``[x_t ; x_0]`` also carry their rotary positions) or by the keywords ``causal`` / ``doc_ids`` /
        ``prefix_lengths``.

        Args:
            input_ids: ``[B, L]`` integer ids in ``[0, vocab_size)`` (a value check, while validation is on),
                ``L <= max_len``.
            layout: an :class:`~dualobj.attention.AttentionLayout`.
            causal: a bool for every row, or ``[B]`` bool per row (``True`` causal, ``False`` bidirectional).
            doc_ids: ``[B, L]`` integer document ids; a position attends only within its document.
            prefix_lengths: ``[B]`` integers; positions ``< prefix_lengths[b]`` attend to each other
                bidirectionally and the rest causally (prefix LM). Applies to causal rows.

        Returns:
            ``[B, L, dim]`` hidden states; ``model.lm_head(hidden)`` gives logits ``[B, L, V]``.
        """
        check_tensor("input_ids", input_ids, ndim=2, integer=True)
        B, L = input_ids.shape
        if L > self.config.max_len:
            raise fail("input_ids", f"at most max_len={self.config.max_len} positions", f"shape {[B, L]}")
        check_ids("input_ids", input_ids, high=self.config.vocab_size)
        layout = resolve_layout(layout, causal, doc_ids, prefix_lengths)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, layout)
        return self.norm(x)

    def logits(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """``lm_head(forward(input_ids, **kwargs))``: ``[B, L, V]``."""
        return self.lm_head(self(input_ids, **kwargs))
