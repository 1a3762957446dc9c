"""Numbers over time: noise schedules α(t) with ELBO weights, time samplers, and objective-weight schedules.

- Noise schedules (``alpha``, ``dalpha``, ``mask_rate``, ``weight``, ``t_at_rate`` on ``[*]`` tensors):
  :class:`LinearSchedule`, :class:`CosineSchedule` (``"1-sin"``, ``"cos"``, ``"cos^2"``), :class:`PolynomialSchedule`,
  :class:`GeometricSchedule`, :class:`LogSchedule`, :func:`schedule_from_alpha`.
- Time samplers (``sampler(n, device=, generator=) -> TimeSample`` of ``[n]`` tensors): :class:`UniformSampler`,
  :class:`StratifiedSampler`, :class:`KumaraswamySampler` (importance weights); :func:`sample_counts` for the
  exact-count ELBO evaluation (``k ~ U{1..n}``, weight ``n/k``).
- Step schedules (``step -> value in [0, 1]``, for α or a mask rate): :func:`constant`, :func:`linear_ramp`,
  :func:`cosine_ramp`, :func:`warmup`, :func:`join`, :func:`repetition_rule` / :func:`repetition_alpha`.
"""

from dualobj.schedules._noise import (
    AutogradSchedule,
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    LogSchedule,
    NoiseSchedule,
    NoiseScheduleBase,
    PolynomialSchedule,
    schedule_from_alpha,
)
from dualobj.schedules._steps import (
    StepSchedule,
    constant,
    cosine_ramp,
    join,
    linear_ramp,
    repetition_alpha,
    repetition_rule,
    warmup,
)
from dualobj.schedules._time import (
    CountSample,
    KumaraswamySampler,
    StratifiedSampler,
    TimeSample,
    TimeSampler,
    UniformSampler,
    sample_counts,
)

__all__ = [
    "AutogradSchedule",
    "CosineSchedule",
    "CountSample",
    "GeometricSchedule",
    "KumaraswamySampler",
    "LinearSchedule",
    "LogSchedule",
    "NoiseSchedule",
    "NoiseScheduleBase",
    "PolynomialSchedule",
    "StepSchedule",
    "StratifiedSampler",
    "TimeSample",
    "TimeSampler",
    "UniformSampler",
    "constant",
    "cosine_ramp",
    "join",
    "linear_ramp",
    "repetition_alpha",
    "repetition_rule",
    "sample_counts",
    "schedule_from_alpha",
    "warmup",
]
