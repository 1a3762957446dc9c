"""The dual objective α·L_AR + (1 − α)·L_MD, realised over rows, steps, ranks or both."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction

import torch

from dualobj import _random
from dualobj._errors import check_choice, check_probability, describe, fail
from dualobj.objectives._ar import ARObjective
from dualobj.objectives._base import Objective, check_tokens
from dualobj.objectives._batch import Batch
from dualobj.objectives._ce import normalizer
from dualobj.objectives._md import MDObjective

SPLITS = ("rows", "both", "step", "rank")

AlphaLike = float | Callable[[int], float]


def rank_is_ar(alpha: float, *, rank: int, world_size: int, epoch: int) -> bool:
    r"""The paper's per-rank assignment: which data-parallel ranks run AR in ``epoch``, rotating every epoch.

    Write α = a/d in lowest terms (``d`` must divide ``world_size``, so ``α·W`` ranks run AR at every step). Rank
    ``r`` runs AR when ``(epoch + r) mod d < a``. Every step has exactly ``α·W`` AR ranks, and over any ``d``
    consecutive epochs each rank, and so each data shard, is seen ``a`` times under AR and ``d − a`` times under
    MD. The official code's rule (masked when ``(epoch + r) % den < num``, ``num/den = 1 − α``) is the same
    rotation with another starting epoch; here rank 0 starts on AR. The rotation period is ``d``, not ``W``: a
    shift by one rank per epoch over all ``W`` ranks would leave most shards under one objective for the few
    epochs of a typical run.

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
    check_probability("alpha", alpha)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise fail("world_size", "an int >= 1", describe(world_size))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise fail("rank", f"an int in [0, world_size={world_size})", describe(rank))
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise fail("epoch", "an int >= 0", describe(epoch))
    n_ar = round(alpha * world_size)
    if abs(n_ar - alpha * world_size) > 1e-6:
        raise fail("alpha", f"a multiple of 1/world_size = 1/{world_size} with split='rank'", alpha)
    share = Fraction(n_ar, world_size)
    return (epoch + rank) % share.denominator < share.numerator


