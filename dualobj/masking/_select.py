"""Exact per-row selection of the k smallest scores, by a two-pass radix select (no sort).

Sorting a ``[B, L]`` batch costs a comparison sort per row; ``kthvalue``/``topk`` cost about as much. Choosing the
``k_b`` smallest of 24-bit integer keys only needs each row's threshold key, found digit by digit: a per-row
histogram of the high 12 bits (one ``scatter_add_``), a cumulative sum and a ``searchsorted`` give the bucket holding
the ``k_b``-th key; a second histogram of the low 12 bits of the keys in that bucket gives the exact threshold.
Every step has a fixed shape, so nothing synchronises with the host and ``torch.compile`` can trace it.
"""

from __future__ import annotations

import torch

KEY_BITS = 24
"""Scores are compared as integers ``floor(score · 2**KEY_BITS)`` (float32's uniform draws have 24 bits)."""

_LOW_BITS = 12
_HIGH_BITS = KEY_BITS - _LOW_BITS


def _bucket_of(cum: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row: the first bucket whose cumulative count reaches ``need``, and what is left to take in it."""
    j = torch.searchsorted(cum, need)
    before = torch.gather(cum, 1, (j - 1).clamp_min(0)).masked_fill_(j == 0, 0)
    return j, need - before


def smallest_k(scores: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mark, in each row, the ``k_b`` allowed positions with the smallest scores.

    Scores are compared as 24-bit keys ``floor(score · 2**24)``; equal keys go leftmost first. For independent
    uniform scores a tie at the threshold has probability about ``L / 2**24`` per row and only decides which of the
    tied positions is taken, so the chosen set is uniform for all practical purposes; the count is always exact.

    Args:
        scores: ``[B, L]`` float32 in ``[0, 1)``; overwritten (pass a fresh tensor).
        allowed: ``[B, L]`` bool; only these positions can be marked.
        k: ``[B]`` integer counts (clamped to ``[0, allowed count]``).

    Returns:
        ``[B, L]`` bool with exactly ``min(k_b, n_b)`` marked positions in row ``b``.
    """
    B, L = scores.shape
    device = scores.device
    i32 = torch.int32
    need = torch.minimum(k.to(i32).clamp_min(0), allowed.sum(1, dtype=i32))[:, None]
    # Disallowed positions get the key 2**24, past every real key, so they land in an extra bucket.
    keys = scores.mul_(float(1 << KEY_BITS)).masked_fill_(~allowed, float(1 << KEY_BITS)).long()
    ones = torch.ones(1, 1, dtype=i32, device=device).expand(B, L)
    high = keys >> _LOW_BITS
    hist = torch.zeros(B, (1 << _HIGH_BITS) + 1, dtype=i32, device=device)
    hist.scatter_add_(1, high, ones)
    j_high, need = _bucket_of(hist[:, : 1 << _HIGH_BITS].cumsum(1, dtype=i32), need)
    hist = torch.zeros(B, 1 << _LOW_BITS, dtype=i32, device=device)
    hist.scatter_add_(1, keys & ((1 << _LOW_BITS) - 1), (high == j_high).to(i32))
    j_low, need = _bucket_of(hist.cumsum(1, dtype=i32), need)
    threshold = (j_high << _LOW_BITS) | j_low
    tied = keys == threshold
    return (keys < threshold) | (tied & (tied.cumsum(1, dtype=i32) <= need))
