"""Mixtures of any objectives: Σ_i w_i·L_i over named components, realised over rows, steps, ranks or both."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Literal

import torch

from dualobj._errors import (
    DualObjError,
    check_choice,
    check_int,
    check_number,
    check_probability,
    describe,
    fail,
    fail_type,
)
from dualobj.objectives._base import (
    Normalize,
    Objective,
    ObjectiveProtocol,
    as_long,
    check_step,
    check_tokens,
    require_step,
)
from dualobj.objectives._batch import Batch
from dualobj.objectives._ce import normalizer

Split = Literal["rows", "both", "step", "rank"]
"""How a mixture is realised (see :class:`Mixture`)."""

SPLITS: tuple[Split, ...] = ("rows", "both", "step", "rank")

Weight = float | Callable[[int], float]
"""A component weight: a number in [0, 1] or a step schedule ``step -> weight`` (see :mod:`dualobj.schedules`)."""

_TOLERANCE = 1e-6  # how far the weights may sum from 1 (float rounding of schedules such as 1 - α)


def host_uniform(generator: torch.Generator | None) -> float:
    """One uniform draw in [0, 1) as a Python float, for a decision made on the host (row counts, which objective).

    With a CPU generator (or ``None``: the global CPU RNG) the draw is made on the CPU: no device tensor, no copy,
    no sync. A device generator (e.g. CUDA) keeps its seed and offset on the host: the draw is made on the CPU from
    a generator seeded by that pair, and the device generator's offset is advanced so the next call differs. Either
    way the same seed gives the same decisions, and no device work is waited for.

    Args:
        generator: the caller's generator or ``None``.
    """
    if generator is None or torch.device(generator.device).type == "cpu":
        return float(torch.rand((), generator=generator))
    seed, offset = generator.initial_seed(), generator.get_offset()
    generator.set_offset(offset + 4)  # Philox offsets advance in multiples of 4
    host = torch.Generator().manual_seed((seed * 1_000_003 + offset) % (2**63 - 1))
    return float(torch.rand((), generator=host))


def row_counts(weights: Sequence[float], rows: int, generator: torch.Generator | None) -> list[int]:
    """Split ``rows`` rows among components with shares ``weights`` (summing to 1), with exact expectations.

    Systematic rounding with one uniform draw ``u``: component ``i`` gets the rows between the rounded cumulative
    counts ``⌊C_{i-1} + v⌋`` and ``⌊C_i + v⌋``, where ``C_i = rows · Σ_{j≤i} w_j`` and ``v = 1 − u`` in (0, 1].
    Since ``E⌊C + v⌋ = C``, every component's expected row count is exactly ``w_i · rows``; each count is
    ``⌊w_i·rows⌋`` or ``⌈w_i·rows⌉``; the counts always sum to ``rows``. A component of weight 0 gets no rows. When
    every ``C_i`` is an integer, nothing is drawn. With two components this is the stochastic rounding
    ``⌊α·rows⌋ + Bernoulli(frac(α·rows))`` of the first count.

    Args:
        weights: ``k`` shares in [0, 1] summing to 1.
        rows: the number of rows ``B >= 0``.
        generator: the source of the one draw.

    Example:
        >>> row_counts([0.5, 0.25, 0.25], 8, None)
        [4, 2, 2]
    """
    cumulative, acc = [], 0.0
    for w in weights[:-1]:
        acc += w
        x = acc * rows
        cumulative.append(float(round(x)) if abs(x - round(x)) < 1e-9 else x)
    v = None
    if any(x != int(x) for x in cumulative):
        v = 1.0 - host_uniform(generator)
    bounds = [0]
    for x in cumulative:
        b = int(x) if x == int(x) else math.floor(x + v)
        bounds.append(min(max(b, bounds[-1]), rows))
    bounds.append(rows)
    return [b1 - b0 for b0, b1 in itertools.pairwise(bounds)]


def rank_component(weights: Sequence[float], *, rank: int, world_size: int, epoch: int) -> int:
    r"""Which component data-parallel ``rank`` runs in ``epoch``: the paper's rotation, for ``k`` components.

    Each weight must be a multiple of ``1/world_size``, so exactly ``w_i·W`` ranks run component ``i`` at every
    step. Write the weights over their least common denominator ``d`` (``w_i = a_i/d``; ``d`` divides ``W``). Rank
    ``r`` takes the slot ``s = (epoch + r) mod d`` and runs the component ``i`` with
    ``a_0 + … + a_{i−1} <= s < a_0 + … + a_i``. Over any ``d`` consecutive epochs every rank, and so every data
    shard, runs component ``i`` exactly ``a_i`` times. With two components ``[α, 1 − α]`` this is
    :func:`rank_is_ar`.

    Args:
        weights: ``k`` weights in [0, 1], summing to 1, each a multiple of ``1/world_size``.
        rank: this rank, in ``[0, world_size)``.
        world_size: the number of data-parallel ranks.
        epoch: the data epoch (``step // steps_per_epoch``), ``>= 0``.

    Returns:
        the index of the component ``rank`` runs.

    Example:
        >>> [rank_component([0.25, 0.5, 0.25], rank=r, world_size=4, epoch=0) for r in range(4)]
        [0, 1, 1, 2]
        >>> [rank_component([0.25, 0.5, 0.25], rank=0, world_size=4, epoch=e) for e in range(4)]
        [0, 1, 1, 2]
    """
    world = check_int("world_size", world_size, low=1)
    if check_int("rank", rank) < 0 or rank >= world:
        raise fail("rank", f"an int in [0, world_size={world})", repr(rank))
    check_int("epoch", epoch, low=0)
    counts = []
    for i, w in enumerate(weights):
        w = check_probability(f"weights[{i}]", w)
        n = round(w * world)
        if abs(n - w * world) > _TOLERANCE:
            raise fail("weights", f"multiples of 1/world_size = 1/{world} with split='rank'", list(weights))
        counts.append(n)
    if sum(counts) != world:
        raise fail("weights", "weights summing to 1", list(weights))
    shares = [Fraction(n, world) for n in counts]
    d = math.lcm(*(s.denominator for s in shares))
    slot = (epoch + rank) % d
    acc = 0
    for i, share in enumerate(shares):
        acc += int(share * d)
        if slot < acc:
            return i
    raise AssertionError("unreachable: the slots cover [0, d)")  # pragma: no cover


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else ``torch.distributed``'s, else ``(0, 1)``."""
    dist = torch.distributed
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    return rank, world_size


def scaled(batch: Batch, factor: float | torch.Tensor) -> Batch:
    """``batch`` with its weights multiplied by ``factor`` and the factor recorded in ``scale`` (for metrics)."""
    if isinstance(factor, float) and factor == 1.0:
        return batch
    B = batch.shape[0]
    scale = torch.ones(B, device=batch.weights.device) * factor
    if batch.scale is not None:
        scale = scale * batch.scale
    return dataclasses.replace(batch, weights=batch.weights * factor, scale=scale)


def _rows(kw: dict, start: int, stop: int) -> dict:
    out = dict(kw)
    for key in ("doc_ids", "prompt_lengths"):
        if out[key] is not None:
            out[key] = out[key][start:stop]
    return out


Components = Mapping[str, tuple[ObjectiveProtocol, Weight]] | Sequence[tuple[str, ObjectiveProtocol, Weight]]


class Mixture(Objective):
    r"""Train one model on :math:`\sum_i w_i\,L_i` over named objectives.

    Each component is an objective (anything with ``prepare`` and ``loss``: the built-in objectives, another
    mixture, a user's class) with a weight: a number in [0, 1] or a step schedule ``step -> weight``. The weights
    sum to 1 (checked at construction for numbers, and at every step when one is a schedule). Every split has the
    expected loss :math:`\sum_i w_i L_i`:

    - ``"rows"``: component ``i`` gets a share ``w_i`` of the rows, in one forward pass, in the order given. Row
      counts are rounded systematically (:func:`row_counts`), so their expectations are ``w_i·B`` exactly.
      Components must return rows of the input's shape ``[n, L]`` and one attention layout; others (for example an
      objective that doubles a row, such as :class:`~dualobj.objectives.BlockDiffusionObjective` with its rows
      ``[x_t ; x_0]``) are refused with a :class:`~dualobj.DualObjError` naming ``split``: use ``"step"`` or
      ``"rank"`` for them (AR plus block diffusion, the Fast-dLLM v2 / SDAR recipe, is
      ``Mixture({"ar": (ARObjective(), 0.5), "bd": (bd, 0.5)}, split="step")``).
    - ``"both"``: every component sees all rows (``k·B`` rows, ``k`` forward passes' worth). Weights are scaled so
      that the loss under this mixture's ``normalize`` is exactly :math:`\sum_i w_i L_i`, each :math:`L_i`
      normalised by its own count. Same row-shape rule as ``"rows"``.
    - ``"step"``: the whole step runs component ``i`` with probability ``w_i``.
    - ``"rank"``: each data-parallel rank runs one component, ``w_i·W`` ranks each, rotating every epoch
      (:func:`rank_component`); the weights must be multiples of ``1/W``. Needs ``steps_per_epoch``.

    ``prepare`` needs ``step`` when a weight is a schedule or ``split="rank"`` (it raises
    :class:`~dualobj.DualObjError` naming ``step`` otherwise). With constant weights, ``"rows"``, ``"both"`` and
    ``"step"`` do not depend on the step, and ``step`` may be left out.

    The mixture scores its batch once with its own ``z_loss`` and ``normalize``; the components' own settings of
    these are not used. Metrics: ``"<name>/loss"`` and ``"<name>/tokens"`` for every component (always present;
    0 for a component with no rows this step), besides the per-kind ``"ar/*"``, ``"md/*"`` and ``"accuracy"``.
    A component named ``"ar"`` or ``"md"`` takes over those keys.

    Args:
        components: ``{name: (objective, weight)}`` or a sequence of ``(name, objective, weight)``. Names are
            non-empty, distinct, without ``"/"``.
        split: ``"rows"`` (default), ``"both"``, ``"step"`` or ``"rank"``.
        steps_per_epoch: steps per data epoch, for ``split="rank"``.
        rank, world_size: for ``split="rank"``; read from ``torch.distributed`` when ``None``.
        z_loss, normalize: as for :class:`~dualobj.objectives.Objective`.

    Example:
        >>> import torch
        >>> from dualobj.objectives import ARObjective, MDObjective
        >>> mix = Mixture({"ar": (ARObjective(), 0.5), "md": (MDObjective(3, num_special=4), 0.5)})
        >>> batch = mix.prepare(torch.randint(4, 16, (4, 8)), generator=torch.Generator().manual_seed(0))
        >>> batch.causal.tolist(), batch.component_counts()
        ([True, True, False, False], (('ar', 2), ('md', 2)))
    """

    def __init__(
        self,
        components: Components,
        *,
        split: Split = "rows",
        steps_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        z_loss: float = 0.0,
        normalize: Normalize = "valid",
    ) -> None:
        super().__init__(z_loss=z_loss, normalize=normalize)
        triples = self._parse(components)
        check_choice("split", split, SPLITS)
        if split == "rank" or steps_per_epoch is not None:  # required by "rank", checked whenever given
            steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, low=1)
        if rank is not None:
            check_int("rank", rank, low=0)
        if world_size is not None:
            check_int("world_size", world_size, low=1)
            if rank is not None and rank >= world_size:
                raise fail("rank", f"an int in [0, world_size={world_size})", repr(rank))
        self.names = tuple(name for name, _, _ in triples)
        self.objectives = {name: obj for name, obj, _ in triples}
        self.weights = {name: w for name, _, w in triples}
        self.split = split
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self.world_size = world_size
        self._scales = dict.fromkeys(self.names, 1.0)
        if not self.scheduled:
            self.weights_at(None)  # constant weights: check that they sum to 1 now

    @staticmethod
    def _parse(components: object) -> list[tuple[str, ObjectiveProtocol, Weight]]:
        if isinstance(components, Mapping):
            items = []
            for name, value in components.items():
                if not isinstance(value, tuple) or len(value) != 2:
                    raise fail_type(f"components[{name!r}]", "an (objective, weight) pair", describe(value))
                items.append((name, *value))
        elif isinstance(components, Sequence) and not isinstance(components, str):
            items = []
            for i, value in enumerate(components):
                if not isinstance(value, tuple) or len(value) != 3:
                    raise fail_type(f"components[{i}]", "a (name, objective, weight) triple", describe(value))
                items.append(value)
        else:
            raise fail_type("components", "a mapping {name: (objective, weight)} or a sequence of "
                            "(name, objective, weight)", describe(components))
        if not items:
            raise fail("components", "at least one component", "none")
        seen: set[str] = set()
        out = []
        for name, objective, weight in items:
            if not isinstance(name, str) or not name or "/" in name:
                raise fail("components", "names that are non-empty strings without '/'", repr(name))
            if name in seen:
                raise fail("components", "distinct names", f"{name!r} twice")
            seen.add(name)
            if isinstance(objective, type) or not isinstance(objective, ObjectiveProtocol):
                raise fail_type(f"components[{name!r}]", "an objective (with prepare and loss)", describe(objective))
            if not callable(weight):
                weight = check_number(f"weights[{name!r}]", weight, low=0.0, high=1.0)
            out.append((name, objective, weight))
        return out

    @property
    def scheduled(self) -> bool:
        """Whether a weight is a step schedule (then ``prepare`` needs ``step``)."""
        return any(callable(w) for w in self.weights.values())

    def _why_step(self) -> str | None:
        """Why ``prepare`` needs ``step``, or ``None`` when it does not."""
        for name, w in self.weights.items():
            if callable(w):
                return f"the weight of {name!r} is a step schedule"
        if self.split == "rank":
            return "split='rank' rotates with the epoch"
        return None

    def weights_at(self, step: int | None) -> list[float]:
        """The weights at ``step`` (in component order), checked to lie in [0, 1] and to sum to 1.

        Args:
            step: the step (``None`` only when every weight is a number).
        """
        values = []
        for name, w in self.weights.items():
            if callable(w):
                values.append(check_probability(f"weights[{name!r}]({step})", w(step)))
            else:
                values.append(w)
        total = math.fsum(values)
        if abs(total - 1.0) > _TOLERANCE:
            where = "" if step is None or not self.scheduled else f" at step {step}"
            raise fail("weights", f"weights summing to 1{where}",
                       f"{dict(zip(self.names, values))} (sum {total:.6g})")
        return values

    def _pick_rank(self, weights: list[float], epoch: int) -> int:
        rank, world = rank_and_world(self.rank, self.world_size)
        return rank_component(weights, rank=rank, world_size=world, epoch=epoch)

    def _both_factors(self, weights: list[float], batches: list[Batch]) -> list[float | torch.Tensor]:
        """Factors that make ``total / count`` of the stacked batch equal ``Σ w_i·L_i`` exactly.

        With counts ``n_i`` under this mixture's normaliser and ``N = Σ n_i``, component ``i``'s weights get
        ``w_i·N/n_i`` (``w_i`` for ``normalize="none"``, the plain sum).
        """
        if self.normalize == "none":
            return list(weights)
        counts = [normalizer(b, self.normalize) for b in batches]
        both = sum(counts[1:], counts[0])
        return [w * both / n.clamp_min(1.0) for w, n in zip(weights, counts)]

    def _label(self, batch: Batch, counts: list[int]) -> Batch:
        """``batch`` with its rows' component indices (``counts[i]`` rows of component ``i``, in order)."""
        # built from host integers: a constant under torch.compile, no device op
        index = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], dtype=torch.int64)
        return dataclasses.replace(batch, component=index, component_names=self.names)

    def _concat(self, parts: list[Batch], counts: list[int]) -> Batch:
        try:
            batch = parts[0] if len(parts) == 1 else Batch.cat(parts)
        except DualObjError as err:
            raise fail("split", f"components whose batches stack into one (split={self.split!r}); use split='step' "
                       "or 'rank' for components with another row length or attention layout", str(err)) from err
        return self._label(batch, counts)

    def _check_rows(self, name: str, batch: Batch, rows: int, length: int) -> None:
        if tuple(batch.shape) != (rows, length):
            raise fail("split", f"components whose batches keep the rows' shape [{rows}, {length}] with "
                       f"split={self.split!r}; use split='step' or 'rank' for component {name!r}",
                       f"shape {list(batch.shape)}")

    def prepare(
        self,
        tokens: torch.Tensor,
        *,
        step: int | None = None,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Build the mixed batch for ``step``.

        Args:
            tokens: ``[B, L]`` clean ids of any integer dtype.
            step: the optimizer step; required when a weight is a schedule or ``split="rank"``.
            doc_ids: ``[B, L]`` document ids of packed rows.
            prompt_lengths: ``[B]`` prompt lengths (context only, never targets or masked).
            generator: the source of randomness.

        Returns:
            A :class:`Batch` whose ``component`` / ``component_names`` name each row's component: ``B`` rows
            (``k·B`` for ``split="both"``), components in the order given.
        """
        B, L = check_tokens(tokens, doc_ids, prompt_lengths, values=False)  # the components check the values
        why = self._why_step()
        step = check_step(step) if why is None else require_step(step, why)
        weights = self.weights_at(step)
        tokens, doc_ids = tokens.long(), as_long(doc_ids)
        kw = {"step": step, "doc_ids": doc_ids, "prompt_lengths": prompt_lengths, "generator": generator}

        if self.split == "both":
            parts = []
            for name in self.names:
                part = self.objectives[name].prepare(tokens, **kw)
                self._check_rows(name, part, B, L)
                parts.append(part)
            factors = self._both_factors(weights, parts)
            parts = [scaled(p, f * self._scales[n]) for p, f, n in zip(parts, factors, self.names)]
            return self._concat(parts, [B] * len(self.names))
        if self.split == "rows":
            counts = row_counts(weights, B, generator)
            parts, start = [], 0
            for name, n in zip(self.names, counts):
                if n > 0:
                    part = self.objectives[name].prepare(tokens[start : start + n], **_rows(kw, start, start + n))
                    self._check_rows(name, part, n, L)
                    parts.append(scaled(part, self._scales[name]))
                start += n
            return self._concat(parts, counts)
        if self.split == "step":
            u = host_uniform(generator)
            chosen = max(i for i, w in enumerate(weights) if w > 0)  # when rounding leaves u past the last sum
            acc = 0.0
            for i, w in enumerate(weights[:-1]):
                acc += w
                if u < acc:
                    chosen = i
                    break
        else:
            chosen = self._pick_rank(weights, step // self.steps_per_epoch)
        name = self.names[chosen]
        batch = scaled(self.objectives[name].prepare(tokens, **kw), self._scales[name])
        rows = batch.shape[0]
        return self._label(batch, [rows if n == name else 0 for n in self.names])

    def __repr__(self) -> str:
        parts = ", ".join(f"{n!r}: ({self.objectives[n]!r}, {self.weights[n]!r})" for n in self.names)
        return f"Mixture({{{parts}}}, split={self.split!r})"
