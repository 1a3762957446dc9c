"""Micro-benchmarks of dualobj against honest baselines (``dualobj bench``).

Suites are modules ``dualobj.bench.<name>`` exposing ``cases(ctx) -> list[Case]`` (see :mod:`dualobj.bench._core`).
"""

from dualobj.bench._core import Case, Context, Impl

SUITES = ("loss", "masking", "attention", "step")
"""The suite names, each a module ``dualobj.bench.<name>``."""

__all__ = ["SUITES", "Case", "Context", "Impl"]
