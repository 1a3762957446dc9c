"""Random masking of whole batches: an exact count per row, or independent Bernoulli draws."""

from __future__ import annotations

import torch

from dualobj import _random
from dualobj._errors import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_number,
    check_tensor,
    describe,
    fail,
    validation_enabled,
)
from dualobj.masking._select import EXCLUDED, random_keys, smallest_k

ROUNDINGS = ("stochastic", "floor", "round", "ceil")


def resolve_shape(tokens_or_shape: torch.Tensor | tuple[int, int] | torch.Size) -> tuple[tuple[int, int], torch.device]:
    """``(B, L)`` and the device from a ``[B, L]`` tensor or a shape (CPU then)."""
    if isinstance(tokens_or_shape, torch.Tensor):
        check_tensor("tokens_or_shape", tokens_or_shape, ndim=2)
        B, L = tokens_or_shape.shape
        return (int(B), int(L)), tokens_or_shape.device
    shape = tuple(tokens_or_shape) if isinstance(tokens_or_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) != 2 or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise fail("tokens_or_shape", "a [B, L] tensor or a (B, L) tuple of ints", describe(tokens_or_shape))
    return (shape[0], shape[1]), torch.device("cpu")


def resolve_rate(rate: float | torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    """A ``[B]`` float64 rate on ``device`` from a number or a ``[B]`` tensor, checked to lie in [0, 1].

    Float64 keeps ``rate · n`` exact enough for ``"round"`` and ``"ceil"`` (``0.1 · 10`` is 1, not 1.0000001).
    """
    if isinstance(rate, torch.Tensor):
        if rate.ndim == 0:
            rate = rate.reshape(1).expand(B)
        check_tensor("rate", rate, shape=(B,), floating=True)
        if validation_enabled() and rate.numel() and bool(((rate < 0) | (rate > 1) | rate.isnan()).any()):
            raise fail("rate", "values in [0, 1]", f"min {rate.min().item():.4g}, max {rate.max().item():.4g}")
        return rate.to(device=device, dtype=torch.float64)
    check_number("rate", rate, low=0.0, high=1.0)
    return torch.full((B,), float(rate), device=device, dtype=torch.float64)


def resolve_maskable(maskable: torch.Tensor | None, B: int, L: int, device: torch.device) -> torch.Tensor:
    """The ``[B, L]`` bool ``maskable`` (all True when ``None``)."""
    if maskable is None:
        return torch.ones(B, L, dtype=torch.bool, device=device)
    check_tensor("maskable", maskable, shape=(B, L), dtypes=(torch.bool,))
    return maskable.to(device)


def round_counts(
    expected: torch.Tensor, rounding: str, *, generator: torch.Generator | None
) -> torch.Tensor:
    """Round non-negative expected counts ``[B]`` to int64; ``"stochastic"`` keeps the expectation exact."""
    check_choice("rounding", rounding, ROUNDINGS)
    if rounding == "stochastic":
        u = _random.rand(expected.shape, generator=generator, device=expected.device, dtype=expected.dtype)
        return torch.floor(expected + u).long()
    if rounding == "floor":
        return torch.floor(expected).long()
    if rounding == "ceil":
        return torch.ceil(expected).long()
    return torch.round(expected).long()


def random_mask(
    tokens_or_shape: torch.Tensor | tuple[int, int],
    rate: float | torch.Tensor,
    *,
    exact: bool = True,
    maskable: torch.Tensor | None = None,
    rounding: str = "stochastic",
    min_count: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose positions to mask in every row of a batch at once.

    With ``exact=True`` row ``b`` gets exactly ``k_b`` masked positions, chosen uniformly among its maskable ones,
    where ``k_b = rounding(rate_b · n_b)`` clamped to ``[min(min_count, n_b), n_b]`` and ``n_b`` is the row's
    maskable count. ``rounding="stochastic"`` (floor of ``rate·n + u``) makes ``E[k_b] = rate_b · n_b`` exactly
    (before ``min_count``). With ``exact=False`` each maskable position is masked independently with probability
    ``rate_b`` (Bernoulli; ``rounding`` and ``min_count`` do not apply).

    The exact count is the ``k_b`` smallest of one uniform 24-bit key per position, found by a radix selection
    (two per-row histograms, no sort, no host synchronisation on an accelerator; see
    :func:`dualobj.masking._select.smallest_k`). The count is always exactly ``k_b``; every ``k_b``-subset of the
    maskable positions is equally likely, up to ties between equal 24-bit keys (probability about ``L / 2**24``
    per row), which go to the leftmost position.

    Args:
        tokens_or_shape: a ``[B, L]`` tensor (its shape and device are used) or a ``(B, L)`` tuple (CPU).
        rate: a number in [0, 1] or a ``[B]`` float tensor of per-row rates.
        exact: exact count per row (True) or Bernoulli (False).
        maskable: ``[B, L]`` bool, positions allowed to be masked (all when ``None``).
        rounding: ``"stochastic"``, ``"floor"``, ``"round"`` or ``"ceil"``.
        min_count: lower bound on the count of rows with maskable positions (the paper's code uses 1).
        generator: the source of randomness (see :mod:`dualobj._random`).

    Returns:
        ``[B, L]`` bool mask, ``True`` = masked, on the device of ``tokens_or_shape``.
    """
    (B, L), device = resolve_shape(tokens_or_shape)
    rates = resolve_rate(rate, B, device)
    allowed = resolve_maskable(maskable, B, L, device)
    check_min_count(min_count)
    check_bool("exact", exact)
    check_generator("generator", generator)
    if not exact:
        u = _random.rand((B, L), generator=generator, device=device)
        return (u < rates.float()[:, None]) & allowed
    k = row_counts(rates, allowed, rounding, min_count, generator=generator)
    keys = random_keys((B, L), generator=generator, device=device).masked_fill_(~allowed, EXCLUDED)
    return smallest_k(keys, k)


def check_min_count(min_count: object) -> int:
    """Check ``min_count`` is an int >= 0."""
    return check_int("min_count", min_count, low=0)


def row_counts(
    rates: torch.Tensor,
    allowed: torch.Tensor,
    rounding: str,
    min_count: int,
    *,
    generator: torch.Generator | None,
    cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B]`` int64 counts: ``rounding(rate_b · n_b)`` clamped to ``[min(min_count, cap_b), cap_b]``.

    ``n_b`` is the allowed count of row ``b``; ``cap`` defaults to ``n``.
    """
    n = allowed.sum(dim=1)
    cap = n if cap is None else cap
    k = round_counts(rates * n, rounding, generator=generator)
    return torch.minimum(k.clamp_min(min_count), cap)


def count_mask(
    tokens_or_shape: torch.Tensor | tuple[int, int],
    counts: torch.Tensor,
    *,
    maskable: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask exactly ``min(counts[b], n_b)`` uniformly chosen maskable positions of each row ``b``.

    The same selection as :func:`random_mask` with ``exact=True``, given the counts instead of rates.

    Args:
        tokens_or_shape: a ``[B, L]`` tensor (its shape and device are used) or a ``(B, L)`` tuple (CPU).
        counts: ``[B]`` integer counts (negative counts mask nothing).
        maskable: ``[B, L]`` bool, positions allowed to be masked (all when ``None``).
        generator: the source of randomness (see :mod:`dualobj._random`).

    Returns:
        ``[B, L]`` bool mask on the device of ``tokens_or_shape``.

    Example:
        >>> import torch
        >>> count_mask((2, 6), torch.tensor([1, 4]), generator=torch.Generator().manual_seed(0)).sum(1).tolist()
        [1, 4]
    """
    (B, L), device = resolve_shape(tokens_or_shape)
    check_tensor("counts", counts, shape=(B,), integer=True)
    allowed = resolve_maskable(maskable, B, L, device)
    check_generator("generator", generator)
    keys = random_keys((B, L), generator=generator, device=device).masked_fill_(~allowed, EXCLUDED)
    return smallest_k(keys, counts.to(device))
