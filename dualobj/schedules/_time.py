"""Time samplers: draw the noise level t of each MD row, with an importance weight."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

from dualobj import _random
from dualobj._errors import fail


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
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (t_min, t_max))
    if not ok or not (0.0 <= t_min < t_max <= 1.0):
        raise fail("(t_min, t_max)", "0 <= t_min < t_max <= 1", f"({t_min!r}, {t_max!r})")


class UniformSampler:
    """t ~ U(t_min, t_max) independently per row (``t_min`` keeps ``w(t)`` finite; MDLM uses 1e-3)."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0) -> None:
        check_range(t_min, t_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def __call__(
        self, n: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> TimeSample:
        u = _random.rand((n,), generator=generator, device=device)
        t = self.t_min + (self.t_max - self.t_min) * u
        return TimeSample(t, torch.ones_like(t))

    def __repr__(self) -> str:
        return f"UniformSampler(t_min={self.t_min}, t_max={self.t_max})"
