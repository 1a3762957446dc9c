"""Which key positions each query may see: the validated attention layout and its boolean mask.

A layout combines three independent pieces, all per row of the batch:

- ``causal``: a Python bool for the whole batch, or a bool tensor ``[B]`` (rows may differ).
- ``doc_ids``: ``[B, T]`` integer ids of packed documents. A document is a maximal run of equal ids, so attention
  never crosses a change of id (the same id reappearing later in the row starts a new document).
- ``prefix_lengths``: ``[B]`` integers ``>= 0`` for prefix-LM rows: in a causal row, the first ``P`` positions are
  visible to every query (bidirectional over the prefix, causal after it). ``P = 0`` is plain causal, ``P >= T`` is
  fully bidirectional; bidirectional rows ignore it. A negative length is refused (a value check, run while
  validation is on).

Query ``i`` may attend key ``j`` of row ``b`` when
``same_document(b, i, j) and (not causal[b] or j <= i or j < prefix_lengths[b])``. Every query sees at least
itself, so no row of the softmax is empty.

A fourth piece replaces the three above: ``block_size`` (block diffusion). The attended sequence is then
``[x_t ; x_0]``, a noisy copy of a row followed by its clean copy, ``T = 2L``, and the rule is that of
:func:`block_diffusion_mask` (``doc_ids`` are then ``[B, L]``, the documents of one copy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dualobj._errors import check_ids, check_int, check_tensor, describe, fail, fail_type

BLOCK_TAG = "_dualobj_block_size"
"""Attribute set on the ``causal`` tensor of a block-diffusion :class:`~dualobj.objectives.Batch`: that tensor alone
does not describe the attention of the batch, so attention refuses it without the batch's layout."""


