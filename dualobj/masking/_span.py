"""Span masking of whole batches: contiguous runs instead of isolated tokens.

Two families, both vectorised over the batch (no Python loop over rows or tokens) and seeded by ``generator``:

* Tiled spans (:class:`UniformSpans`, :class:`GeometricSpans`): each row is cut into consecutive spans whose lengths
  are drawn independently from the length distribution (a new span also starts wherever a run of maskable positions
  starts); spans are taken in a uniformly random order until the row's count is reached. This is how the paper's
  predecessor (GPT-BERT) masks, with lengths uniform on {1, 2, 3}; SpanBERT draws geometric lengths.
* T5 noise spans (:class:`T5Spans`): an exact number of noise tokens split into an exact number of non-adjacent
  spans, as T5's ``random_spans_noise_mask``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol, runtime_checkable

import torch

from dualobj import _random
from dualobj._errors import (
    check_bool,
    check_choice,
    check_finite,
    check_generator,
    check_int,
    check_number,
    check_probability,
    check_tensor,
    describe,
    fail,
    fail_type,
    validation_enabled,
)
from dualobj.masking._random import (
    ROUNDINGS,
    check_min_count,
    resolve_maskable,
    resolve_rate,
    resolve_shape,
    round_counts,
)
from dualobj.masking._select import EXCLUDED, random_keys, smallest_k


@runtime_checkable
class SpanLengths(Protocol):
    """A distribution of span lengths on ``{1, ..., max_length}``.

    ``pmf()`` returns the ``[max_length]`` float64 probabilities of lengths ``1..max_length`` (summing to 1);
    ``lengths(u)`` maps uniform draws ``u`` (any shape, float32 in ``[0, 1)``) to int64 lengths with that
    distribution (an inverse CDF). ``rounding`` is the default rounding of the masked count (see
    :func:`span_mask`). :func:`inverse_cdf` implements ``lengths`` for any ``pmf``.

    A distribution may also define ``sample(shape, *, generator, device)`` returning int64 lengths drawn directly;
    :func:`span_mask` then uses it instead of ``lengths`` of uniform draws (:class:`UniformSpans` does, with one
    ``randint``).
    """

    max_length: int
    rounding: str

    def pmf(self) -> torch.Tensor: ...

    def lengths(self, u: torch.Tensor) -> torch.Tensor: ...


def inverse_cdf(pmf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Lengths ``1..len(pmf)`` from uniform draws ``u`` by inverting the CDF of ``pmf`` (int64, shape of ``u``).

    Args:
        pmf: ``[n]`` floating probabilities of the lengths ``1..n``: finite, ``>= 0``, summing to 1 (values are
            checked while validation is on).
        u: uniform draws in [0, 1), any shape.
    """
    check_tensor("pmf", pmf, ndim=1, floating=True)
    check_tensor("u", u, floating=True)
    if pmf.numel() == 0:
        raise fail("pmf", "at least one probability", describe(pmf))
    if validation_enabled():
        check_finite("pmf", pmf)
        if bool((pmf < 0).any()):
            raise fail("pmf", "probabilities >= 0", f"a minimum of {float(pmf.min()):g}")
        total = float(pmf.double().sum())
        if abs(total - 1.0) > 1e-6:
            raise fail("pmf", "probabilities summing to 1", f"a sum of {total:g}")
    cdf = pmf.to(device=u.device, dtype=torch.float64).cumsum(0)[:-1]
    return torch.bucketize(u.double(), cdf, right=True) + 1


def _check_length(name: str, value: object) -> int:
    return check_int(name, value, low=1)


@dataclasses.dataclass(frozen=True)
class UniformSpans:
    """Span lengths uniform on ``{1, ..., max_length}`` (GPT-BERT and the paper's predecessor use ``max_length=3``).

    Mean length ``(max_length + 1) / 2``.
    """

    max_length: int = 3
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        _check_length("max_length", self.max_length)
        check_choice("rounding", self.rounding, ROUNDINGS)

    def pmf(self) -> torch.Tensor:
        """``[max_length]`` float64, all ``1 / max_length``."""
        return torch.full((self.max_length,), 1.0 / self.max_length, dtype=torch.float64)

    def lengths(self, u: torch.Tensor) -> torch.Tensor:
        """``floor(u · max_length) + 1``."""
        return (u * self.max_length).long().clamp_(0, self.max_length - 1) + 1

    def sample(
        self, shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device | str
    ) -> torch.Tensor:
        """Lengths drawn directly as uniform integers (what :func:`span_mask` uses: one pass, no inverse CDF)."""
        return _random.randint(1, self.max_length + 1, shape, generator=generator, device=device)


