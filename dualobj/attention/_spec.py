"""Which key positions each query may see: the validated attention layout and its boolean mask.

A layout combines three independent pieces, all per row of the batch:

- ``causal``: a Python bool for the whole batch, or a bool tensor ``[B]`` (rows may differ).
- ``doc_ids``: ``[B, T]`` integer ids of packed documents. A document is a maximal run of equal ids, so attention
  never crosses a change of id (the same id reappearing later in the row starts a new document).
- ``prefix_lengths``: ``[B]`` integers for prefix-LM rows: in a causal row, the first ``P`` positions are visible
  to every query (bidirectional over the prefix, causal after it). ``P <= 0`` is plain causal, ``P >= T`` is fully
  bidirectional; bidirectional rows ignore it.

Query ``i`` may attend key ``j`` of row ``b`` when
``same_document(b, i, j) and (not causal[b] or j <= i or j < prefix_lengths[b])``. Every query sees at least
itself, so no row of the softmax is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dualobj._errors import check_tensor, describe, fail


def document_segments(doc_ids: torch.Tensor) -> torch.Tensor:
    """Number the contiguous documents of each row from 0.

    Args:
        doc_ids: ``[B, T]`` integer document ids.

    Returns:
        ``[B, T]`` int64: ``k`` for the ``k``-th maximal run of equal ids in the row.
    """
    check_tensor("doc_ids", doc_ids, ndim=2, integer=True)
    change = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    first = torch.zeros(doc_ids.shape[0], 1, dtype=torch.long, device=doc_ids.device)
    return torch.cat([first, change.cumsum(1)], dim=1)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its own packed document (restarts at 0 where the id changes).

    Args:
        doc_ids: ``[B, T]`` integer document ids.

    Returns:
        ``[B, T]`` int64 positions.
    """
    check_tensor("doc_ids", doc_ids, ndim=2, integer=True)
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


@dataclass(frozen=True)
class AttentionSpec:
    """A validated attention layout for ``B`` rows of length ``T`` (see the module docstring for the rule).

    Attributes:
        batch: ``B``.
        length: ``T``.
        causal: a Python bool, or a bool tensor ``[B]`` on any device.
        doc_ids: ``[B, T]`` integer tensor on the data's device, or ``None``.
        prefix_lengths: ``[B]`` integer tensor on the data's device, or ``None``.
    """

    batch: int
    length: int
    causal: bool | torch.Tensor
    doc_ids: torch.Tensor | None = None
    prefix_lengths: torch.Tensor | None = None

    @staticmethod
    def build(
        batch: int,
        length: int,
        causal: bool | torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> AttentionSpec:
        """Validate the pieces and move ``doc_ids`` / ``prefix_lengths`` to ``device`` (``causal`` stays put)."""
        if isinstance(causal, torch.Tensor):
            check_tensor("causal", causal, shape=(batch,), dtypes=(torch.bool,))
        elif not isinstance(causal, bool):
            raise fail("causal", f"a Python bool or a bool tensor of shape [{batch}]", describe(causal))
        if doc_ids is not None:
            check_tensor("doc_ids", doc_ids, shape=(batch, length), integer=True)
            if device is not None:
                doc_ids = doc_ids.to(device, non_blocking=True)
        if prefix_lengths is not None:
            check_tensor("prefix_lengths", prefix_lengths, shape=(batch,), integer=True)
            if device is not None:
                prefix_lengths = prefix_lengths.to(device, non_blocking=True)
        return AttentionSpec(batch, length, causal, doc_ids, prefix_lengths)

    @property
    def dense(self) -> bool:
        """``True`` when neither documents nor prefixes are set (causality alone decides the mask)."""
        return self.doc_ids is None and self.prefix_lengths is None

    def host_causal(self) -> bool | torch.Tensor | None:
        """Causality as known on the host, without a device sync where possible.

        Returns:
            ``True`` / ``False`` when every row agrees, a CPU bool tensor ``[B]`` for mixed rows, or ``None`` while
            ``torch.compile`` traces (then the values cannot steer Python branches: use the mask). A causal tensor
            on an accelerator is copied to the host (one sync); pass it on the CPU, as
            :class:`dualobj.objectives.Batch` does, to avoid that.
        """
        c = self.causal
        if isinstance(c, bool):
            return c
        if torch.compiler.is_compiling():
            return None
        c = c.cpu()
        if bool(c.all()):
            return True
        if not bool(c.any()):
            return False
        return c

    def mask(self, device: torch.device | str) -> torch.Tensor | None:
        """The boolean mask, ``True`` where query ``i`` may attend key ``j``.

        Returns:
            ``[B, 1, T, T]`` bool on ``device`` (broadcast over heads), or ``None`` for full bidirectional
            attention (nothing masked).
        """
        c = self.causal
        if self.dense and isinstance(c, bool) and not c:
            return None
        T = self.length
        pos = torch.arange(T, device=device)
        allowed = (pos[None, :] <= pos[:, None]).unsqueeze(0)  # [1, T, T]
        if isinstance(c, torch.Tensor):
            allowed = allowed | ~c.to(device, non_blocking=True)[:, None, None]
        elif not c:
            allowed = torch.ones_like(allowed)
        if self.prefix_lengths is not None:
            allowed = allowed | (pos[None, None, :] < self.prefix_lengths[:, None, None])
        if self.doc_ids is not None:
            seg = document_segments(self.doc_ids)
            allowed = allowed & (seg[:, :, None] == seg[:, None, :])
        return allowed.expand(self.batch, T, T).unsqueeze(1)
