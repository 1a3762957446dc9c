"""Dense attention masks built from a :class:`~dualobj.objectives.Batch`, for models that take a 4D mask."""

from __future__ import annotations

import torch

from dualobj._errors import check_int, check_tensor, fail, fail_type
from dualobj.attention import AttentionLayout, AttentionSpec
from dualobj.objectives import Batch


def allowed_keys(
    causal: torch.Tensor,
    length: int,
    *,
    doc_ids: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Which key each query may attend to, per row: ``[B, L, L]`` bool (True = attend).

    The rule of :func:`dualobj.attention.attention` (built by :class:`dualobj.attention.AttentionSpec`): query ``i``
    sees key ``j`` when both lie in one packed document (a maximal run of equal ``doc_ids``) and the row is
    bidirectional (``causal[b]`` False), or ``j <= i``, or ``j`` lies in the row's prefix (``j < prefix_lengths[b]``).
    With ``block_size`` the rows are block-diffusion rows ``[x_t ; x_0]`` and the rule is that of
    :func:`dualobj.attention.block_diffusion_mask`.

    Args:
        causal: ``[B]`` bool, per-row causality (``Batch.causal``).
        length: ``L``, the attended sequence length (``2L`` of the row for block diffusion).
        doc_ids: ``[B, L]`` int document ids of packed rows (``[B, L/2]``, one copy, with ``block_size``).
        prefix_lengths: ``[B]`` int; in causal rows, keys before this position are visible to every query.
        padding_mask: ``[B, L]`` bool or 0/1 int, Hugging Face's 2D ``attention_mask`` (1 = real token): padded keys
            are hidden. A query always sees itself, so no row of the mask is empty. With ``block_size`` it may also
            be ``[B, L/2]`` (one copy), applied to both halves.
        device: where to build the mask (default: the device of ``doc_ids``, else of ``padding_mask``, else CPU).
        block_size: the block size of block-diffusion rows, or ``None``.

    Returns:
        ``[B, L, L]`` bool.
    """
    check_tensor("causal", causal, ndim=1, dtypes=(torch.bool,))
    B = causal.shape[0]
    L = check_int("length", length, low=1)
    if device is None:
        device = next((x.device for x in (doc_ids, padding_mask) if x is not None), torch.device("cpu"))
    spec = AttentionSpec.build(B, L, causal, doc_ids, prefix_lengths, block_size=block_size, device=device)
    return _apply_padding(spec, padding_mask, device)


def _apply_padding(spec: AttentionSpec, padding_mask: torch.Tensor | None, device: torch.device | str) -> torch.Tensor:
    B, L = spec.batch, spec.length
    allowed = spec.mask(device)
    # a fresh tensor: the mask may be a view of one shared by later calls
    allowed = torch.ones(B, L, L, dtype=torch.bool, device=device) if allowed is None else allowed[:, 0].clone()
    if padding_mask is not None:
        if spec.block_size is not None and padding_mask.ndim == 2 and padding_mask.shape == (B, L // 2):
            padding_mask = torch.cat([padding_mask, padding_mask], dim=1)
        check_tensor("padding_mask", padding_mask, shape=(B, L))
        keep = padding_mask.to(device).bool()
        allowed = (allowed & keep[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
    return allowed


def layout_allowed_keys(
    layout: AttentionLayout,
    batch: int,
    length: int,
    *,
    padding_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[B, T, T]`` bool, True where a query may attend a key, for an
    :class:`~dualobj.attention.AttentionLayout` (for example ``batch.layout``) over ``batch`` rows of attended
    length ``length``; ``padding_mask`` as in :func:`allowed_keys`."""
    if not isinstance(layout, AttentionLayout):
        raise fail_type("layout", "an AttentionLayout", type(layout).__name__)
    return _apply_padding(layout.spec(batch, length, device=device), padding_mask, device)


def additive_attention_mask(
    batch: Batch,
    *,
    dtype: torch.dtype = torch.float32,
    prefix_lengths: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``[B, 1, L, L]`` additive float mask a Hugging Face model accepts as ``attention_mask``.

    0 where a query may attend (see :func:`allowed_keys`), ``torch.finfo(dtype).min`` elsewhere. transformers
    passes a 4D mask through unchanged; its eager attention adds it to the scores and its SDPA path hands it to
    ``scaled_dot_product_attention``, which adds a float mask too, so one mask serves both. Each row gets its own
    causality (AR rows causal, MD rows bidirectional) and packed documents never see each other. For a
    block-diffusion batch it is the ``[B, 1, 2L, 2L]`` mask of :func:`dualobj.attention.block_diffusion_mask`; give
    the model ``position_ids=batch.position_ids`` too (both halves count positions from 0).

    Args:
        batch: from an objective's ``prepare`` (uses its :attr:`~dualobj.objectives.Batch.layout` and the device of
            ``input_ids``).
        dtype: the model's compute dtype (``model.dtype``); SDPA wants the mask in the query's dtype.
        prefix_lengths: ``[B]`` int prefix-LM lengths (bidirectional prefix in causal rows).
        padding_mask: ``[B, L]`` Hugging Face 2D ``attention_mask`` (1 = real token); for a block-diffusion batch
            ``[B, 2L]`` or ``[B, L]`` (one copy).

    Returns:
        ``[B, 1, L, L]`` tensor of ``dtype`` on the batch's device.

    Example:
        >>> import torch
        >>> from dualobj.objectives import ARObjective
        >>> mask = additive_attention_mask(ARObjective().prepare(torch.tensor([[1, 2, 3]])))
        >>> (mask[0, 0] == 0).tolist()
        [[True, False, False], [True, True, False], [True, True, True]]
    """
    if not isinstance(batch, Batch):
        raise fail_type("batch", "a dualobj Batch", type(batch).__name__)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise fail_type("dtype", "a floating torch.dtype", repr(dtype))
    layout = batch.layout
    if prefix_lengths is not None:
        if batch.block_size is not None:
            raise fail("prefix_lengths", "None for a block-diffusion batch", "a tensor")
        layout = AttentionLayout(causal=batch.causal, doc_ids=batch.doc_ids, prefix_lengths=prefix_lengths)
    B, T = batch.shape
    allowed = layout_allowed_keys(layout, B, T, padding_mask=padding_mask, device=batch.input_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
