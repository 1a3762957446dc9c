"""Scoring hidden states through the output layer without building the full ``[B, L, V]`` logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualobj._errors import check_tensor, fail
from dualobj.objectives._batch import IGNORE_INDEX, Batch, LossOutput
from dualobj.objectives._ce import check_batch_against, check_labels, finish


def score_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: Batch,
    *,
    bias: torch.Tensor | None = None,
    z_loss: float = 0.0,
    normalize: str = "valid",
    chunk_size: int | None = None,
) -> LossOutput:
    """Score hidden states ``[B, L, H]`` against ``batch`` through the output layer ``weight [V, H]``.

    Only labelled positions are projected, so an MD batch with half its positions masked costs about half.
    """
    check_tensor("hidden", hidden, floating=True)
    check_batch_against(hidden.shape, batch, "hidden", "hidden states")
    check_tensor("head", weight, ndim=2, floating=True)
    if weight.shape[1] != hidden.shape[-1]:
        raise fail("head", f"an output-layer weight of shape [V, H={hidden.shape[-1]}]", f"shape {list(weight.shape)}")
    V = weight.shape[0]
    check_labels(batch.labels, V)
    B, L = batch.shape
    labels = batch.labels.reshape(-1)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.reshape(B * L, -1).index_select(0, rows)
    y = labels.index_select(0, rows)
    w = batch.weights.reshape(-1).index_select(0, rows).float()
    logits = F.linear(h, weight, bias).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    per = ce
    lse_sq_rows = None
    if z_loss > 0:
        lse_sq_rows = torch.logsumexp(logits, dim=-1).square()
        per = per + z_loss * lse_sq_rows
    total = (per * w).sum()
    with torch.no_grad():
        ce_full = torch.zeros(B * L, device=hidden.device).index_copy_(0, rows, ce.detach())
        correct = torch.zeros(B * L, dtype=torch.bool, device=hidden.device).index_copy_(
            0, rows, logits.argmax(-1) == y)
        lse_full = None
        if lse_sq_rows is not None:
            lse_full = torch.zeros(B * L, device=hidden.device).index_copy_(0, rows, lse_sq_rows.detach()).view(B, L)
    return finish(total, ce_full.view(B, L), correct.view(B, L), lse_full, batch, normalize)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    z_loss: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Weighted cross-entropy of ``hidden [N, H] @ weight[V, H].T (+ bias)`` against ``labels [N]``.

    Placeholder: builds the logits of the labelled rows (the memory-efficient version replaces it).
    """
    keep = labels != ignore_index
    logits = F.linear(hidden[keep], weight, bias).float()
    ce = F.cross_entropy(logits, labels[keep], reduction="none")
    if z_loss > 0:
        ce = ce + z_loss * torch.logsumexp(logits, -1).square()
    w = weights[keep].float() if weights is not None else torch.ones_like(ce)
    if reduction == "none":
        return torch.zeros(labels.shape, device=hidden.device).masked_scatter(keep, ce * w)
    total = (ce * w).sum()
    return total / keep.sum().clamp_min(1) if reduction == "mean" else total
