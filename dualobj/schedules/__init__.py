"""Numbers over time: noise schedules α(t) with ELBO weights, time samplers, and objective-weight schedules."""

from dualobj.schedules._noise import LinearSchedule, NoiseSchedule
from dualobj.schedules._time import TimeSample, TimeSampler, UniformSampler

__all__ = [
    "LinearSchedule",
    "NoiseSchedule",
    "TimeSample",
    "TimeSampler",
    "UniformSampler",
]