@dataclasses.dataclass(frozen=True)
class GeometricSpans:
    """Geometric span lengths ``P(ℓ) ∝ p (1 − p)^(ℓ − 1)`` restricted to ``{1, ..., max_length}``.

    With ``renormalize=True`` (SpanBERT) the distribution is truncated at ``max_length`` and renormalised: mean
    3.80 for ``p=0.2, max_length=10``. With ``renormalize=False`` (Megatron's T5 example) lengths are clipped, so
    ``max_length`` takes the whole tail: mean 4.46 for the same parameters.

    Args:
        p: success probability, ``0 < p < 1``.
        max_length: the largest span.
        renormalize: truncate and renormalise (True) or clip (False).
    """

    p: float = 0.2
    max_length: int = 10
    renormalize: bool = True
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        check_probability("p", self.p, low_open=True, high_open=True)
        _check_length("max_length", self.max_length)
        check_choice("rounding", self.rounding, ROUNDINGS)

    def pmf(self) -> torch.Tensor:
        """``[max_length]`` float64 probabilities of lengths ``1..max_length``."""
        lengths = torch.arange(self.max_length, dtype=torch.float64)
        probs = self.p * (1.0 - self.p) ** lengths
        if self.renormalize:
            return probs / probs.sum()
        probs[-1] = (1.0 - self.p) ** (self.max_length - 1)
        return probs

    def lengths(self, u: torch.Tensor) -> torch.Tensor:
        """Closed-form inverse CDF: ``1 + floor(log(1 − u·c) / log(1 − p))`` capped at ``max_length``, where
        ``c = 1 − (1 − p)^max_length`` when renormalised (so the cap is never needed) and 1 when clipped."""
        c = 1.0 - (1.0 - self.p) ** self.max_length if self.renormalize else 1.0
        x = torch.log1p(-u.double() * c) / math.log1p(-self.p)
        return x.long().clamp_(0, self.max_length - 1) + 1


@dataclasses.dataclass(frozen=True)
class T5Spans:
    """T5's span corruption: exact noise and span counts, spans never adjacent.

    In a row with ``n`` maskable positions, ``N = rounding(rate · n)`` noise tokens, clamped to ``[1, n − 1]`` as
    T5 does (so a row of ``n >= 2`` always gets at least one noise token, even at rate 0; T5 uses
    round-half-to-even, the default here) are split into ``S = max(1, round(N / mean_length))`` spans (at most
    ``n − N``, so that non-noise runs separate them). Noise and non-noise lengths are each a uniformly random
    composition; they alternate starting with non-noise, so the first maskable position is never noise and the
    last always is, unless ``random_roll`` rotates the pattern by a random offset (a span may then wrap around the
    row end and show as two runs with the same id).

    Args:
        mean_length: the mean span length μ (T5: 3).
        random_roll: rotate each row's pattern by a uniform offset.
        rounding: rounding of ``rate · n`` (``"round"`` as T5).
    """

    mean_length: float = 3.0
    random_roll: bool = False
    rounding: str = "round"

    def __post_init__(self) -> None:
        check_number("mean_length", self.mean_length, low=1.0)
        check_bool("random_roll", self.random_roll)
        check_choice("rounding", self.rounding, ROUNDINGS)


SPAN_SCHEMES: dict[str, type] = {"uniform": UniformSpans, "geometric": GeometricSpans, "t5": T5Spans}
"""String shortcuts for ``lengths=``: each maps to the class built with its defaults."""


