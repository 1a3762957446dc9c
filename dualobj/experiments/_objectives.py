"""The objectives a replication cell can train with, by name, and the one place where a batch meets the model."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from dualobj.data import ByteTokenizer, Packed
from dualobj.objectives import ARObjective, Batch, DualObjective, MDObjective, Objective

ObjectiveFactory = Callable[[ByteTokenizer], Objective]
"""Builds a fresh objective for one cell from the byte tokenizer (mask id, special ids)."""


def md_objective(tok: ByteTokenizer) -> MDObjective:
    """The masked-diffusion objective of every cell (training at α < 1, and the MD ELBO evaluation)."""
    return MDObjective(tok.mask_id, num_special=tok.num_special)


def dual_objective(alpha: float, tok: ByteTokenizer) -> DualObjective:
    """The α axis: ``DualObjective(α, split="rows")`` with :func:`md_objective`."""
    return DualObjective(alpha, md=md_objective(tok), split="rows")


OBJECTIVES: dict[str, ObjectiveFactory] = {
    "ar": lambda tok: ARObjective(),
    "md": md_objective,
}
"""The objective axis (``dualobj repro --objectives ar,md``): name → factory. A new objective joins the grid with one
entry here; if its batches need more than ``input_ids``, ``causal`` and ``doc_ids`` (position ids, an attention
layout), extend :func:`forward` too."""


def prepare(objective: Objective, rows: Packed, *, step: int, generator: torch.Generator) -> Batch:
    """``objective.prepare`` on packed training rows, passing ``step`` to objectives whose ``prepare`` takes it.

    Args:
        objective: the cell's objective.
        rows: a training batch of packed rows (tokens and document ids).
        step: the optimizer step (0-based).
        generator: the cell's random generator.
    """
    kwargs: dict = {"doc_ids": rows.doc_ids, "generator": generator}
    if "step" in inspect.signature(objective.prepare).parameters:
        kwargs["step"] = step
    return objective.prepare(rows.tokens, **kwargs)


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Run ``model`` on a prepared batch and return its hidden states: the only place a cell calls the model while
    training, so a batch layout with more fields is handled here once.

    Args:
        model: the reference :class:`~dualobj.models.Transformer` (or any model with its call signature).
        batch: from ``objective.prepare``.
    """
    return model(batch.input_ids, causal=batch.causal, doc_ids=batch.doc_ids)
