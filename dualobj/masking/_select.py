"""Exact per-row selection of the k smallest keys, by a two-pass radix select (no sort).

Sorting a ``[B, L]`` batch costs a comparison sort per row; ``kthvalue``/``topk`` cost about as much. Choosing the
``k_b`` smallest of 24-bit integer keys only needs each row's threshold key, found digit by digit: a per-row
histogram of the high 12 bits (one ``scatter_add_``) locates the bucket holding the ``k_b``-th key, and a second
histogram of the low 12 bits of the keys in that bucket gives the exact threshold. Each histogram is searched in two
levels (64 blocks of 64 buckets), so no pass runs a cumulative sum over all 4096 buckets. Every step has a fixed
shape, so nothing synchronises with the host on an accelerator and ``torch.compile`` can trace it.
"""

from __future__ import annotations

import torch

from dualobj import _random

KEY_BITS = 24
"""Keys are integers in ``[0, 2**KEY_BITS)`` (as many random bits as a float32 uniform draw has)."""

EXCLUDED = 1 << KEY_BITS
"""The key of a position that must never be selected: larger than every real key."""

_LOW_BITS = 12
_HIGH_BITS = KEY_BITS - _LOW_BITS
_BLOCK = 64  # 2**12 buckets searched as 64 blocks of 64
_SORT_BELOW = 64  # rows of at most this many positions are selected by a sort instead


def random_keys(
    shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """Independent uniform int32 keys in ``[0, 2**KEY_BITS)`` of ``shape`` on ``device``."""
    return _random.randint(0, 1 << KEY_BITS, shape, generator=generator, device=device, dtype=torch.int32)


def _bucket_of(hist: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a ``[B, 4096]`` histogram: the first bucket where the running count reaches ``need``
    (``[B, 1]``), and how many keys are left to take inside it.

    Two levels: the cumulative count of the 64 block totals gives the block, the cumulative count inside that
    block gives the bucket. ``need`` must not exceed the histogram's total (the result is clamped inside it).
    """
    B = hist.shape[0]
    i32 = torch.int32
    blocks = hist.view(B, _BLOCK, _BLOCK)
    cum = blocks.sum(2, dtype=hist.dtype).cumsum(1, dtype=i32)
    block = torch.searchsorted(cum, need).clamp_max_(_BLOCK - 1)
    need = need - torch.gather(cum, 1, (block - 1).clamp_min(0)).masked_fill_(block == 0, 0)
    inner = torch.gather(blocks, 1, block[:, :, None].expand(B, 1, _BLOCK)).squeeze(1).cumsum(1, dtype=i32)
    bucket = torch.searchsorted(inner, need).clamp_max_(_BLOCK - 1)
    need = need - torch.gather(inner, 1, (bucket - 1).clamp_min(0)).masked_fill_(bucket == 0, 0)
    return block * _BLOCK + bucket, need


def smallest_k(keys: torch.Tensor, k: torch.Tensor, *, work: torch.Tensor | None = None) -> torch.Tensor:
    """Mark, in each row, the ``k_b`` positions with the smallest keys; :data:`EXCLUDED` keys are never marked.

    Equal keys go leftmost first. For independent uniform keys a tie at the threshold has probability about
    ``L / 2**24`` per row and only decides which of the tied positions is taken, so the chosen set is uniform for
    all practical purposes; the count is always exact.

    Args:
        keys: ``[B, L]`` int32 or int64 in ``[0, 2**24]`` (``2**24`` = :data:`EXCLUDED`).
        k: ``[B]`` integer counts (clamped to ``[0, number of keys that are not excluded]``).
        work: an optional ``[B, L]`` int64 tensor the selection may overwrite (it saves allocating one).

    Returns:
        ``[B, L]`` bool with exactly ``min(k_b, n_b)`` marked positions in row ``b``.
    """
    B, L = keys.shape
    device = keys.device
    i32 = torch.int32
    if L <= _SORT_BELOW:
        # Short rows: a stable sort of L keys is cheaper than two 4096-bucket histograms per row, and selects the
        # same positions (the smallest keys, equal keys leftmost first).
        order = torch.sort(keys, dim=1, stable=True).indices
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=device).expand(B, L))
        available = (keys < EXCLUDED).sum(1)
        take = torch.minimum(k.to(device=device, dtype=torch.long).clamp_min(0), available)
        return ranks < take[:, None]
    # Counts never exceed L; int16 histograms halve the memory the passes touch.
    count = torch.int16 if L < 1 << 15 else i32
    # EXCLUDED keys land in the extra bucket 4096. Scatter indices are int64; the buffer is reused below.
    if work is None:
        work = torch.empty(B, L, dtype=torch.long, device=device)
    high = torch.bitwise_right_shift(keys, _LOW_BITS, out=work)
    hist = torch.zeros(B, (1 << _HIGH_BITS) + 1, dtype=count, device=device)
    hist.scatter_add_(1, high, torch.ones(B, L, dtype=count, device=device))
    available = (L - hist[:, -1:].to(i32)).clamp_min_(0)
    need = torch.minimum(k.to(device=device, dtype=i32)[:, None].clamp_min(0), available)
    j_high, need = _bucket_of(hist[:, : 1 << _HIGH_BITS], need)
    # Second digit: a histogram of the low bits, counting only the keys inside bucket j_high (buffers reused).
    inside = (high == j_high).to(count)
    low = torch.bitwise_and(keys, (1 << _LOW_BITS) - 1, out=high)
    hist = hist[:, : 1 << _LOW_BITS].zero_()
    hist.scatter_add_(1, low, inside)
    j_low, need = _bucket_of(hist, need)
    # Rows with nothing to take get a threshold below every key (in the keys' dtype: no promoted copies).
    threshold = ((j_high << _LOW_BITS) | j_low).masked_fill_(need == 0, -1).to(keys.dtype)
    tied_count = torch.gather(hist, 1, j_low).masked_fill_(need == 0, 0)
    if device.type == "cpu" and not torch.compiler.is_compiling() and bool((tied_count <= need).all()):
        # Every key equal to a row's threshold is taken (the common case): no tie pass. On the host this check
        # costs nothing; elsewhere the general form below avoids a synchronisation.
        return keys <= threshold
    tied = keys == threshold
    mask = keys < threshold
    return mask.bitwise_or_(tied.bitwise_and_(tied.cumsum(1, dtype=count) <= need))