def span_mask(
    tokens_or_shape: torch.Tensor | tuple[int, int],
    rate: float | torch.Tensor,
    *,
    lengths: SpanLengths | T5Spans | str = "uniform",
    maskable: torch.Tensor | None = None,
    rounding: str | None = None,
    min_count: int = 0,
    return_spans: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mask contiguous spans in every row of a batch at once.

    **Count.** Exact: row ``b`` gets exactly ``k_b = rounding(rate_b · n_b)`` masked positions (``n_b`` its
    maskable count), clamped to ``[min(min_count, n_b), n_b]`` (T5 spans: to ``[max(min_count, 1), n_b − 1]``, as
    T5).

    **Tiled spans** (:class:`UniformSpans`, :class:`GeometricSpans`): the row is tiled by spans with lengths drawn
    from ``lengths``, and spans are taken in a uniformly random order until ``k_b`` positions are masked; to hit
    ``k_b`` exactly, the last span taken is cut to its left part, so at most one span per row is shorter than
    drawn. Unmaskable positions (padding, special tokens, a prompt) are never masked: where they fall inside a span,
    its maskable pieces are taken or left together (as in the paper's code), and ``return_spans`` gives each piece
    its own id. Neighbouring chosen spans touch, so masked runs can be longer than ``max_length``.

    **T5 spans** (:class:`T5Spans`): see that class; the spans are laid over the row's maskable positions in order
    (contiguous whenever those positions are, e.g. with padding, leading specials or a prompt prefix).

    Args:
        tokens_or_shape: a ``[B, L]`` tensor (its shape and device are used) or a ``(B, L)`` tuple (CPU).
        rate: a number in [0, 1] or a ``[B]`` float tensor of per-row rates.
        lengths: a :class:`SpanLengths` (``UniformSpans``, ``GeometricSpans``), a :class:`T5Spans`, or one of
            ``"uniform"``, ``"geometric"``, ``"t5"`` for their defaults.
        maskable: ``[B, L]`` bool, positions allowed to be masked (all when ``None``).
        rounding: ``"stochastic"``, ``"floor"``, ``"round"`` or ``"ceil"``; ``None`` takes ``lengths.rounding``
            (stochastic for tiled spans, round-half-to-even for T5).
        min_count: lower bound on the count of rows with maskable positions.
        return_spans: also return the span ids.
        generator: the source of randomness (see :mod:`dualobj._random`).

    Returns:
        ``[B, L]`` bool mask (``True`` = masked); with ``return_spans`` also ``[B, L]`` int64 span ids: equal ids
        in a row mark one span, ids increase along the row, and unmasked positions get ``-1``.
    """
    if isinstance(lengths, str):
        check_choice("lengths", lengths, tuple(SPAN_SCHEMES))
        lengths = SPAN_SCHEMES[lengths]()
    tiled = not isinstance(lengths, T5Spans)
    if tiled and not (callable(getattr(lengths, "pmf", None)) and hasattr(lengths, "rounding")):
        raise fail_type("lengths", "a SpanLengths (UniformSpans, GeometricSpans), a T5Spans or a name",
                        describe(lengths))
    (B, L), device = resolve_shape(tokens_or_shape)
    rates = resolve_rate(rate, B, device)
    allowed = resolve_maskable(maskable, B, L, device)
    check_min_count(min_count)
    check_bool("return_spans", return_spans)
    check_generator("generator", generator)
    rounding = lengths.rounding if rounding is None else rounding
    check_choice("rounding", rounding, ROUNDINGS)
    n = allowed.sum(dim=1)
    k = round_counts(rates * n, rounding, generator=generator).clamp_min(min_count)
    if tiled:
        mask, ids = _tiled_spans(allowed, torch.minimum(k, n), lengths, generator, return_spans)
    else:
        noise = torch.minimum(k.clamp_min(1), (n - 1).clamp_min(0))  # T5: at least one, at most n - 1
        mask, ids = _t5_spans(allowed, n, noise, lengths, generator, _noise_bound(rate, min_count, L))
    return (mask, ids) if return_spans else mask


def _noise_bound(rate: float | torch.Tensor, min_count: int, L: int) -> int:
    """An upper bound on any row's noise count, from what is known on the host without reading the device: the
    rate when it is a number or a CPU tensor (any rounding of ``rate · n`` is at most ``ceil(rate · L)``), else L.

    It depends only on the arguments, never on where the batch lives, so a CPU generator draws the same numbers for
    a CPU and a CUDA batch.
    """
    if isinstance(rate, torch.Tensor):
        if rate.device.type != "cpu" or torch.compiler.is_compiling():
            return L
        rate = float(rate.max()) if rate.numel() else 0.0
    return max(1, min(L, max(math.ceil(float(rate) * L), min_count) + 1))


@functools.lru_cache(maxsize=64)
def _moments(lengths: SpanLengths) -> tuple[float, float]:
    """Mean and variance of a span-length distribution, from its ``pmf()`` (cached per distribution object)."""
    pmf = lengths.pmf().detach().to("cpu", torch.float64)
    support = torch.arange(1, pmf.numel() + 1, dtype=torch.float64)
    mean = float((pmf * support).sum())
    return mean, max(float((pmf * support**2).sum()) - mean**2, 0.0)


def _tiling_draws(lengths: SpanLengths, B: int, L: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """``[B, N]`` int64 span lengths whose running sum reaches ``L`` in every row, on the draw device.

    On the host, only about ``L / mean`` lengths are drawn (six standard deviations of the number of spans a row
    needs, plus a margin), and the rest of ``L`` only if some row is not covered yet; that check costs nothing
    there. Elsewhere (and under ``torch.compile``) ``L`` lengths are drawn, which always cover the row, so nothing
    synchronises.
    """
    draw_device = _random.draw_device(generator, device)

    def draw(n: int) -> torch.Tensor:
        sample = getattr(lengths, "sample", None)
        if callable(sample):
            out = sample((B, n), generator=generator, device=draw_device)
        else:
            out = lengths.lengths(_random.rand((B, n), generator=generator, device=draw_device))
        ok = isinstance(out, torch.Tensor) and tuple(out.shape) == (B, n) and not out.is_floating_point()
        ok = ok and out.dtype != torch.bool
        if ok and out.device.type == "cpu" and out.numel() and not torch.compiler.is_compiling():
            ok = bool(out.min() >= 1)
        if not ok:
            raise fail("lengths", f"span lengths as a [{B}, {n}] integer tensor of values >= 1", describe(out))
        return out.long()

    if draw_device.type != "cpu" or torch.compiler.is_compiling():
        return draw(L)
    try:
        mean, var = _moments(lengths)
    except TypeError:  # an unhashable user-defined distribution: no cache
        mean, var = _moments.__wrapped__(lengths)
    if not mean >= 1.0:  # not a distribution on {1, 2, ...}: draw the bound
        return draw(L)
    first = min(L, math.ceil(L / mean + 6.0 * math.sqrt(L * var / mean**3)) + 8)
    span_len = draw(first)
    if first < L and bool((span_len.sum(1) < L).any()):
        span_len = torch.cat([span_len, draw(L - first)], dim=1)
    return span_len


def _tiled_spans(
    allowed: torch.Tensor, k: torch.Tensor, lengths: SpanLengths, generator: torch.Generator | None,
    return_spans: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tile each row with spans, then take whole spans in random order (the last one cut) up to ``k``.

    Returns the mask and, with ``return_spans``, the span ids (``-1`` where not masked).
    """
    B, L = allowed.shape
    device = allowed.device
    span_len = _tiling_draws(lengths, B, L, generator, device)
    starts = span_len.cumsum(1).sub_(span_len).clamp_max_(L)  # where each span starts (L: past the row end)
    # The number of spans that start inside a row: read on the host for free, else bounded by L.
    on_host = starts.device.type == "cpu" and B > 0 and not torch.compiler.is_compiling()
    spans = int((starts < L).sum(1).max()) if on_host else L
    starts = starts.to(device, non_blocking=True)
    # scatter_add_ of int16 ones is several times faster than scatter_ of a bool value on CPU.
    boundary = torch.zeros(B, L + 1, dtype=torch.int16, device=device)
    boundary.scatter_add_(1, starts, torch.ones(starts.shape, dtype=torch.int16, device=device))
    tile = boundary[:, :L].cumsum(1)  # int64 span number of each position, from 1
    # One key per span, shared by its positions: taking the k smallest keys takes whole spans in key order, and
    # equal keys go leftmost first, so the span at the threshold is cut to its left part.
    keys = torch.gather(random_keys((B, spans + 1), generator=generator, device=device), 1, tile)
    mask = smallest_k(keys.masked_fill_(~allowed, EXCLUDED), k, work=tile)  # tile is not needed any more
    if not return_spans:
        return mask, None
    # Pieces of a span separated by unmaskable positions get their own ids.
    run_start = allowed.clone()
    run_start[:, 1:] &= ~allowed[:, :-1]
    ids = boundary[:, :L].bitwise_or_(run_start).cumsum(1).sub_(1)
    return mask, ids.masked_fill_(~mask, -1)


def _compositions(
    totals: torch.Tensor, parts: torch.Tensor, width: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniformly random compositions of ``totals[r]`` into ``parts[r]`` positive parts, as part-start markers.

    Returns ``[R, width]`` bool, ``True`` at index ``i < totals[r]`` where a part starts (index 0 whenever
    ``parts[r] >= 1``): ``parts[r] − 1`` cut points drawn without replacement from ``1..totals[r] − 1``.
    """
    R = totals.shape[0]
    index = torch.arange(width, device=totals.device)
    inner = (index >= 1) & (index < totals[:, None])
    keys = random_keys((R, width), generator=generator, device=totals.device).masked_fill_(~inner, EXCLUDED)
    cuts = smallest_k(keys, parts - 1)
    return cuts | ((index == 0) & (parts[:, None] >= 1))


def _t5_spans(
    allowed: torch.Tensor, n: torch.Tensor, noise: torch.Tensor, spec: T5Spans, generator: torch.Generator | None,
    noise_bound: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's noise mask laid over each row's maskable positions (compacted), with noise-span ids.

    ``noise_bound`` (at least every row's noise count) is the width of the noise composition: at a rate of 0.15 it
    is about a sixth of the row, which spares most of that composition's draws and selection work.
    """
    B, L = allowed.shape
    device = allowed.device
    spans = torch.round(noise.double() / spec.mean_length).long().clamp_min(1)
    spans = torch.minimum(spans, n - noise).masked_fill_(noise == 0, 0)
    clean = n - noise
    wn, wc = noise_bound, max(L, 1)
    noise_part = _compositions(noise, spans, wn, generator).cumsum(1).sub_(1)  # span of the i-th noise token
    clean_starts = _compositions(clean, spans, wc, generator)
    # clean_start[p]: index among non-noise tokens where non-noise part p starts (p = spans: the total).
    clean_start = clean[:, None].expand(B, wc + 2).clone()
    slot = torch.where(clean_starts, clean_starts.cumsum(1).sub_(1), wc + 1)
    clean_start.scatter_(1, slot, torch.arange(wc, device=device).expand(B, wc))
    # Noise token i follows all non-noise tokens of parts 0..noise_part[i].
    index = torch.arange(wn, device=device)
    is_noise = index[None, :] < noise[:, None]
    place = index[None, :] + torch.gather(clean_start, 1, (noise_part + 1).clamp_(0, wc + 1))
    place = torch.where(is_noise, place, L).clamp_max_(L)
    compact_ids = torch.full((B, L + 1), -1, dtype=torch.long, device=device)
    compact_ids.scatter_(1, place, torch.where(is_noise, noise_part, -1))
    compact_ids = compact_ids[:, :L]
    if spec.random_roll:
        offset = (_random.rand((B,), generator=generator, device=device, dtype=torch.float64) * n).long()
        positions = torch.arange(L, device=device)
        source = (positions[None, :] - offset[:, None]) % n.clamp_min(1)[:, None]
        compact_ids = torch.gather(compact_ids, 1, source)
    # Maskable position l is the c-th maskable position of its row, c = (maskable count up to l) - 1.
    rank = allowed.cumsum(1).sub_(1).clamp_min_(0)
    ids = torch.where(allowed, torch.gather(compact_ids, 1, rank), -1)
    return ids >= 0, ids