class DualObjective(Objective):
    r"""Train one model on :math:`\alpha\,L_{AR} + (1-\alpha)\,L_{MD}`.

    Args:
        alpha: the AR weight α in [0, 1] (1 = pure AR, 0 = pure MD), or a callable ``step -> α``
            (see :mod:`dualobj.schedules`).
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
              AR, rotating each epoch (see :func:`rank_is_ar`). Needs ``steps_per_epoch``.
        ar_scale: multiplies the AR rows' weights. The official dual-objective code uses 2.0 (its effective AR
            share is then ``2α/(1 + α)``); the paper's formula and our default is 1.
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
        split: str = "rows",
        ar_scale: float = 1.0,
        steps_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        z_loss: float = 0.0,
        normalize: str = "valid",
    ) -> None:
        super().__init__(z_loss=z_loss, normalize=normalize)
        if not callable(alpha):
            check_probability("alpha", alpha)
        if not isinstance(md, MDObjective):
            raise fail("md", "an MDObjective", describe(md))
        if ar is not None and not isinstance(ar, ARObjective):
            raise fail("ar", "an ARObjective or None", describe(ar))
        check_choice("split", split, SPLITS)
        if isinstance(ar_scale, bool) or not isinstance(ar_scale, (int, float)) or not ar_scale > 0:
            raise fail("ar_scale", "a number > 0", describe(ar_scale))
        if split == "rank" and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise fail("steps_per_epoch", "an int >= 1 with split='rank'", describe(steps_per_epoch))
        self.alpha = alpha
        self.md = md
        self.ar = ar if ar is not None else ARObjective(pad_id=md.pad_id)
        self.split = split
        self.ar_scale = float(ar_scale)
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self.world_size = world_size

    def alpha_at(self, step: int) -> float:
        """α at ``step`` (checked to lie in [0, 1])."""
        value = self.alpha(step) if callable(self.alpha) else self.alpha
        return check_probability(f"alpha({step})" if callable(self.alpha) else "alpha", value)

    def _rank_and_world(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world = dist.get_world_size() if world is None else world
            else:
                rank = 0 if rank is None else rank
                world = 1 if world is None else world
        return rank, world

    def _both_factors(
        self, alpha: float, ar: Batch, md: Batch
    ) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """Row factors that make ``total / count`` of the stacked batch equal ``α·L_AR + (1−α)·L_MD`` exactly.

        With counts ``n_AR`` and ``n_MD`` under this objective's normaliser, AR weights get ``α·(n_AR+n_MD)/n_AR``
        and MD weights ``(1−α)·(n_AR+n_MD)/n_MD`` (``α`` and ``1−α`` for ``normalize="none"``, the plain sum).
        """
        if self.normalize == "none":
            return alpha, 1.0 - alpha
        n_ar = normalizer(ar, self.normalize)
        n_md = normalizer(md, self.normalize)
        both = n_ar + n_md
        return alpha * both / n_ar.clamp_min(1.0), (1.0 - alpha) * both / n_md.clamp_min(1.0)

    def _scaled(self, batch: Batch, factor: float | torch.Tensor) -> Batch:
        if isinstance(factor, float) and factor == 1.0:
            return batch
        B = batch.shape[0]
        scale = torch.ones(B, device=batch.weights.device) * factor
        if batch.scale is not None:
            scale = scale * batch.scale
        return dataclasses.replace(batch, weights=batch.weights * factor, scale=scale)

    def prepare(
        self,
        tokens: torch.Tensor,
        *,
        step: int = 0,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Build the mixed batch for ``step``.

        Args:
            tokens: ``[B, L]`` clean integer ids.
            step: the optimizer step (for a scheduled α, ``split="step"`` and ``split="rank"``).
            doc_ids: ``[B, L]`` document ids of packed rows.
            prompt_lengths: ``[B]`` prompt lengths (context only, never targets or masked).
            generator: the source of randomness.

        Returns:
            A :class:`Batch` of ``B`` rows (``2B`` for ``split="both"``); AR rows first.
        """
        B, _ = check_tokens(tokens, doc_ids, prompt_lengths)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise fail("step", "an int >= 0", describe(step))
        alpha = self.alpha_at(step)
        kw = {"doc_ids": doc_ids, "prompt_lengths": prompt_lengths, "generator": generator}

        if self.split == "both":
            ar = self.ar.prepare(tokens, **kw)
            md = self.md.prepare(tokens, **kw)
            f_ar, f_md = self._both_factors(alpha, ar, md)
            return Batch.cat([self._scaled(ar, f_ar * self.ar_scale), self._scaled(md, f_md)])
        if self.split == "rows":
            exact = alpha * B
            n_ar = math.floor(exact)
            frac = exact - n_ar
            if frac > 0 and float(_random.rand((), generator=generator, device="cpu")) < frac:
                n_ar += 1
            parts = []
            if n_ar > 0:
                parts.append(self._scaled(self.ar.prepare(tokens[:n_ar], **_rows(kw, 0, n_ar)), self.ar_scale))
            if n_ar < B:
                parts.append(self.md.prepare(tokens[n_ar:], **_rows(kw, n_ar, B)))
            return parts[0] if len(parts) == 1 else Batch.cat(parts)
        if self.split == "step":
            draw = float(_random.rand((), generator=generator, device="cpu"))
            use_ar = alpha >= 1.0 or (alpha > 0.0 and draw < alpha)
        else:
            rank, world = self._rank_and_world()
            use_ar = rank_is_ar(alpha, rank=rank, world_size=world, epoch=step // self.steps_per_epoch)
        if use_ar:
            return self._scaled(self.ar.prepare(tokens, **kw), self.ar_scale)
        return self.md.prepare(tokens, **kw)

    def __repr__(self) -> str:
        return (f"DualObjective(alpha={self.alpha!r}, split={self.split!r}, ar_scale={self.ar_scale}, "
                f"md={self.md!r})")


def _rows(kw: dict, start: int, stop: int) -> dict:
    out = dict(kw)
    for key in ("doc_ids", "prompt_lengths"):
        if out[key] is not None:
            out[key] = out[key][start:stop]
    return out