def tag_block_rows(causal: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mark ``causal`` (a ``[B]`` bool tensor) as belonging to a block-diffusion batch; returns it (unmarked while
    ``torch.compile`` traces: the mark is a guard for eager callers, not part of the computation)."""
    if not torch.compiler.is_compiling():
        setattr(causal, BLOCK_TAG, block_size)
    return causal


def check_untagged(causal: object) -> None:
    """Refuse the ``causal`` tensor of a block-diffusion batch passed without the batch's layout."""
    if torch.compiler.is_compiling() or not isinstance(causal, torch.Tensor):
        return
    if getattr(causal, BLOCK_TAG, None) is not None:
        raise fail(
            "layout",
            "the block-diffusion layout of this batch (pass layout=batch.layout, not causal=batch.causal): "
            f"its rows are [x_t ; x_0] with blocks of {getattr(causal, BLOCK_TAG)} tokens",
            "causal= alone",
        )


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


def block_diffusion_rule(
    length: int, block_size: int, segments: torch.Tensor | None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The block-diffusion mask from ``L``, ``b`` and (optionally) ``[B, L]`` document segments, unchecked.

    Returns ``[2L, 2L]`` bool, or ``[B, 2L, 2L]`` when ``segments`` is given.
    """
    if segments is not None:
        device = segments.device
    idx = torch.arange(2 * length, device=device)
    noisy = idx < length
    pos = idx - length * (~noisy).long()
    blk = pos // block_size
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = blk[:, None], blk[None, :]
    allowed = (qn & kn & (qb == kb)) | (qn & ~kn & (kb < qb)) | (~qn & ~kn & (kb <= qb))
    if segments is None:
        return allowed
    seg = segments[:, pos]  # [B, 2L]
    return allowed[None] & (seg[:, :, None] == seg[:, None, :])


@functools.lru_cache(maxsize=16)
def _cached_block_rule(length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """The document-free block-diffusion mask, built once per ``(L, block_size, device)`` (read-only: callers
    only expand it)."""
    return block_diffusion_rule(length, block_size, None, device)


def block_diffusion_mask(
    seq_len: int, block_size: int, *, doc_ids: torch.Tensor | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The attention mask of block-diffusion training over ``[x_t ; x_0]`` (noisy copy first, then clean).

    Position ``i`` of the ``2L`` attended positions lies in half ``i // L`` (0 noisy, 1 clean) at row position
    ``p = i mod L``, in block ``p // block_size``; when ``L`` is not a multiple of ``block_size`` the last block is
    simply shorter. Query ``i`` may attend key ``j`` (``True``, SDPA's convention) when both lie in one packed
    document and

    - both are noisy and in the same block (bidirectional inside a noisy block), or
    - the query is noisy, the key clean, and the key's block comes strictly before the query's, or
    - both are clean and the key's block is not after the query's (block-causal).

    Clean positions never see noisy ones. ``block_size = 1`` makes the clean half causal; ``block_size = L``
    makes the noisy half fully bidirectional and blind to the clean half.

    Args:
        seq_len: ``L``, the length of one copy of the row.
        block_size: ``b`` in ``[1, L]``.
        doc_ids: ``[B, L]`` integer document ids of the row (one copy); a document is a maximal run of equal ids.
        device: where to build the mask (default: that of ``doc_ids``, else the CPU).

    Returns:
        ``[2L, 2L]`` bool, or ``[B, 2L, 2L]`` with ``doc_ids``. Usable as an SDPA mask, or, turned additive, as a
        Hugging Face 4D mask (see :func:`dualobj.integrations.additive_attention_mask`).

    Example:
        >>> block_diffusion_mask(4, 2).int()
        tensor([[1, 1, 0, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0, 0, 0],
                [0, 0, 1, 1, 1, 1, 0, 0],
                [0, 0, 1, 1, 1, 1, 0, 0],
                [0, 0, 0, 0, 1, 1, 0, 0],
                [0, 0, 0, 0, 1, 1, 0, 0],
                [0, 0, 0, 0, 1, 1, 1, 1],
                [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    """
    L = check_int("seq_len", seq_len, low=1)
    b = check_int("block_size", block_size, low=1, high=L)
    seg = None
    if doc_ids is not None:
        check_tensor("doc_ids", doc_ids, shape=(None, L), integer=True)
        seg = document_segments(doc_ids.to(device) if device is not None else doc_ids)
    return block_diffusion_rule(L, b, seg, device)


@dataclass(frozen=True)
class AttentionSpec:
    """A validated attention layout for ``B`` rows of length ``T`` (see the module docstring for the rule).

    Attributes:
        batch: ``B``.
        length: ``T``, the attended length (``2L`` for block diffusion).
        causal: a Python bool, or a bool tensor ``[B]`` on any device (ignored with ``block_size``).
        doc_ids: ``[B, T]`` (``[B, T/2]`` with ``block_size``) integer tensor on the data's device, or ``None``.
        prefix_lengths: ``[B]`` integer tensor on the data's device, or ``None``.
        block_size: the block size of a block-diffusion layout, or ``None``.
    """

    batch: int
    length: int
    causal: bool | torch.Tensor
    doc_ids: torch.Tensor | None = None
    prefix_lengths: torch.Tensor | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        batch = check_int("batch", self.batch, low=0)
        length = check_int("length", self.length, low=0)
        doc_len = length
        if self.block_size is not None:
            if length % 2:
                raise fail("q", "an even length 2L (the rows [x_t ; x_0]) for a block-diffusion layout",
                           f"length {length}")
            doc_len = length // 2
            check_int("block_size", self.block_size, low=1, high=doc_len)
            if self.prefix_lengths is not None:
                raise fail("prefix_lengths", "None with a block-diffusion layout", describe(self.prefix_lengths))
        else:
            check_untagged(self.causal)
        if isinstance(self.causal, torch.Tensor):
            check_tensor("causal", self.causal, shape=(batch,), dtypes=(torch.bool,))
        elif not isinstance(self.causal, bool):
            raise fail_type("causal", f"a Python bool or a bool tensor of shape [{batch}]", describe(self.causal))
        if self.doc_ids is not None:
            check_tensor("doc_ids", self.doc_ids, shape=(batch, doc_len), integer=True)
        if self.prefix_lengths is not None:
            check_tensor("prefix_lengths", self.prefix_lengths, shape=(batch,), integer=True)
            check_ids("prefix_lengths", self.prefix_lengths)  # no negative length (a value check)

    @staticmethod
    def build(
        batch: int,
        length: int,
        causal: bool | torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        *,
        block_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> AttentionSpec:
        """Validate the pieces and move ``doc_ids`` / ``prefix_lengths`` to ``device`` (``causal`` stays put)."""
        if device is not None:
            if isinstance(doc_ids, torch.Tensor):
                doc_ids = doc_ids.to(device, non_blocking=True)
            if isinstance(prefix_lengths, torch.Tensor):
                prefix_lengths = prefix_lengths.to(device, non_blocking=True)
        return AttentionSpec(batch, length, causal, doc_ids, prefix_lengths, block_size)

    @property
    def dense(self) -> bool:
        """``True`` when neither documents, prefixes nor blocks are set (causality alone decides the mask)."""
        return self.doc_ids is None and self.prefix_lengths is None and self.block_size is None

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
        T = self.length
        if self.block_size is not None:
            if self.doc_ids is None and not torch.compiler.is_compiling():
                allowed = _cached_block_rule(T // 2, self.block_size, torch.device(device))
            else:
                seg = None if self.doc_ids is None else document_segments(self.doc_ids.to(device))
                allowed = block_diffusion_rule(T // 2, self.block_size, seg, device)
            return allowed.expand(self.batch, T, T).unsqueeze(1)
        c = self.causal
        if self.dense and isinstance(c, bool) and not c:
            return None
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


@dataclass(frozen=True, eq=False)
class AttentionLayout:
    """Which keys each query may see, and the position of every token: what a model hands to attention unchanged.

    One object for every layout dualobj builds: causal or bidirectional rows (per row), packed documents,
    prefix-LM rows, and block diffusion. :attr:`dualobj.objectives.Batch.layout` gives the layout of a batch;
    a model passes it to :func:`~dualobj.attention.attention` (``layout=``) and reads rotary positions from
    :meth:`positions`.

    Attributes:
        causal: a Python bool for every row, or a bool tensor ``[B]`` (keep it on the CPU). Ignored by block
            diffusion.
        doc_ids: ``[B, L]`` integer ids of packed documents (``L`` is the row length: the attended length, or
            half of it for block diffusion); attention never crosses a document.
        prefix_lengths: ``[B]`` integers: in causal rows the first ``P`` positions are visible to every query.
        block_size: set for block diffusion: the attended rows are ``[x_t ; x_0]`` (length ``2L``) and the mask is
            :func:`~dualobj.attention.block_diffusion_mask`. Cannot be combined with ``prefix_lengths``.
        position_ids: ``[T]`` or ``[B, T]`` integer positions for rotary embeddings; ``None`` means positions
            counted from 0 in each packed document (or from 0 in the row), the same in both halves of a
            block-diffusion row.

    Example:
        >>> import torch
        >>> layout = AttentionLayout(block_size=2)
        >>> layout.positions(1, 8, "cpu").tolist()
        [0, 1, 2, 3, 0, 1, 2, 3]
    """

    causal: bool | torch.Tensor = False
    doc_ids: torch.Tensor | None = None
    prefix_lengths: torch.Tensor | None = None
    block_size: int | None = None
    position_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.block_size is not None:
            check_int("block_size", self.block_size, low=1)
            if self.prefix_lengths is not None:
                raise fail("prefix_lengths", "None with a block-diffusion layout (block_size set)",
                           describe(self.prefix_lengths))
        else:
            check_untagged(self.causal)
        if isinstance(self.causal, torch.Tensor):
            check_tensor("causal", self.causal, ndim=1, dtypes=(torch.bool,))
        elif not isinstance(self.causal, bool):
            raise fail_type("causal", "a Python bool or a [B] bool tensor", describe(self.causal))
        if self.doc_ids is not None:
            check_tensor("doc_ids", self.doc_ids, ndim=2, integer=True)
        if self.prefix_lengths is not None:
            check_tensor("prefix_lengths", self.prefix_lengths, ndim=1, integer=True)
        if self.position_ids is not None:
            check_tensor("position_ids", self.position_ids, integer=True)
            if self.position_ids.ndim not in (1, 2):
                raise fail("position_ids", "a [T] or [B, T] integer tensor", describe(self.position_ids))

    def spec(self, batch: int, length: int, device: torch.device | str | None = None) -> AttentionSpec:
        """The validated :class:`AttentionSpec` of this layout for ``batch`` rows of attended length ``length``."""
        return AttentionSpec.build(batch, length, self.causal, self.doc_ids, self.prefix_lengths,
                                   block_size=self.block_size, device=device)

    def positions(self, batch: int, length: int, device: torch.device | str) -> torch.Tensor:
        """Rotary positions of the ``length`` attended tokens: ``[length]`` or ``[batch, length]`` int64."""
        if self.position_ids is not None:
            p = self.position_ids
            if p.shape not in (torch.Size([length]), torch.Size([batch, length])):
                raise fail("position_ids", f"shape [{length}] or [{batch}, {length}]", f"shape {list(p.shape)}")
            return p.to(device)
        half = length // 2 if self.block_size is not None else length
        if self.doc_ids is not None:
            check_tensor("doc_ids", self.doc_ids, shape=(batch, half), integer=True)
            pos = document_positions(self.doc_ids.to(device))
        else:
            pos = torch.arange(half, device=device)
        return torch.cat([pos, pos], dim=-1) if self.block_size is not None else pos
