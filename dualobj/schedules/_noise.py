"""Noise schedules α(t): the probability that a token is still clean at time t, and the ELBO weight."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from dualobj._errors import check_tensor, fail


@runtime_checkable
class NoiseSchedule(Protocol):
    """A masking schedule, named by its α(t).

    ``alpha(t)``: probability a token is still clean at time ``t`` (α(0) = 1, α(1) = 0).
    ``mask_rate(t) = 1 − alpha(t)``; ``weight(t) = −α'(t) / (1 − α(t))`` (the continuous-time ELBO weight);
    ``t_at_rate(rate)``: the inverse of ``mask_rate``. All take and return float tensors of any shape.
    """

    def alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    def mask_rate(self, t: torch.Tensor) -> torch.Tensor: ...

    def weight(self, t: torch.Tensor) -> torch.Tensor: ...

    def t_at_rate(self, rate: torch.Tensor) -> torch.Tensor: ...


def check_time(t: torch.Tensor, argument: str = "t") -> torch.Tensor:
    """Check ``t`` is a float tensor with values in [0, 1] (the value check is skipped while tracing)."""
    check_tensor(argument, t, floating=True)
    if not torch.compiler.is_compiling() and t.numel() and bool(((t < 0) | (t > 1) | t.isnan()).any()):
        raise fail(argument, "values in [0, 1]", f"min {t.min().item():.4g}, max {t.max().item():.4g}")
    return t


class LinearSchedule:
    """α(t) = 1 − t, so mask_rate(t) = t and w(t) = 1/t (MDLM's log-linear, SMDM, LLaDA, the dual-objective paper)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - check_time(t)

    def mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return check_time(t).clone()

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / check_time(t)

    def t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        return check_time(rate, "rate").clone()

    def __repr__(self) -> str:
        return "LinearSchedule()"
