"""What every objective shares: argument checks on the tokens, and scoring through one cross-entropy."""

from __future__ import annotations

import torch
from torch import nn

from dualobj._errors import check_choice, check_tensor, describe, fail
from dualobj.objectives._batch import Batch, LossOutput
from dualobj.objectives._ce import NORMALIZERS, cross_entropy


def check_tokens(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor | None,
    prompt_lengths: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Check ``tokens [B, L]`` (non-empty, integer) and the optional per-position / per-row companions."""
    check_tensor("tokens", tokens, ndim=2, integer=True)
    B, L = tokens.shape
    if B == 0 or L == 0:
        raise fail("tokens", "a non-empty [B, L] batch", f"shape {list(tokens.shape)}")
    if doc_ids is not None:
        check_tensor("doc_ids", doc_ids, shape=(B, L), integer=True)
    if prompt_lengths is not None:
        check_tensor("prompt_lengths", prompt_lengths, shape=(B,), integer=True)
    return B, L


def same_document_next(doc_ids: torch.Tensor | None, B: int, L: int, device: torch.device) -> torch.Tensor:
    """``[B, L]`` bool: position ``i`` and ``i + 1`` lie in one document (False at the last position)."""
    out = torch.zeros(B, L, dtype=torch.bool, device=device)
    if doc_ids is None:
        out[:, :-1] = True
    else:
        out[:, :-1] = doc_ids[:, 1:] == doc_ids[:, :-1]
    return out


def shift_left(x: torch.Tensor, fill: int | float | bool) -> torch.Tensor:
    """``out[:, i] = x[:, i + 1]``, ``out[:, -1] = fill``."""
    out = torch.full_like(x, fill)
    out[:, :-1] = x[:, 1:]
    return out


class Objective:
    """Base of the objectives: ``prepare`` builds a :class:`Batch`; :meth:`loss` scores a model output on it.

    Args:
        z_loss: coefficient of the ``logsumexp²`` penalty (0 = off; the paper's code uses 1e-4).
        normalize: the loss denominator, one of ``"valid"``, ``"positions"``, ``"targets"``, ``"none"``.
    """

    def __init__(self, *, z_loss: float = 0.0, normalize: str = "valid") -> None:
        if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or z_loss < 0:
            raise fail("z_loss", "a number >= 0", describe(z_loss))
        check_choice("normalize", normalize, NORMALIZERS)
        self.z_loss = float(z_loss)
        self.normalize = normalize

    def prepare(self, tokens: torch.Tensor, **kwargs: object) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(
        self,
        output: torch.Tensor,
        batch: Batch,
        *,
        head: torch.Tensor | nn.Linear | None = None,
        bias: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> LossOutput:
        """Score a model output on ``batch``.

        Args:
            output: logits ``[B, L, V]`` when ``head`` is ``None``; otherwise hidden states ``[B, L, H]``.
            batch: from :meth:`prepare`.
            head: the output layer, as its weight ``[V, H]`` or an ``nn.Linear``. Given a head, the loss goes
                through :func:`dualobj.objectives.linear_cross_entropy`: only labelled positions are projected,
                chunk by chunk, and the ``[B, L, V]`` logits are never built.
            bias: ``[V]`` output bias (taken from the ``nn.Linear`` when ``head`` is one).
            chunk_size: rows per chunk of the fused path (``None``: chosen from the vocabulary size).
        """
        if head is None:
            return cross_entropy(output, batch, z_loss=self.z_loss, normalize=self.normalize)
        from dualobj.objectives._fused import resolve_head, score_hidden

        head, bias = resolve_head(head, bias)  # an FSDP2-sharded nn.Linear is gathered here
        return score_hidden(
            output, head, batch, bias=bias, z_loss=self.z_loss, normalize=self.normalize, chunk_size=chunk_size
        )
