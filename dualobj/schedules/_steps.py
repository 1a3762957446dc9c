"""Step schedules: plain callables ``step -> value in [0, 1]`` for an objective weight (α) or a mask rate.

These are functions of the *training step*. They are not the noise schedules of :mod:`dualobj.schedules._noise`
(``LinearSchedule``, ``CosineSchedule``: functions of the diffusion time ``t``); the ramps are called
:func:`linear_ramp` and :func:`cosine_ramp` so the two families cannot be confused.

Every schedule is a pure function of the step (no state), so resuming from a checkpoint at step ``s`` gives
exactly the value the uninterrupted run had. They are small frozen dataclasses: picklable, comparable, and
their ``repr`` is the call that builds them, which logs well.

Used for α in :class:`dualobj.objectives.DualObjective` (``alpha=linear_ramp(1.0, 0.5, 10_000)``), for the weights of a
:class:`dualobj.objectives.Mixture`,, and for any
other rate in [0, 1], for example an MLM mask rate annealed from 30% to 15% (``linear_ramp(0.30, 0.15, 10_000)``).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import torch

from dualobj._errors import check_int, check_number, check_probability, describe, fail, fail_type

StepSchedule = Callable[[int], float]
"""A schedule: ``step (int >= 0) -> value (float in [0, 1])``."""


def check_step(step: object) -> float:
    """Check a step: a number ``>= 0`` (an int, a float for fractional epochs, or a 0-d tensor)."""
    if isinstance(step, torch.Tensor) and step.ndim == 0 and not step.dtype == torch.bool:
        step = step.item()
    value = check_number("step", step, finite=False)
    if not 0 <= value < math.inf:
        raise fail("step", "a finite number >= 0", describe(step))
    return value


def _check_steps(name: str, value: object, *, allow_zero: bool = False) -> int:
    return check_int(name, value, low=0 if allow_zero else 1)


def _progress(step: float, begin: int, steps: int) -> float:
    """Fraction of ``[begin, begin + steps]`` done at ``step``, clipped to [0, 1]."""
    return min(max((step - begin) / steps, 0.0), 1.0)


@dataclasses.dataclass(frozen=True, repr=False)
class Constant:
    """``step -> value`` for every step (made by :func:`constant`)."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check_probability("value", self.value))

    def __call__(self, step: int) -> float:
        check_step(step)
        return self.value

    def __repr__(self) -> str:
        return f"constant({self.value!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class _Ramp:
    """A move from ``start`` to ``end`` over ``[begin, begin + steps]``; subclasses give its shape."""

    start: float
    end: float
    steps: int
    begin: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", check_probability("start", self.start))
        object.__setattr__(self, "end", check_probability("end", self.end))
        _check_steps("steps", self.steps)
        _check_steps("begin", self.begin, allow_zero=True)


@dataclasses.dataclass(frozen=True, repr=False)
class LinearRamp(_Ramp):
    """Linear interpolation from ``start`` to ``end`` over ``[begin, begin + steps]`` (made by :func:`linear_ramp`)."""

    def __call__(self, step: int) -> float:
        p = _progress(check_step(step), self.begin, self.steps)
        return self.start + (self.end - self.start) * p

    def __repr__(self) -> str:
        return f"linear_ramp({self.start!r}, {self.end!r}, steps={self.steps}, begin={self.begin})"


@dataclasses.dataclass(frozen=True, repr=False)
class CosineRamp(_Ramp):
    """Half-cosine from ``start`` to ``end`` over ``[begin, begin + steps]`` (made by :func:`cosine_ramp`)."""

    def __call__(self, step: int) -> float:
        p = _progress(check_step(step), self.begin, self.steps)
        return self.start + (self.end - self.start) * 0.5 * (1.0 - math.cos(math.pi * p))

    def __repr__(self) -> str:
        return f"cosine_ramp({self.start!r}, {self.end!r}, steps={self.steps}, begin={self.begin})"


@dataclasses.dataclass(frozen=True, repr=False)
class Join:
    """Schedule ``i`` runs from ``boundaries[i-1]`` on, fed the steps since its boundary (made by :func:`join`)."""

    schedules: tuple[StepSchedule, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        schedules, boundaries = tuple(self.schedules), tuple(self.boundaries)
        if not schedules:
            raise fail("schedules", "at least one schedule", "an empty sequence")
        for i, s in enumerate(schedules):
            if not callable(s):
                raise fail_type(f"schedules[{i}]", "a callable step -> value", describe(s))
        if len(boundaries) != len(schedules) - 1:
            raise fail("boundaries", f"{len(schedules) - 1} boundaries for {len(schedules)} schedules",
                       f"{len(boundaries)}: {list(boundaries)}")
        for b in boundaries:
            _check_steps("boundaries", b, allow_zero=True)
        if any(b0 >= b1 for b0, b1 in itertools.pairwise(boundaries)):
            raise fail("boundaries", "strictly increasing ints", list(boundaries))
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "boundaries", boundaries)

    def __call__(self, step: int) -> float:
        s = check_step(step)
        i = bisect.bisect_right(self.boundaries, s)
        offset = self.boundaries[i - 1] if i else 0
        local = step - offset if isinstance(step, int) and not isinstance(step, bool) else s - offset
        value = self.schedules[i](local)
        return check_probability(f"schedules[{i}]({local})", value)

    def __repr__(self) -> str:
        return f"join({list(self.schedules)!r}, {list(self.boundaries)!r})"


