"""BERT-style replacement of masked positions: ``<mask>``, a random ordinary token, or the original token."""

from __future__ import annotations

import torch

from dualobj import _random
from dualobj._errors import (
    DualObjTypeError,
    check_generator,
    check_int,
    check_probability,
    check_tensor,
    describe,
    fail,
    fail_type,
    validation_enabled,
)


def check_vocab_range(vocab_range: object) -> tuple[int, int]:
    """Check a ``(low, high)`` pair of ints with ``0 <= low < high``; returns it as a tuple."""
    expected = "a (low, high) pair of ints with 0 <= low < high"
    if not (isinstance(vocab_range, (tuple, list)) and len(vocab_range) == 2):
        raise fail_type("vocab_range", expected, describe(vocab_range))
    try:
        low, high = (check_int("vocab_range", v) for v in vocab_range)
    except DualObjTypeError:
        raise fail_type("vocab_range", expected, describe(vocab_range)) from None
    if not 0 <= low < high:
        raise fail("vocab_range", expected, describe(vocab_range))
    return low, high


def corrupt(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    mask_token_id: int,
    random_p: float = 0.0,
    keep_p: float = 0.0,
    vocab_range: tuple[int, int] | None = None,
    spans: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace the masked positions of ``tokens``: BERT's 80/10/10 rule is ``random_p=0.1, keep_p=0.1``.

    Each masked position independently becomes a uniformly random id from ``vocab_range`` with probability
    ``random_p``, keeps its token with probability ``keep_p``, and becomes ``mask_token_id`` otherwise. Random ids
    come only from the ordinary vocabulary ``[low, high)``, never from special ids (Hugging Face's collator draws
    from the whole vocabulary, specials included). With ``spans`` the choice of the three is made once per span
    (SpanBERT's and GPT-BERT's per-span replacement), while random ids are still drawn per token. Unmasked
    positions are returned unchanged. One ``float64`` draw per position decides both the category and the id.

    Args:
        tokens: ``[B, L]`` integer ids.
        mask: ``[B, L]`` bool, ``True`` where a position is corrupted.
        mask_token_id: the id written at masked positions; must lie outside ``vocab_range``.
        random_p: probability of a random ordinary id, in [0, 1].
        keep_p: probability of keeping the original id, in [0, 1], with ``random_p + keep_p <= 1``.
        vocab_range: ``(low, high)``, the ordinary ids ``low <= id < high``; required when ``random_p > 0``.
        spans: optional ``[B, L]`` int64 span ids in ``[-1, L)`` (as returned by
            :func:`~dualobj.masking.span_mask` with ``return_spans=True``); positions with the same id get the same
            category.
        generator: the source of randomness (see :mod:`dualobj._random`).

    Returns:
        ``[B, L]`` ids of ``tokens``'s dtype and device.
    """
    check_tensor("tokens", tokens, ndim=2, integer=True)
    check_tensor("mask", mask, shape=tuple(tokens.shape), dtypes=(torch.bool,))
    check_int("mask_token_id", mask_token_id, low=0)
    check_generator("generator", generator)
    random_p = check_probability("random_p", random_p)
    keep_p = check_probability("keep_p", keep_p)
    if random_p + keep_p > 1.0:
        raise fail("random_p + keep_p", "at most 1", f"{random_p} + {keep_p} = {random_p + keep_p}")
    low, high = 0, 0
    if vocab_range is not None:
        low, high = check_vocab_range(vocab_range)
        if low <= mask_token_id < high:
            raise fail("mask_token_id", f"an id outside vocab_range=[{low}, {high})", mask_token_id)
    elif random_p > 0:
        raise fail("vocab_range", "a (low, high) range of ordinary ids when random_p > 0", None)
    B, L = tokens.shape
    mask = mask.to(tokens.device)
    if random_p == 0.0 and keep_p == 0.0:
        return torch.where(mask, mask_token_id, tokens)
    u = _random.rand((B, L), generator=generator, device=tokens.device, dtype=torch.float64)
    choice = u
    if spans is not None:
        check_tensor("spans", spans, shape=(B, L), integer=True)
        if validation_enabled() and spans.numel() and bool(((spans < -1) | (spans >= L)).any()):
            raise fail("spans", f"span ids in [-1, {L}) (-1 = not in a span)",
                       f"values in [{int(spans.min())}, {int(spans.max())}]")
        choice = torch.gather(u, 1, spans.to(tokens.device).long().clamp(0, max(L - 1, 0)))
        # The category is per span; the random id needs a fresh draw, scaled to look like u < random_p.
        u = _random.rand((B, L), generator=generator, device=tokens.device, dtype=torch.float64) * random_p
    out = torch.where(mask & (choice >= random_p + keep_p), mask_token_id, tokens)
    if random_p > 0:
        # Given u < random_p, u / random_p is uniform on [0, 1): it also picks the id.
        width = high - low
        ids = (u * (width / random_p)).to(tokens.dtype).clamp_max_(width - 1).add_(low)
        out = torch.where(mask & (choice < random_p), ids, out)
    return out
