"""Plug points of a masked objective: which positions to mask (a :class:`Masker`) and what they show
(a :class:`Corruption`)."""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch

from dualobj._errors import check_bool, check_choice, check_int, describe, fail, fail_type
from dualobj.masking._corrupt import check_vocab_range, corrupt
from dualobj.masking._random import ROUNDINGS, random_mask
from dualobj.masking._span import SPAN_SCHEMES, SpanLengths, T5Spans, span_mask


@runtime_checkable
class Masker(Protocol):
    """Chooses the positions to mask: ``masker(tokens, rate, *, maskable, generator) -> [B, L] bool``.

    ``tokens`` is the ``[B, L]`` int64 batch, ``rate`` a ``[B]`` float tensor (the mask rate of each row, from the
    noise schedule or a fixed rate), ``maskable`` the ``[B, L]`` bool positions that may be masked (the result must
    lie inside it) and ``generator`` the source of randomness. Any callable with this signature works; a masker
    may also define ``with_spans(...)`` (same arguments) returning ``(mask, span_ids)`` for per-span corruption.
    """

    def __call__(
        self,
        tokens: torch.Tensor,
        rate: torch.Tensor,
        *,
        maskable: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class RandomMasker:
    """Uniformly random positions: an exact count per row, or independent Bernoulli draws.

    A thin wrapper of :func:`~dualobj.masking.random_mask`.

    Args:
        exact: exactly ``rounding(rate · n)`` positions per row (True) or Bernoulli(``rate``) per position.
        rounding: ``"stochastic"`` (``E[k] = rate · n``), ``"floor"``, ``"round"`` or ``"ceil"``.
        min_count: at least this many masked positions in rows that have them (exact counts only).

    Example:
        >>> import torch
        >>> masker = RandomMasker(rounding="round")
        >>> tokens = torch.arange(20).reshape(2, 10)
        >>> mask = masker(tokens, torch.tensor([0.3, 0.5]), maskable=tokens >= 2, generator=torch.Generator())
        >>> mask.sum(1).tolist()  # round(0.3 · 8) and round(0.5 · 10) maskable positions
        [2, 5]
    """

    exact: bool = True
    rounding: str = "stochastic"
    min_count: int = 0

    def __post_init__(self) -> None:
        check_bool("exact", self.exact)
        check_choice("rounding", self.rounding, ROUNDINGS)
        check_int("min_count", self.min_count, low=0)
        if not self.exact and self.min_count:
            raise fail("min_count", "0 with exact=False (Bernoulli masking has no minimum count)", self.min_count)

    def __call__(
        self,
        tokens: torch.Tensor,
        rate: torch.Tensor,
        *,
        maskable: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return random_mask(tokens, rate, exact=self.exact, maskable=maskable, rounding=self.rounding,
                           min_count=self.min_count, generator=generator)


@dataclasses.dataclass(frozen=True)
class SpanMasker:
    """Contiguous spans: a wrapper of :func:`~dualobj.masking.span_mask`.

    Args:
        lengths: ``UniformSpans(...)``, ``GeometricSpans(...)``, ``T5Spans(...)``, any :class:`SpanLengths`, or one
            of ``"uniform"``, ``"geometric"``, ``"t5"`` for their defaults.
        rounding: rounding of ``rate · n`` (``None``: the distribution's own).
        min_count: at least this many masked positions in rows that have them.
    """

    lengths: SpanLengths | T5Spans | str = "uniform"
    rounding: str | None = None
    min_count: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.lengths, str):
            check_choice("lengths", self.lengths, tuple(SPAN_SCHEMES))
            object.__setattr__(self, "lengths", SPAN_SCHEMES[self.lengths]())
        elif not isinstance(self.lengths, T5Spans) and not (
            callable(getattr(self.lengths, "pmf", None)) and hasattr(self.lengths, "rounding")
        ):
            raise fail_type("lengths", "UniformSpans, GeometricSpans, T5Spans, a SpanLengths or a name",
                            describe(self.lengths))
        if self.rounding is not None:
            check_choice("rounding", self.rounding, ROUNDINGS)
        check_int("min_count", self.min_count, low=0)

    def __call__(
        self,
        tokens: torch.Tensor,
        rate: torch.Tensor,
        *,
        maskable: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return self.with_spans(tokens, rate, maskable=maskable, generator=generator, spans=False)[0]

    def with_spans(
        self,
        tokens: torch.Tensor,
        rate: torch.Tensor,
        *,
        maskable: torch.Tensor,
        generator: torch.Generator | None = None,
        spans: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mask and (with ``spans``) the ``[B, L]`` span ids (``-1`` where unmasked)."""
        out = span_mask(tokens, rate, lengths=self.lengths, maskable=maskable, rounding=self.rounding,
                        min_count=self.min_count, return_spans=spans, generator=generator)
        return out if spans else (out, None)


def run_ids(mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` int64 ids of the maximal runs of ``mask`` (increasing along each row, ``-1`` where unmasked)."""
    start = mask.clone()
    start[:, 1:] &= ~mask[:, :-1]
    return (start.cumsum(1) - 1).masked_fill_(~mask, -1)


@dataclasses.dataclass(frozen=True)
class Corruption:
    """What a masked position shows: BERT's rule is ``Corruption(random_p=0.1, keep_p=0.1, vocab_range=...)``.

    Of the masked positions, a share ``random_p`` shows a uniformly random id from ``vocab_range``, a share
    ``keep_p`` keeps its token, and the rest show the mask id; all of them are still scored. Built on
    :func:`~dualobj.masking.corrupt`.

    Args:
        random_p: probability of a random ordinary id.
        keep_p: probability of keeping the token.
        vocab_range: ``(low, high)``: random ids are drawn from ``low <= id < high`` (required when
            ``random_p > 0``; it must not contain the mask id).
        per_span: decide once per span instead of per token (SpanBERT, GPT-BERT). The spans are the masker's
            (``with_spans``) when it has them, else the maximal masked runs.
    """

    random_p: float = 0.1
    keep_p: float = 0.1
    vocab_range: tuple[int, int] | None = None
    per_span: bool = False

    def __post_init__(self) -> None:
        from dualobj._errors import check_probability

        random_p = check_probability("random_p", self.random_p)
        keep_p = check_probability("keep_p", self.keep_p)
        if random_p + keep_p > 1.0:
            raise fail("random_p + keep_p", "at most 1", f"{random_p} + {keep_p} = {random_p + keep_p}")
        if self.vocab_range is not None:
            object.__setattr__(self, "vocab_range", check_vocab_range(self.vocab_range))
        elif random_p > 0:
            raise fail("vocab_range", "a (low, high) range of ordinary ids when random_p > 0", None)
        check_bool("per_span", self.per_span)

    def __call__(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        *,
        mask_token_id: int,
        spans: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The ``[B, L]`` model inputs: ``tokens`` with the masked positions replaced."""
        if self.per_span and spans is None:
            spans = run_ids(mask)
        return corrupt(tokens, mask, mask_token_id=mask_token_id, random_p=self.random_p, keep_p=self.keep_p,
                       vocab_range=self.vocab_range, spans=spans if self.per_span else None, generator=generator)