def constant(value: float) -> Constant:
    """The schedule that is ``value`` at every step.

    Args:
        value: a number in [0, 1].

    Returns:
        a callable ``step -> float``.
    """
    return Constant(value)


def linear_ramp(start: float, end: float, steps: int, *, begin: int = 0) -> LinearRamp:
    """``start`` until ``begin``, then a straight line to ``end`` at ``begin + steps``, then ``end``.

    Args:
        start, end: values in [0, 1].
        steps: length of the ramp (int >= 1).
        begin: first step of the ramp (int >= 0).

    Returns:
        a callable ``step -> float``.

    Example:
        >>> s = linear_ramp(0.30, 0.15, steps=100)  # an MLM mask rate, 30% -> 15%
        >>> round(s(0), 6), round(s(50), 6), round(s(1000), 6)
        (0.3, 0.225, 0.15)
    """
    return LinearRamp(start, end, steps, begin)


def cosine_ramp(start: float, end: float, steps: int, *, begin: int = 0) -> CosineRamp:
    """Like :func:`linear_ramp` but along a half cosine: ``start + (end − start)·(1 − cos(π·p))/2``, ``p`` the progress.

    Args:
        start, end: values in [0, 1].
        steps: length of the ramp (int >= 1).
        begin: first step of the ramp (int >= 0).

    Returns:
        a callable ``step -> float``.
    """
    return CosineRamp(start, end, steps, begin)


def warmup(value: float, steps: int, *, start: float = 0.0) -> LinearRamp:
    """Ramp linearly from ``start`` to ``value`` over the first ``steps`` steps, then stay at ``value``.

    For α this can, for example, start pure AR (``start=1.0``) and bring in the MD share gradually.

    Args:
        value: the value after the warm-up, in [0, 1].
        steps: warm-up length (int >= 1).
        start: the value at step 0, in [0, 1].

    Returns:
        a callable ``step -> float``.
    """
    return LinearRamp(start, value, steps, 0)


def join(schedules: Sequence[StepSchedule], boundaries: Sequence[int]) -> Join:
    """Chain schedules: ``schedules[i]`` is used on ``[boundaries[i-1], boundaries[i])``.

    As in optax's ``join_schedules``, each schedule is called with the steps elapsed since its own boundary, so a
    schedule reads the same whether it runs alone or inside a join. Values are checked to lie in [0, 1].

    Args:
        schedules: ``m >= 1`` callables ``step -> value``.
        boundaries: ``m − 1`` strictly increasing ints ``>= 0``.

    Returns:
        a callable ``step -> float``.

    Example:
        >>> s = join([constant(1.0), linear_ramp(1.0, 0.5, steps=10)], [100])
        >>> s(99), s(100), s(105), s(500)
        (1.0, 1.0, 0.75, 0.5)
    """
    return Join(tuple(schedules), tuple(boundaries))


def repetition_alpha(repetitions: float, effective_repetitions: float = 16.0, cap: float = 63 / 64) -> float:
    """The paper's α for data repeated ``repetitions`` times: ``min(cap, effective_repetitions / repetitions)``.

    Remark 1 of *Dual-objective Language Models*: with little repetition (R ≤ 16) use α ≈ 63/64, a mostly-AR mix
    in which bidirectional ability comes almost free. Remark 2: when data is scarce (R ≥ 32) choose α so that the
    AR share sees about 16 repetitions, ``α·R ≈ 16`` (α = 1/8 at R = 128); more than ~32 effective AR
    repetitions overfits, fewer than ~8 underfits. Between R = 16 and R = 32 the formula interpolates.

    Args:
        repetitions: how many times the training data is repeated, ``R > 0`` (1 = no repetition).
        effective_repetitions: the target number of repetitions the AR share sees (``> 0``).
        cap: the largest α, in [0, 1].

    Returns:
        α in [0, 1].
    """
    for name, value in (("repetitions", repetitions), ("effective_repetitions", effective_repetitions)):
        if not 0 < check_number(name, value, finite=False) < math.inf:
            raise fail(name, "a finite number > 0", describe(value))
    cap = check_probability("cap", cap)
    return min(cap, float(effective_repetitions) / float(repetitions))


def repetition_rule(repetitions: float, effective_repetitions: float = 16.0, cap: float = 63 / 64) -> Constant:
    """The constant α schedule chosen by the paper's repetition rule (see :func:`repetition_alpha`).

    Args:
        repetitions: data repetitions ``R > 0``.
        effective_repetitions: repetitions the AR share should see (16 in the paper).
        cap: the largest α (63/64 in the paper).

    Returns:
        a callable ``step -> α``; ``repetition_rule(128)(step) == 0.125``, ``repetition_rule(4)(step) == 63/64``.
    """
    return Constant(repetition_alpha(repetitions, effective_repetitions, cap))
