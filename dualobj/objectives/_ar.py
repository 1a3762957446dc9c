"""The autoregressive objective: clean inputs, causal attention, position i predicts token i + 1."""

from __future__ import annotations

import torch

from dualobj._errors import check_generator, check_int
from dualobj.objectives._base import (
    Normalize,
    Objective,
    as_long,
    check_step,
    check_tokens,
    same_document_next,
    shift_left,
)
from dualobj.objectives._batch import IGNORE_INDEX, Batch


class ARObjective(Objective):
    r"""Next-token prediction: :math:`L_{AR} = -\frac{1}{N}\sum_i \log p_\theta(x_{i+1} \mid x_{\le i})`.

    Output position ``i`` is scored on token ``i + 1`` with weight 1, except where token ``i + 1`` is padding,
    starts another packed document, or lies inside the row's prompt. The last position has no target.

    Args:
        pad_id: padding id; padding is never a target.
        z_loss: coefficient of the ``logsumexp²`` penalty.
        normalize: the loss denominator (see :func:`dualobj.objectives.cross_entropy`); for AR rows
            ``"valid"`` and ``"targets"`` agree.

    Example:
        >>> import torch
        >>> batch = ARObjective().prepare(torch.tensor([[5, 6, 7]]))
        >>> batch.labels.tolist(), batch.causal.tolist()
        ([[6, 7, -100]], [True])
    """

    def __init__(self, *, pad_id: int | None = None, z_loss: float = 0.0, normalize: Normalize = "valid") -> None:
        super().__init__(z_loss=z_loss, normalize=normalize)
        self.pad_id = None if pad_id is None else check_int("pad_id", pad_id, low=0)

    def prepare(
        self,
        tokens: torch.Tensor,
        *,
        step: int | None = None,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Build the AR batch from ``tokens [B, L]``; deterministic (``generator`` is accepted and unused).

        Args:
            tokens: ``[B, L]`` ids of any integer dtype (the batch holds them as int64).
            step: accepted and ignored (AR does not depend on the step); checked when given.
            doc_ids: ``[B, L]`` document ids of packed rows (targets never cross a boundary).
            prompt_lengths: ``[B]``; tokens ``< prompt_lengths[b]`` are context only, never targets.
            generator: unused (AR is deterministic); accepted so every objective has one signature.
        """
        B, L = check_tokens(tokens, doc_ids, prompt_lengths)
        check_step(step)
        check_generator("generator", generator)
        tokens, doc_ids = tokens.long(), as_long(doc_ids)
        device = tokens.device
        target_ok = same_document_next(doc_ids, B, L, device)
        if self.pad_id is not None:
            target_ok &= shift_left(tokens != self.pad_id, False)
        if prompt_lengths is not None:
            positions = torch.arange(L, device=device)
            target_ok &= (positions[None, :] + 1) >= prompt_lengths.to(device)[:, None]
        labels = torch.where(target_ok, shift_left(tokens, IGNORE_INDEX), IGNORE_INDEX)
        return Batch(
            input_ids=tokens,
            labels=labels,
            weights=target_ok.float(),
            causal=torch.ones(B, dtype=torch.bool),
            doc_ids=doc_ids,
            t=None,
            valid=target_ok,
            scale=None,
        )

    def __repr__(self) -> str:
        return f"ARObjective(pad_id={self.pad_id}, z_loss={self.z_loss}, normalize={self.normalize!r})"
