"""Which positions to corrupt: random (exact count or Bernoulli), span masking and BERT-style replacement.

The plug points of a masked objective are :class:`Masker` (``masker(tokens, rate, *, maskable, generator)``:
:class:`RandomMasker`, :class:`SpanMasker` or any callable) and :class:`Corruption` (what masked positions show).

Every function works on a whole ``[B, L]`` batch on its own device, with no Python loop over rows or tokens,
and takes a ``generator`` so the same seed gives the same mask.
"""

from dualobj.masking._corrupt import corrupt
from dualobj.masking._maskable import maskable_positions
from dualobj.masking._maskers import Corruption, Masker, RandomMasker, SpanMasker, run_ids
from dualobj.masking._random import ROUNDINGS, count_mask, random_mask
from dualobj.masking._span import (
    SPAN_SCHEMES,
    GeometricSpans,
    SpanLengths,
    T5Spans,
    UniformSpans,
    inverse_cdf,
    span_mask,
)

__all__ = [
    "ROUNDINGS",
    "SPAN_SCHEMES",
    "Corruption",
    "GeometricSpans",
    "Masker",
    "RandomMasker",
    "SpanLengths",
    "SpanMasker",
    "T5Spans",
    "UniformSpans",
    "corrupt",
    "count_mask",
    "inverse_cdf",
    "maskable_positions",
    "random_mask",
    "run_ids",
    "span_mask",
]
