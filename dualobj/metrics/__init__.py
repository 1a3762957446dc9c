"""Metrics for AR and MD language models: torchmetrics ``Metric`` classes (synced across processes) and functions.

- :class:`ARPerplexity` / :func:`ar_perplexity`: next-token perplexity with shifted targets.
- :func:`md_elbo_bound`: the masked-diffusion negative-ELBO per token from ``total`` and ``count``
  (:class:`NLLPerToken` accumulates it over batches; ``MDELBOBound`` is its deprecated alias).
- :class:`TokenAccuracy` / :func:`token_accuracy`: micro-averaged top-1 token accuracy.
- :class:`NLLPerToken`: ``Σ nats / Σ tokens`` from precomputed sums (losses, :mod:`dualobj.evaluation` results,
  the MD ELBO).

Every class keeps two summed states, so its value over several processes is the exact global ratio.
"""

from dualobj.metrics._classes import ARPerplexity, MDELBOBound, NLLPerToken, TokenAccuracy
from dualobj.metrics._functional import ar_perplexity, md_elbo_bound, token_accuracy

__all__ = [
    "ARPerplexity",
    "MDELBOBound",
    "NLLPerToken",
    "TokenAccuracy",
    "ar_perplexity",
    "md_elbo_bound",
    "token_accuracy",
]
