"""The dual objective α·L_AR + (1 − α)·L_MD: the paper's two-component preset of :class:`Mixture`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dualobj._errors import check_int, check_number, check_probability, describe, fail, fail_type
from dualobj.objectives._ar import ARObjective
from dualobj.objectives._base import Normalize
from dualobj.objectives._md import MDObjective
from dualobj.objectives._mixture import SPLITS, Mixture, Split, rank_and_world, rank_component

__all__ = ["SPLITS", "AlphaLike", "DualObjective", "rank_is_ar"]

AlphaLike = float | Callable[[int], float]
"""α: a number in [0, 1] or a step schedule ``step -> α``."""


def rank_is_ar(alpha: float, *, rank: int, world_size: int, epoch: int) -> bool:
    r"""The paper's per-rank assignment: which data-parallel ranks run AR in ``epoch``, rotating every epoch.

    Write α = a/d in lowest terms (``d`` must divide ``world_size``, so ``α·W`` ranks run AR at every step). Rank
    ``r`` runs AR when ``(epoch + r) mod d < a``. Every step has exactly ``α·W`` AR ranks, and over any ``d``
    consecutive epochs each rank, and so each data shard, is seen ``a`` times under AR and ``d − a`` times under
    MD. The official code's rule (masked when ``(epoch + r) % den < num``, ``num/den = 1 − α``) is the same
    rotation with another starting epoch; here rank 0 starts on AR. The rotation period is ``d``, not ``W``: a
    shift by one rank per epoch over all ``W`` ranks would leave most shards under one objective for the few
    epochs of a typical run. :func:`rank_component` is the same rule for any number of components.

    Args:
        alpha: the AR share α in [0, 1]; ``α·world_size`` must be an integer.
        rank: this rank, in ``[0, world_size)``.
        world_size: the number of data-parallel ranks.
        epoch: the data epoch (``step // steps_per_epoch``), ``>= 0``.

    Returns:
        ``True`` when ``rank`` runs the AR objective in ``epoch``.

    Example:
        >>> [rank_is_ar(0.25, rank=r, world_size=8, epoch=0) for r in range(8)]
        [True, False, False, False, True, False, False, False]
        >>> [rank_is_ar(0.25, rank=0, world_size=8, epoch=e) for e in range(4)]
        [True, False, False, False]
    """
    alpha = check_probability("alpha", alpha)
    world = check_int("world_size", world_size, low=1)
    if check_int("rank", rank) < 0 or rank >= world:
        raise fail("rank", f"an int in [0, world_size={world})", repr(rank))
    check_int("epoch", epoch, low=0)
    n_ar = round(alpha * world)
    if abs(n_ar - alpha * world) > 1e-6:
        raise fail("alpha", f"a multiple of 1/world_size = 1/{world} with split='rank'", alpha)
    return rank_component([n_ar / world, 1.0 - n_ar / world], rank=rank, world_size=world, epoch=epoch) == 0


@dataclasses.dataclass(frozen=True)
class _OneMinus:
    """``step -> 1 − alpha(step)``: the MD weight of a scheduled α (picklable, unlike a lambda)."""

    alpha: Callable[[int], float]

    def __call__(self, step: int) -> float:
        return 1.0 - self.alpha(step)


class DualObjective(Mixture):
    r"""Train one model on :math:`\alpha\,L_{AR} + (1-\alpha)\,L_{MD}` (the paper's two-component :class:`Mixture`).

    The components are named ``"ar"`` and ``"md"``, in that order (AR rows come first in a ``"rows"`` batch).

    Args:
        alpha: the AR weight α in [0, 1] (1 = pure AR, 0 = pure MD), or a callable ``step -> α``
            (see :mod:`dualobj.schedules`). A scheduled α needs ``step`` in :meth:`prepare`.
        ar: the AR objective (default ``ARObjective(pad_id=md.pad_id)``).
        md: the MD objective (required: it knows the mask id).
        split: how α is realised, all with the same expected loss:

            - ``"rows"``: a share α of the rows is AR (causal, clean), the rest MD, in one forward pass. The AR
              row count ``⌊αB⌋ + Bernoulli(frac(αB))`` is stochastically rounded, so its expectation is ``αB``
              exactly. AR rows come first (a contiguous group, which attention exploits).
            - ``"both"``: every row twice (clean causal, then masked bidirectional): ``2B`` rows, two forward
              passes' worth of compute. The rows' weights are scaled so that the loss under this objective's
              ``normalize`` is exactly ``α·L_AR + (1 − α)·L_MD`` (each part normalised by its own count).
            - ``"step"``: the whole step is AR with probability α.
            - ``"rank"``: the paper's scheme: each data-parallel rank runs one objective, ``round(α·W)`` ranks
              AR, rotating each epoch (see :func:`rank_is_ar`). Needs ``steps_per_epoch`` and ``step``.
        ar_scale: multiplies the AR rows' weights (a finite number > 0). The official dual-objective code uses
            2.0 (its effective AR share is then ``2α/(1 + α)``); the paper's formula and our default is 1.
        steps_per_epoch: steps per data epoch, for ``split="rank"``.
        rank, world_size: for ``split="rank"``; read from ``torch.distributed`` when ``None``.
        z_loss, normalize: as for :class:`~dualobj.objectives.Objective`. The AR and MD objectives' own
            settings are not used by :meth:`loss` here: the dual objective scores the mixed batch once.
    """

    def __init__(
        self,
        alpha: AlphaLike,
        *,
        md: MDObjective,
        ar: ARObjective | None = None,
        split: Split = "rows",
        ar_scale: float = 1.0,
        steps_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        z_loss: float = 0.0,
        normalize: Normalize = "valid",
    ) -> None:
        if not callable(alpha):
            alpha = check_probability("alpha", alpha)
        if not isinstance(md, MDObjective):
            raise fail_type("md", "an MDObjective", describe(md))
        if ar is not None and not isinstance(ar, ARObjective):
            raise fail_type("ar", "an ARObjective or None", describe(ar))
        ar_scale = check_number("ar_scale", ar_scale, low=0.0, low_open=True)
        ar = ar if ar is not None else ARObjective(pad_id=md.pad_id)
        md_weight = _OneMinus(alpha) if callable(alpha) else 1.0 - alpha
        self.alpha = alpha  # read by weights_at, which the base constructor calls
        super().__init__(
            [("ar", ar, alpha), ("md", md, md_weight)],
            split=split,
            steps_per_epoch=steps_per_epoch,
            rank=rank,
            world_size=world_size,
            z_loss=z_loss,
            normalize=normalize,
        )
        self.md = md
        self.ar = ar
        self.ar_scale = ar_scale
        self._scales["ar"] = ar_scale

    def alpha_at(self, step: int | None) -> float:
        """α at ``step`` (checked to lie in [0, 1]; ``step`` may be ``None`` for a constant α)."""
        value = self.alpha(step) if callable(self.alpha) else self.alpha
        return check_probability(f"alpha({step})" if callable(self.alpha) else "alpha", value)

    def weights_at(self, step: int | None) -> list[float]:
        """``[α, 1 − α]`` at ``step``."""
        alpha = self.alpha_at(step)
        return [alpha, 1.0 - alpha]

    def _why_step(self) -> str | None:
        if callable(self.alpha):
            return "alpha is a step schedule"
        return super()._why_step()

    def _pick_rank(self, weights: list[float], epoch: int) -> int:
        rank, world = rank_and_world(self.rank, self.world_size)
        return 0 if rank_is_ar(weights[0], rank=rank, world_size=world, epoch=epoch) else 1

    def __repr__(self) -> str:
        return (f"DualObjective(alpha={self.alpha!r}, split={self.split!r}, ar_scale={self.ar_scale}, "
                f"md={self.md!r})")
