"""The objectives a replication cell can train with, by name, and the one place where a batch meets the model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dualobj.data import ByteTokenizer, Packed
from dualobj.evaluation import ar_nll, bd_nelbo, md_elbo
from dualobj.objectives import ARObjective, Batch, BlockDiffusionObjective, DualObjective, MDObjective, Objective

ObjectiveFactory = Callable[[ByteTokenizer], Objective]
"""Builds a fresh objective for one cell from the byte tokenizer (mask id, special ids)."""


def md_objective(tok: ByteTokenizer) -> MDObjective:
    """The masked-diffusion objective of every cell (training at α < 1, and the MD ELBO evaluation)."""
    return MDObjective(tok.mask_id, num_special=tok.num_special)


def dual_objective(alpha: float, tok: ByteTokenizer) -> DualObjective:
    """The α axis: ``DualObjective(α, split="rows")`` with :func:`md_objective`."""
    return DualObjective(alpha, md=md_objective(tok), split="rows")


def bd_objective(block_size: int) -> ObjectiveFactory:
    """Block diffusion with blocks of ``block_size`` bytes (BD3-LM: rows ``[x_t ; x_0]``, in-place targets)."""

    def make(tok: ByteTokenizer) -> BlockDiffusionObjective:
        return BlockDiffusionObjective(tok.mask_id, block_size, num_special=tok.num_special)

    return make


OBJECTIVES: dict[str, ObjectiveFactory] = {
    "ar": lambda tok: ARObjective(),
    "bd4": bd_objective(4),
    "bd16": bd_objective(16),
    "md": md_objective,
}
"""The objective axis (``dualobj repro --objectives ar,bd4,bd16,md``): name → factory. A new objective joins the grid
with one entry here (and, if it has a likelihood bound of its own, one branch in :func:`own_bound`)."""


def prepare(objective: Objective, rows: Packed, *, step: int, generator: torch.Generator) -> Batch:
    """``objective.prepare`` on packed training rows (every objective of the contract takes ``step``).

    Args:
        objective: the cell's objective.
        rows: a training batch of packed rows (tokens and document ids).
        step: the optimizer step (0-based).
        generator: the cell's random generator.
    """
    return objective.prepare(rows.tokens, step=step, doc_ids=rows.doc_ids, generator=generator)


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Run ``model`` on a prepared batch and return its hidden states: the only place a cell calls the model while
    training, so a batch layout with more fields is handled here once.

    Args:
        model: the reference :class:`~dualobj.models.Transformer` (or any model with its call signature).
        batch: from ``objective.prepare``.
    """
    return model(batch.input_ids, layout=batch.layout)


def own_bound(model: nn.Module, objective: Objective, rows: Packed, *, samples: int, seed: int = 0) -> float:
    """The held-out bound of the model's own training objective, in bits per token: the AR NLL for AR (and for the
    α axis), the MD negative ELBO for MD, the block-diffusion NELBO for block diffusion. Each is an upper bound on
    ``-log2 p`` per token (the AR one exact), so models trained on different objectives compare on one scale.
    The MD bound uses the exact-count estimator (``k ~ U{1..n}``, weight ``n/k``: finite variance with one mask per
    row); the BD bound is :func:`~dualobj.evaluation.bd_nelbo`'s Bernoulli estimator (unbiased, heavy-tailed).

    Args:
        model: the trained reference model (in eval mode).
        objective: the cell's objective.
        rows: held-out rows.
        samples: Monte Carlo masks per row for the MD and BD bounds.
        seed: the evaluation seed (the same masks for every model).
    """
    if isinstance(objective, BlockDiffusionObjective):
        return bd_nelbo(model, rows.tokens, bd=objective, doc_ids=rows.doc_ids, samples=samples,
                        seed=seed).bits_per_token
    if isinstance(objective, MDObjective):
        return md_elbo(model, rows.tokens, doc_ids=rows.doc_ids, md=objective, samples=samples, estimator="exact",
                       seed=seed).bits_per_token
    return ar_nll(model, rows.tokens, doc_ids=rows.doc_ids).bits_per_token
