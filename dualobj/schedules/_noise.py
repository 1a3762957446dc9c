"""Noise schedules α(t): the probability that a token is still clean at time t, and the ELBO weight.

Every schedule here is named by its formula for α(t). The continuous-time ELBO weight is
``w(t) = −α'(t) / (1 − α(t))``; each schedule evaluates it in a closed form that stays accurate near ``t → 0``
(where ``1 − α(t) → 0``) and near ``t → 1``.

Epsilon policy: ``weight(t)`` is evaluated at ``max(t, eps)`` (``eps`` is a field of every schedule, 1e-6 by
default), so it is finite for every ``t`` in [0, 1] including ``t = 0``. ``alpha``, ``mask_rate`` and ``dalpha``
are exact at every ``t``. The MD objective truncates on the mask rate itself (see ``MDObjective``).

Dtypes: float64 inputs are computed in float64; every other floating dtype is computed and returned in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import torch

from dualobj._errors import check_number, check_tensor, describe, fail, fail_type, validation_enabled

HALF_PI = math.pi / 2.0

CosineForm = Literal["1-sin", "cos", "cos^2"]
"""The three cosine schedules of the literature (see :class:`CosineSchedule`)."""


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
    """Check ``t`` is a float tensor with values in [0, 1] (the value check, a device sync, runs only while
    :func:`dualobj.validation_enabled`, so never while tracing)."""
    check_tensor(argument, t, floating=True)
    if validation_enabled() and t.numel() and bool(((t < 0) | (t > 1) | t.isnan()).any()):
        raise fail(argument, "values in [0, 1]", f"min {t.min().item():.4g}, max {t.max().item():.4g}")
    return t


def _compute(t: torch.Tensor, argument: str = "t") -> torch.Tensor:
    """Checked ``t`` in its compute dtype: float64 stays float64, anything else becomes float32."""
    check_time(t, argument)
    return t if t.dtype == torch.float64 else t.float()


def _check_positive(name: str, value: object) -> float:
    if not 0.0 < check_number(name, value, finite=False) < math.inf:
        raise fail(name, "a finite number > 0", describe(value))
    return float(value)


def _check_eps(eps: object) -> float:
    return check_number("eps", eps, low=0.0, high=1.0, low_open=True, high_open=True)


class NoiseScheduleBase:
    """Shared machinery of the built-in noise schedules (functions of the diffusion time ``t``): checks, dtypes and
    the ``eps`` policy.

    Subclasses define ``_alpha``, ``_dalpha`` (α'), ``_mask_rate`` (1 − α, in a stable form), ``_weight``
    (``−α'/(1 − α)`` in a stable form) and ``_t_at_rate`` on already-checked tensors. Every public method takes a
    float tensor of any shape ``[*]`` and returns a tensor of the same shape.
    """

    eps: float

    def __post_init__(self) -> None:
        # The dataclass __init__ of every built-in schedule lands here: its own fields first, then eps.
        self._check_fields()
        object.__setattr__(self, "eps", _check_eps(self.eps))

    def _check_fields(self) -> None:
        """Check (and normalise, with ``object.__setattr__``) the schedule's own fields; none by default."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """α(t) ``[*]``: the probability that a token is still clean at time ``t`` ``[*]``."""
        return self._alpha(_compute(t))

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """α'(t) ``[*]``, the time derivative (≤ 0), in closed form."""
        return self._dalpha(_compute(t))

    def mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        """``1 − α(t)`` ``[*]``: the probability that a token is masked at time ``t``."""
        return self._mask_rate(_compute(t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """The ELBO weight ``w(t) = −α'(t)/(1 − α(t))`` ``[*]``, evaluated at ``max(t, eps)``."""
        return self._weight(_compute(t).clamp_min(self.eps))

    def t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        """The ``t`` ``[*]`` with ``mask_rate(t) == rate`` (rates outside the schedule's range clamp to 0 or 1)."""
        return self._t_at_rate(_compute(rate, "rate")).clamp(0.0, 1.0)

    # Generic fallbacks (subclasses override with stable closed forms).
    def _mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self._alpha(t)

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        return -self._dalpha(t) / self._mask_rate(t)

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LinearSchedule(NoiseScheduleBase):
    """α(t) = 1 − t: mask_rate(t) = t and w(t) = 1/t.

    MDLM's log-linear schedule (its ε cancels in the weight), SMDM, LLaDA and the dual-objective paper.

    Args:
        eps: ``weight`` is evaluated at ``max(t, eps)``.
    """

    eps: float = 1e-6

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def _dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -1.0)

    def _mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t

    def _t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        return rate.clone()


class _OneMinusSin:
    """α = 1 − sin(πt/2) = 2·sin²(π(1−t)/4); w = (π/2)·cot(πt/2).

    cos(πt/2) is written sin(π(1−t)/2) throughout, which stays accurate near t = 1 (where 1 − t is exact).
    """

    @staticmethod
    def alpha(t: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sin(HALF_PI * (1.0 - t) / 2.0) ** 2

    @staticmethod
    def dalpha(t: torch.Tensor) -> torch.Tensor:
        return -HALF_PI * torch.sin(HALF_PI * (1.0 - t))

    @staticmethod
    def mask_rate(t: torch.Tensor) -> torch.Tensor:
        return torch.sin(HALF_PI * t)

    @staticmethod
    def weight(t: torch.Tensor) -> torch.Tensor:
        return HALF_PI * torch.sin(HALF_PI * (1.0 - t)) / torch.sin(HALF_PI * t)

    @staticmethod
    def t_at_rate(rate: torch.Tensor) -> torch.Tensor:
        return torch.asin(rate) / HALF_PI


class _Cos:
    """α = cos(πt/2) = sin(π(1−t)/2); 1 − α = 2·sin²(πt/4); w = (π/2)·cot(πt/4)."""

    @staticmethod
    def alpha(t: torch.Tensor) -> torch.Tensor:
        return torch.sin(HALF_PI * (1.0 - t))

    @staticmethod
    def dalpha(t: torch.Tensor) -> torch.Tensor:
        return -HALF_PI * torch.sin(HALF_PI * t)

    @staticmethod
    def mask_rate(t: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sin(HALF_PI * t / 2.0) ** 2

    @staticmethod
    def weight(t: torch.Tensor) -> torch.Tensor:
        return HALF_PI / torch.tan(HALF_PI * t / 2.0)

    @staticmethod
    def t_at_rate(rate: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.asin(torch.sqrt(rate / 2.0)) / HALF_PI


class _CosSquared:
    """α = cos²(πt/2) = sin²(π(1−t)/2); 1 − α = sin²(πt/2); w = π·cot(πt/2)."""

    @staticmethod
    def alpha(t: torch.Tensor) -> torch.Tensor:
        return torch.sin(HALF_PI * (1.0 - t)) ** 2

    @staticmethod
    def dalpha(t: torch.Tensor) -> torch.Tensor:
        return -math.pi * torch.sin(HALF_PI * t) * torch.sin(HALF_PI * (1.0 - t))

    @staticmethod
    def mask_rate(t: torch.Tensor) -> torch.Tensor:
        return torch.sin(HALF_PI * t) ** 2

    @staticmethod
    def weight(t: torch.Tensor) -> torch.Tensor:
        return math.pi * torch.sin(HALF_PI * (1.0 - t)) / torch.sin(HALF_PI * t)

    @staticmethod
    def t_at_rate(rate: torch.Tensor) -> torch.Tensor:
        return torch.asin(torch.sqrt(rate)) / HALF_PI


COSINE_FORMS = {"1-sin": _OneMinusSin, "cos": _Cos, "cos^2": _CosSquared}


@dataclasses.dataclass(frozen=True)
class CosineSchedule(NoiseScheduleBase):
    r"""The "cosine" schedules of the literature, chosen by formula (they are not the same schedule).

    ============  ======================  ===========================  ==========================================
    ``form``      α(t)                    w(t)                         used by
    ============  ======================  ===========================  ==========================================
    ``"1-sin"``   1 − sin(πt/2)           (π/2)·cot(πt/2)              MD4, dllm, DUO ("cosine")
    ``"cos"``     cos(πt/2)               (π/2)·cot(πt/4)              MDLM, BD3-LMs ("cosine"; MDLM's ε cancels)
    ``"cos^2"``   cos²(πt/2)              π·cot(πt/2)                  MDLM ("cosinesqr")
    ============  ======================  ===========================  ==========================================

    Args:
        form: ``"1-sin"``, ``"cos"`` or ``"cos^2"`` (required: there is no default "cosine").
        eps: ``weight`` is evaluated at ``max(t, eps)``.
    """

    form: CosineForm
    eps: float = 1e-6

    def _check_fields(self) -> None:
        if not isinstance(self.form, str) or self.form not in COSINE_FORMS:
            raise fail("form", "one of " + ", ".join(repr(f) for f in COSINE_FORMS), repr(self.form))

    @property
    def _f(self) -> type:
        return COSINE_FORMS[self.form]

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._f.alpha(t)

    def _dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._f.dalpha(t)

    def _mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return self._f.mask_rate(t)

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        return self._f.weight(t)

    def _t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        return self._f.t_at_rate(rate)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule(NoiseScheduleBase):
    """α(t) = 1 − t^p: mask_rate(t) = t^p and w(t) = p/t (MD4's polyN; BD3's "square" p=2, "square_root" p=0.5).

    Args:
        power: the exponent ``p > 0`` (``p = 1`` is the linear schedule).
        eps: ``weight`` is evaluated at ``max(t, eps)``.
    """

    power: float
    eps: float = 1e-6

    def _check_fields(self) -> None:
        object.__setattr__(self, "power", _check_positive("power", self.power))

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        # 1 − t^p = −expm1(p·log t): accurate near t = 1.
        return -torch.expm1(self.power * torch.log(t))

    def _dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return -self.power * t ** (self.power - 1.0)

    def _mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return t**self.power

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        return self.power / t

    def _t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        return rate ** (1.0 / self.power)


@dataclasses.dataclass(frozen=True)
class GeometricSchedule(NoiseScheduleBase):
    r"""α(t) = exp(−σ(t)) with σ(t) = σ_min^{1−t}·σ_max^t (SEDD, MDLM "geometric").

    ``mask_rate = −expm1(−σ)`` and ``w(t) = σ(t)·ln(σ_max/σ_min) / expm1(σ(t))``. The end points are only
    approximately clean and masked: α(0) = e^{−σ_min} and α(1) = e^{−σ_max}.

    Args:
        sigma_min: σ(0) > 0 (SEDD uses 1e-4).
        sigma_max: σ(1) > sigma_min (SEDD uses 20).
        eps: ``weight`` is evaluated at ``max(t, eps)`` (the weight is finite at 0 here anyway).
    """

    sigma_min: float = 1e-4
    sigma_max: float = 20.0
    eps: float = 1e-6

    def _check_fields(self) -> None:
        lo = _check_positive("sigma_min", self.sigma_min)
        hi = _check_positive("sigma_max", self.sigma_max)
        if not lo < hi:
            raise fail("(sigma_min, sigma_max)", "sigma_min < sigma_max", f"({lo!r}, {hi!r})")
        object.__setattr__(self, "sigma_min", lo)
        object.__setattr__(self, "sigma_max", hi)

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max) - math.log(self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) ``[*]`` = σ_min^{1−t}·σ_max^t, the total noise rate integrated up to ``t``."""
        return self._sigma(_compute(t))

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(math.log(self.sigma_min) + t * self._log_ratio)

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self._sigma(t))

    def _dalpha(self, t: torch.Tensor) -> torch.Tensor:
        s = self._sigma(t)
        return -s * self._log_ratio * torch.exp(-s)

    def _mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-self._sigma(t))

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        s = self._sigma(t)
        return s * self._log_ratio / torch.expm1(s)

    def _t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        sigma = -torch.log1p(-rate)
        return (torch.log(sigma) - math.log(self.sigma_min)) / self._log_ratio


@dataclasses.dataclass(frozen=True)
class LogSchedule(NoiseScheduleBase):
    """α(t) = 1 − log₂(1 + t): mask_rate(t) = log1p(t)/ln 2 and w(t) = 1/((1 + t)·log1p(t)) (BD3-LMs "log").

    Args:
        eps: ``weight`` is evaluated at ``max(t, eps)``.
    """

    eps: float = 1e-6

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        # 1 − log2(1 + t) = log2(2/(1 + t)) = log1p((1 − t)/(1 + t))/ln 2: exact near t = 1.
        return torch.log1p((1.0 - t) / (1.0 + t)) / math.log(2.0)

    def _dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return -1.0 / ((1.0 + t) * math.log(2.0))

    def _mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(t) / math.log(2.0)

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / ((1.0 + t) * torch.log1p(t))

    def _t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        return torch.expm1(rate * math.log(2.0))


_GRID = 1025  # points of [0, 1] at which schedule_from_alpha checks that α(t) does not increase


@dataclasses.dataclass(frozen=True)
class AutogradSchedule(NoiseScheduleBase):
    """A schedule given only by ``alpha_fn``; α' comes from autograd (see :func:`schedule_from_alpha`).

    Args:
        alpha_fn: an elementwise torch function ``t [*] -> α(t) [*]``, decreasing, with values in [0, 1].
        inverse: optional ``rate [*] -> t [*]``, the inverse of ``1 − alpha_fn``; bisection (60 halvings, float64)
            is used when ``None``.
        eps: ``weight`` is evaluated at ``max(t, eps)``.
    """

    alpha_fn: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor] | None = None
    eps: float = 1e-6

    def _check_fields(self) -> None:
        if not callable(self.alpha_fn):
            raise fail_type("alpha_fn", "a callable t -> alpha(t)", describe(self.alpha_fn))
        if self.inverse is not None and not callable(self.inverse):
            raise fail_type("inverse", "a callable rate -> t or None", describe(self.inverse))
        # An increasing α(t) would give negative ELBO weights w(t) = −α'(t)/(1 − α(t)): refuse it up front.
        grid = torch.linspace(0.0, 1.0, _GRID, dtype=torch.float64)
        values = self._eval(grid)
        rise = torch.diff(values.double())
        if bool((rise > 1e-12).any()):
            i = int(rise.argmax())
            raise fail("alpha_fn", "a non-increasing α(t) on [0, 1] (an increasing α(t) makes the ELBO weight "
                       "w(t) = −α'(t)/(1 − α(t)) negative)",
                       f"α({float(grid[i]):.4g}) = {float(values[i]):.6g} < α({float(grid[i + 1]):.4g}) = "
                       f"{float(values[i + 1]):.6g}")

    def _eval(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_fn(t)
        check_tensor("alpha_fn(t)", a, shape=tuple(t.shape), floating=True)
        if not torch.compiler.is_compiling() and a.numel() and bool(((a < 0) | (a > 1) | a.isnan()).any()):
            raise fail("alpha_fn(t)", "values in [0, 1]", f"min {a.min().item():.4g}, max {a.max().item():.4g}")
        return a

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._eval(t)

    def _dalpha(self, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = t.detach().double().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._eval(x).sum(), x)
        return grad.to(t.dtype)

    def _mask_rate(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self._eval(t.double())).to(t.dtype)

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        x = t.double()
        w = -self._dalpha(x) / (1.0 - self._eval(x))
        if validation_enabled() and w.numel() and bool((w < 0).any()):
            raise fail("alpha_fn", "a non-increasing α(t) (the ELBO weight −α'(t)/(1 − α(t)) must be >= 0)",
                       f"a negative weight {float(w.min()):.4g}")
        return w.to(t.dtype)

    def _t_at_rate(self, rate: torch.Tensor) -> torch.Tensor:
        if self.inverse is not None:
            return self.inverse(rate).to(rate.dtype)
        target = rate.double()
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(60):  # fixed count: no data-dependent stopping
            mid = 0.5 * (lo + hi)
            below = (1.0 - self._eval(mid)) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(rate.dtype)


def schedule_from_alpha(
    alpha_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    inverse: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-6,
) -> AutogradSchedule:
    """A noise schedule from α(t) alone: α'(t), and so ``w(t) = −α'(t)/(1 − α(t))``, come from autograd.

    Weights are computed in float64. Use it for a quick experiment; the closed-form classes are faster and more
    accurate near t = 0.

    Args:
        alpha_fn: elementwise torch function ``t [*] -> α(t) [*]``, decreasing on [0, 1], values in [0, 1]. It is
            checked on a grid of 1025 points at construction: an increasing α(t), whose ELBO weights would be
            negative, is refused with a :class:`~dualobj.DualObjError`.
        inverse: optional exact inverse of ``mask_rate``; otherwise ``t_at_rate`` bisects.
        eps: ``weight`` is evaluated at ``max(t, eps)``.

    Example:
        >>> import torch
        >>> s = schedule_from_alpha(lambda t: 1 - t**2)
        >>> round(float(s.weight(torch.tensor(0.5))), 6)  # 2/t for α = 1 − t²
        4.0
    """
    return AutogradSchedule(alpha_fn, inverse=inverse, eps=eps)
