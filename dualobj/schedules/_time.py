"""Time samplers: draw the noise level t of each MD row, with an importance weight.

A sampler estimates an expectation over ``t ~ U(t_min, t_max)``. Plain samplers return weight 1; the
importance sampler returns ``weight = (uniform density) / (its own density)`` so that ``E[weight · g(t)]`` is the
uniform expectation of ``g`` for every ``g``. Samplers draw on ``[0, 1]`` by default: the MD objective applies its
own truncation, on the mask rate (see :class:`dualobj.objectives.MDObjective`). For the ELBO evaluation with an
exact masked count there is :func:`sample_counts` (``k ~ U{1..n}``, weight ``n/k``).

Vocabulary: *stratified* means one draw in each of ``n`` equal strata (:class:`StratifiedSampler`,
``sample_counts(stratified=True)``); *antithetic* is kept for ``(u, 1 − u)`` pairs (the evaluation module).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from dualobj import _random
from dualobj._errors import (
    check_bool,
    check_int,
    check_number,
    check_tensor,
    fail,
    validation_enabled,
)


class TimeSample(NamedTuple):
    """``t``: ``[B]`` float32 noise levels; ``weight``: ``[B]`` float32 importance weights (1 for plain samplers)."""

    t: torch.Tensor
    weight: torch.Tensor


@runtime_checkable
class TimeSampler(Protocol):
    """Draws ``n`` noise levels: ``sampler(n, device=..., generator=...) -> TimeSample``."""

    def __call__(
        self, n: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimeSample: ...


def check_range(t_min: float, t_max: float) -> None:
    """Check ``0 <= t_min < t_max <= 1``."""
    check_number("t_min", t_min)
    check_number("t_max", t_max)
    if not (0.0 <= t_min < t_max <= 1.0):
        raise fail("(t_min, t_max)", "0 <= t_min < t_max <= 1", f"({t_min!r}, {t_max!r})")


def check_count(n: object) -> int:
    """Check a row count ``n >= 0``."""
    return check_int("n", n, low=0)


@dataclasses.dataclass(frozen=True)
class UniformSampler:
    """t ~ U(t_min, t_max) independently per row (default ``U(0, 1)``; the MD objective truncates on the rate).

    Args:
        t_min, t_max: the range, ``0 <= t_min < t_max <= 1``.

    Calling it with ``n`` returns a :class:`TimeSample` of ``[n]`` float32 tensors on ``device``.
    """

    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        check_range(self.t_min, self.t_max)
        object.__setattr__(self, "t_min", float(self.t_min))
        object.__setattr__(self, "t_max", float(self.t_max))

    def __call__(
        self, n: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimeSample:
        check_count(n)
        u = _random.rand((n,), generator=generator, device=device)
        t = (self.t_min + (self.t_max - self.t_min) * u).clamp(self.t_min, self.t_max)
        return TimeSample(t, torch.ones_like(t))


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The data-parallel rank and world size: the given ones, else ``torch.distributed``'s, else ``(0, 1)``."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (dist.get_world_size() if world_size is None
                                                              else world_size)
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


@dataclasses.dataclass(frozen=True)
class StratifiedSampler:
    """Stratified t: exactly one draw in each of ``n`` equal strata of ``[t_min, t_max)``, on every rank.

    Row ``i`` of a batch of ``n`` gets ``t_i = t_min + (t_max − t_min)·(s_i + v_i)/(n·W)`` with stratum
    ``s_i = i·W + r`` on data-parallel rank ``r`` of ``W``: the ranks interleave, so the *global* batch has one draw
    per stratum and each rank's rows still span the whole range. With ``shared=False`` each ``v_i ~ U(0, 1)``
    independently (MDLM's ``antithetic_sampling``, which is stratified sampling); with ``shared=True`` one ``v``
    per call (MD4's single shift, a randomised lattice). Each ``t_i`` is still marginally ``U(t_min, t_max)``, so
    every estimator stays unbiased, while the batch covers the whole range: the variance of the batch mean drops.
    Rows come out in increasing order of ``t``.

    Args:
        t_min, t_max: the range, ``0 <= t_min < t_max <= 1``.
        shared: one shift for the whole batch instead of one per stratum.
        rank, world_size: the data-parallel position (``None``: read from ``torch.distributed`` when it is
            initialised, else rank 0 of 1). Every rank must draw the same number of rows.

    Calling it with ``n`` returns a :class:`TimeSample` of ``[n]`` float32 tensors on ``device``.
    """

    t_min: float = 0.0
    t_max: float = 1.0
    shared: bool = False
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        check_range(self.t_min, self.t_max)
        object.__setattr__(self, "t_min", float(self.t_min))
        object.__setattr__(self, "t_max", float(self.t_max))
        check_bool("shared", self.shared)
        if self.world_size is not None:
            check_int("world_size", self.world_size, low=1)
        if self.rank is not None:
            check_int("rank", self.rank, low=0, high=None if self.world_size is None else self.world_size - 1)

    def __call__(
        self, n: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimeSample:
        check_count(n)
        rank, world = _rank_and_world(self.rank, self.world_size)
        if not 0 <= rank < world:
            raise fail("rank", f"an int in [0, {world - 1}] (world_size={world})", rank)
        v = _random.rand((1 if self.shared else n,), generator=generator, device=device, dtype=torch.float64)
        strata = max(n, 1) * world
        i = torch.arange(n, device=device, dtype=torch.float64) * world + rank
        width = self.t_max - self.t_min
        t64 = self.t_min + width * (i + v) / strata
        # Keep every float32 value inside its own stratum [lo_i, hi_i): round the edges inward.
        lo = self.t_min + width * i / strata
        hi = self.t_min + width * (i + 1.0) / strata
        lo32, hi32 = lo.float(), hi.float()
        lo32 = torch.where(lo32.double() < lo, torch.nextafter(lo32, torch.full_like(lo32, math.inf)), lo32)
        hi32 = torch.where(hi32.double() >= hi, torch.nextafter(hi32, torch.full_like(hi32, -math.inf)), hi32)
        t = torch.minimum(torch.maximum(t64.float(), lo32), hi32)
        return TimeSample(t, torch.ones_like(t))


@dataclasses.dataclass(frozen=True)
class KumaraswamySampler:
    r"""Importance sampling of t from a Kumaraswamy(a, b) density truncated to ``[t_min, t_max]``.

    Kumaraswamy is a Beta-like family with a closed-form inverse CDF, so it draws from any ``generator``:
    density :math:`q(t) = a b\, t^{a-1} (1 - t^a)^{b-1}`, CDF :math:`F(t) = 1 - (1 - t^a)^b`. ``a, b > 1`` gives a
    bell; ``a < 1`` puts more draws near ``t = 0``. Each row's weight is
    ``(1/(t_max − t_min)) / (q(t)/(F(t_max) − F(t_min)))``, the ratio of the uniform density to the truncated
    one, so ``E[weight · g(t)] = E_{U(t_min, t_max)}[g(t)]`` exactly (and ``E[weight] = 1``).

    Args:
        a, b: shape parameters, both ``> 0``.
        t_min, t_max: the range, ``0 <= t_min < t_max <= 1``.

    Calling it with ``n`` returns a :class:`TimeSample` of ``[n]`` float32 tensors on ``device``.
    """

    a: float = 1.0
    b: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), low=0.0, low_open=True))
        check_range(self.t_min, self.t_max)
        object.__setattr__(self, "t_min", float(self.t_min))
        object.__setattr__(self, "t_max", float(self.t_max))

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """F(t) ``[*]`` of the untruncated Kumaraswamy(a, b), for ``t`` ``[*]`` in [0, 1]."""
        return -torch.expm1(self.b * torch.log1p(-(t**self.a)))

    def log_density(self, t: torch.Tensor) -> torch.Tensor:
        """log q(t) ``[*]`` of the untruncated Kumaraswamy(a, b)."""
        return (
            math.log(self.a * self.b)
            + (self.a - 1.0) * torch.log(t)
            + (self.b - 1.0) * torch.log1p(-(t**self.a))
        )

    def __call__(
        self, n: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimeSample:
        check_count(n)
        u = _random.rand((n,), generator=generator, device=device, dtype=torch.float64)
        ends = torch.tensor([self.t_min, self.t_max], dtype=torch.float64, device=device)
        f_lo, f_hi = self.cdf(ends).unbind()
        p = f_lo + (f_hi - f_lo) * u
        # Inverse CDF: t = (1 − (1 − p)^{1/b})^{1/a}, in logs for accuracy near both ends.
        t = torch.exp(torch.log(-torch.expm1(torch.log1p(-p) / self.b)) / self.a)
        t = t.clamp(self.t_min, self.t_max)
        log_q = self.log_density(t.clamp_min(torch.finfo(torch.float64).tiny))
        weight = (f_hi - f_lo) / (self.t_max - self.t_min) * torch.exp(-log_q)
        return TimeSample(t.float(), weight.float())


class CountSample(NamedTuple):
    """Exact masked counts for the ELBO evaluation, each ``[B]``.

    ``count``: int64 ``k`` in ``{1..n}`` (0 where ``n = 0``); ``weight``: float32 ``n/k`` (0 where ``n = 0``);
    ``rate``: float32 ``k/n``, to pass to :func:`dualobj.masking.random_mask` with ``exact=True, rounding="round"``.
    """

    count: torch.Tensor
    weight: torch.Tensor
    rate: torch.Tensor


def sample_counts(
    n: torch.Tensor,
    *,
    stratified: bool = True,
    generator: torch.Generator | None = None,
) -> CountSample:
    r"""Draw how many of each row's ``n`` maskable tokens to mask, for the exact-count ELBO estimator.

    The finite-length negative ELBO of a row with ``n`` maskable tokens is
    :math:`\sum_{k=1}^{n} \frac{1}{k}\,\mathbb{E}_{|M|=k}\big[\sum_{i\in M} \mathrm{CE}_i\big]`, so with
    ``k ~ U{1..n}`` and exactly ``k`` uniformly chosen positions masked, ``(n/k)·Σ_{masked} CE`` is an unbiased
    estimate of it (LLaDA's likelihood evaluation). With ``stratified=True`` the batch is stratified:
    ``k_b = 1 + ⌊n_b·((v + b/B) mod 1)⌋`` with one shared ``v ~ U(0, 1)``, so ``B`` copies of the same row
    cover ``{1..n}`` evenly, and each ``k_b`` is still uniform on ``{1..n_b}``.

    Args:
        n: ``[B]`` integer maskable counts per row (``>= 0``).
        stratified: stratify the draws across the batch (True) or draw independently (False).
        generator: the source of randomness.

    Returns:
        :class:`CountSample` of ``[B]`` tensors on the device of ``n``.

    Example:
        >>> import torch
        >>> s = sample_counts(torch.tensor([4, 4, 4, 4]), generator=torch.Generator().manual_seed(0))
        >>> sorted(s.count.tolist())  # one draw per stratum of {1..4}
        [1, 2, 3, 4]
    """
    check_tensor("n", n, ndim=1, integer=True)
    check_bool("stratified", stratified)
    if validation_enabled() and n.numel() and bool((n < 0).any()):
        raise fail("n", "counts >= 0", f"min {n.min().item()}")
    B, device = n.shape[0], n.device
    if stratified:
        v = _random.rand((1,), generator=generator, device=device, dtype=torch.float64)
        u = torch.remainder(v + torch.arange(B, device=device, dtype=torch.float64) / max(B, 1), 1.0)
    else:
        u = _random.rand((B,), generator=generator, device=device, dtype=torch.float64)
    nf = n.double()
    count = torch.minimum(torch.floor(u * nf).long() + 1, n.long())
    empty = n <= 0
    count = torch.where(empty, 0, count)
    weight = torch.where(empty, 0.0, nf / count.clamp_min(1).double()).float()
    rate = torch.where(empty, 0.0, count.double() / nf.clamp_min(1.0)).float()
    return CountSample(count, weight, rate)
