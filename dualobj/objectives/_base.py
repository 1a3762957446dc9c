"""The objective contract, and what every objective shares: checks on the tokens, scoring through one cross-entropy.

The contract (:class:`ObjectiveProtocol`) is two methods::

    prepare(tokens, *, step=None, doc_ids=None, prompt_lengths=None, generator=None) -> Batch
    loss(output, batch, *, head=None, bias=None, chunk_size=None) -> LossOutput

A training loop written against it runs unchanged with any objective: the built-in ones, a :class:`Mixture`, or
a user's own class.
"""

from __future__ import annotations

import abc
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from dualobj._errors import check_choice, check_ids, check_int, check_number, check_tensor, fail
from dualobj.objectives._batch import Batch, LossOutput
from dualobj.objectives._ce import NORMALIZERS, cross_entropy

Normalize = Literal["valid", "positions", "targets", "none"]
"""The loss denominators (see :data:`dualobj.objectives.NORMALIZERS`)."""

Head = torch.Tensor | nn.Linear | nn.Embedding
"""An output layer: its weight ``[V, H]``, an ``nn.Linear``, or an ``nn.Embedding`` (tied input/output embeddings)."""


@runtime_checkable
class ObjectiveProtocol(Protocol):
    """What every objective provides; a training loop needs nothing else.

    ``prepare(tokens, *, step=None, doc_ids=None, prompt_lengths=None, generator=None) -> Batch``
        Turn clean ids ``tokens [B, L]`` (any integer dtype) into a :class:`~dualobj.objectives.Batch`: the
        model's inputs, the targets, their weights and the attention of each row.

        - ``step``: the optimizer step, an int ``>= 0``. Every objective accepts it. An objective whose batch
          depends on the step (a scheduled weight, a rotation over steps or ranks) raises
          :class:`~dualobj.DualObjError` naming ``step`` when it is ``None``; the others ignore it. Passing it
          always is the safe habit.
        - ``doc_ids``: ``[B, L]`` document ids of packed rows (targets and attention never cross a document).
        - ``prompt_lengths``: ``[B]``; the first ``prompt_lengths[b]`` tokens of row ``b`` are context only: never
          a target, never masked.
        - ``generator``: a ``torch.Generator``, the only source of randomness (same seed, same batch).

    ``loss(output, batch, *, head=None, bias=None, chunk_size=None) -> LossOutput``
        Score the model's output on the batch: logits ``[B, L, V]`` when ``head`` is ``None``, else hidden states
        ``[B, L, H]`` projected through ``head`` (a weight ``[V, H]``, an ``nn.Linear`` or an ``nn.Embedding``)
        by the fused path, which never builds the logits.

    :class:`Objective` implements ``loss`` once; subclasses write only ``prepare``. A class that does not subclass
    it satisfies the protocol by having both methods (``isinstance(x, ObjectiveProtocol)`` checks their presence).
    """

    def prepare(
        self,
        tokens: torch.Tensor,
        *,
        step: int | None = None,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch: ...

    def loss(
        self,
        output: torch.Tensor,
        batch: Batch,
        *,
        head: Head | None = None,
        bias: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> LossOutput: ...


def check_step(step: object) -> int | None:
    """Check an optional ``step`` argument: ``None`` or an int ``>= 0``."""
    if step is None:
        return None
    return check_int("step", step, low=0)


def require_step(step: object, why: str) -> int:
    """The ``step`` of an objective whose batch depends on it: an int ``>= 0``, never ``None``.

    Args:
        step: the ``step`` argument of ``prepare``.
        why: what depends on the step, for the message (e.g. ``"the weight of 'ar' is a schedule"``).

    Raises:
        DualObjError: naming ``step`` when it is ``None`` (so a forgotten step never freezes a schedule at 0).

    Example:
        >>> require_step(5, "alpha is a schedule")
        5
        >>> require_step(None, "alpha is a schedule")
        Traceback (most recent call last):
        ...
        dualobj._errors.DualObjError: step: expected the optimizer step, an int >= 0 (alpha is a schedule), got None
    """
    if step is None:
        raise fail("step", f"the optimizer step, an int >= 0 ({why})", "None")
    return check_int("step", step, low=0)


def check_tokens(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor | None,
    prompt_lengths: torch.Tensor | None = None,
    *,
    values: bool = True,
) -> tuple[int, int]:
    """Check ``tokens [B, L]`` (non-empty, any integer dtype) and the optional per-position / per-row companions.

    Structural checks always run; the value checks (no negative id, no negative prompt length) run while
    validation is on (:func:`dualobj.validation_enabled`) and ``values`` is True (a mixture passes False: its
    components check the values, and each check is a device sync). Objectives then work on ``tokens.long()``: a
    Batch always holds int64 ids, so uint8, int16 and int32 tokens give the same loss as int64.
    """
    check_tensor("tokens", tokens, ndim=2, integer=True)
    B, L = tokens.shape
    if B == 0 or L == 0:
        raise fail("tokens", "a non-empty [B, L] batch", f"shape {list(tokens.shape)}")
    if values:
        check_ids("tokens", tokens)
    if doc_ids is not None:
        check_tensor("doc_ids", doc_ids, shape=(B, L), integer=True)
    if prompt_lengths is not None:
        check_tensor("prompt_lengths", prompt_lengths, shape=(B,), integer=True)
        if values:
            check_ids("prompt_lengths", prompt_lengths)
    return B, L


def as_long(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x.long()`` (no copy when already int64), ``None`` stays ``None``."""
    return None if x is None else x.long()


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


class Objective(abc.ABC):
    """Base of the objectives: subclasses write :meth:`prepare`; :meth:`loss` scores a model output on its batch.

    See :class:`ObjectiveProtocol` for the contract both methods follow.

    Args:
        z_loss: coefficient of the ``logsumexp²`` penalty (0 = off; the paper's code uses 1e-4).
        normalize: the loss denominator, one of ``"valid"``, ``"positions"``, ``"targets"``, ``"none"``.

    Example:
        >>> import torch
        >>> class Copy(Objective):  # predict each token in place, causal attention, weight 1
        ...     def prepare(self, tokens, *, step=None, doc_ids=None, prompt_lengths=None, generator=None):
        ...         tokens = tokens.long()
        ...         return Batch(input_ids=tokens, labels=tokens, weights=torch.ones(tokens.shape),
        ...                      causal=torch.ones(tokens.shape[0], dtype=torch.bool), doc_ids=doc_ids)
        >>> out = Copy().loss(torch.zeros(1, 3, 8), Copy().prepare(torch.tensor([[1, 2, 3]])))
        >>> round(out.loss.item(), 4) == round(torch.log(torch.tensor(8.0)).item(), 4)
        True
    """

    def __init__(self, *, z_loss: float = 0.0, normalize: Normalize = "valid") -> None:
        self.z_loss = check_number("z_loss", z_loss, low=0.0)
        check_choice("normalize", normalize, NORMALIZERS)
        self.normalize = normalize

    @abc.abstractmethod
    def prepare(
        self,
        tokens: torch.Tensor,
        *,
        step: int | None = None,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Build the :class:`Batch` for clean ids ``tokens [B, L]`` (see :class:`ObjectiveProtocol`)."""

    def loss(
        self,
        output: torch.Tensor,
        batch: Batch,
        *,
        head: Head | None = None,
        bias: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> LossOutput:
        """Score a model output on ``batch``.

        Args:
            output: logits ``[B, L, V]`` when ``head`` is ``None``; otherwise hidden states ``[B, L, H]``.
            batch: from :meth:`prepare`.
            head: the output layer, as its weight ``[V, H]``, an ``nn.Linear``, or an ``nn.Embedding`` whose weight
                is tied to the output (tied embeddings: ``logits = hidden @ embedding.weight.T``). Given a head, the
                loss goes through :func:`dualobj.objectives.linear_cross_entropy`: only labelled positions are
                projected, chunk by chunk, and the ``[B, L, V]`` logits are never built.
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
