"""Micro-benchmarks of dualobj against honest baselines (``dualobj bench``).

Suites are modules ``dualobj.bench.<name>`` exposing ``cases(ctx) -> list[Case]`` (see :mod:`dualobj.bench._core`);
the runner (:mod:`dualobj.bench._runner`) times every :class:`Impl` of each :class:`Case` side by side, measures
peak extra memory where asked, checks the outputs agree and reports ``ours / baseline`` ratios.
"""

from dualobj.bench._core import Case, Context, Impl, allclose

SUITES = ("loss", "masking", "attention", "step", "variance")
"""The suite names, each a module ``dualobj.bench.<name>``."""

__all__ = ["SUITES", "Case", "Context", "Impl", "allclose"]
