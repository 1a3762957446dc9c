"""torchmetrics ``Metric`` classes: their states are sums, so they sync across processes exactly."""

from __future__ import annotations

import warnings

import torch
from torchmetrics import Metric

from dualobj._errors import check_bool, check_int
from dualobj.metrics._functional import correct_update, nll_update, ratio, total_count_update
from dualobj.objectives import IGNORE_INDEX, LossOutput


class _SumRatio(Metric):
    """Two summed float64 states, ``numerator`` and ``denominator``; ``compute`` divides them."""

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("numerator", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
        self.numerator += numerator.to(self.numerator.device)
        self.denominator += denominator.to(self.denominator.device)


class ARPerplexity(_SumRatio):
    """Next-token perplexity over every batch seen (and every process), ``exp(Σ NLL / Σ targets)``.

    Inputs of :meth:`update`:

    - ``logits``: ``[B, L, V]`` causal model output.
    - ``target``: ``[B, L]`` int: the input tokens (``shift=True``) or aligned labels such as
      ``Batch.labels`` (``shift=False``).

    Output of :meth:`compute`: a float32 scalar (NaN before any target was scored).

    Args:
        shift: score position ``i`` on ``target[:, i + 1]`` (torchmetrics' ``Perplexity`` does not shift).
        ignore_index: target value that is not scored.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> import torch
        >>> metric = ARPerplexity()
        >>> metric.update(torch.zeros(2, 5, 7), torch.randint(0, 7, (2, 5)))
        >>> round(float(metric.compute()), 4)
        7.0
    """

    is_differentiable = True
    higher_is_better = False

    def __init__(self, *, shift: bool = True, ignore_index: int = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.shift = check_bool("shift", shift)
        self.ignore_index = check_int("ignore_index", ignore_index)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch (see the class docstring for shapes).

        While validation is on, a batch with NaN/inf logits or target ids outside ``[0, V)`` is refused with a
        :class:`~dualobj.DualObjError` and the state is left as it was.
        """
        self._add(*nll_update(logits, target, shift=self.shift, ignore_index=self.ignore_index))

    def compute(self) -> torch.Tensor:
        """``exp(Σ NLL / Σ targets)``."""
        return ratio(self.numerator, self.denominator).exp()


class TokenAccuracy(_SumRatio):
    """Micro-averaged top-1 token accuracy over every batch seen (and every process).

    Inputs of :meth:`update`: ``logits [B, L, V]`` and ``target [B, L]`` int, as for :class:`ARPerplexity`.
    Output of :meth:`compute`: a float32 scalar in [0, 1] (NaN before any target was scored).

    Args:
        shift: score position ``i`` on ``target[:, i + 1]``; ``False`` for aligned labels such as ``Batch.labels``
            (AR or MD rows alike).
        ignore_index: target value that is not scored.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True

    def __init__(self, *, shift: bool = True, ignore_index: int = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.shift = check_bool("shift", shift)
        self.ignore_index = check_int("ignore_index", ignore_index)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch (refused, leaving the state as it was, on the same bad values as
        :meth:`ARPerplexity.update`)."""
        self._add(*correct_update(logits, target, shift=self.shift, ignore_index=self.ignore_index))

    def compute(self) -> torch.Tensor:
        """Σ correct / Σ targets."""
        return ratio(self.numerator, self.denominator)


class NLLPerToken(_SumRatio):
    """Summed negative log-likelihood (or bound) over summed tokens, from precomputed sums: ``Σ total / Σ count``.

    For losses or evaluations that already reduce to a sum and a count: a :class:`~dualobj.objectives.LossOutput`
    (``total``, ``count``), or ``nll.nats`` and ``nll.tokens`` of :func:`dualobj.evaluation.ar_nll`. Fed with the
    ``LossOutput`` of MD batches (see :func:`~dualobj.metrics.md_elbo_bound` for the settings that make it the
    ELBO), or with ``nats`` and ``tokens`` of :func:`dualobj.evaluation.md_elbo`, it is the masked-diffusion
    negative-ELBO per token. The two sums are synced across processes before dividing.

    Inputs of :meth:`update`: a ``LossOutput``, or ``total`` and ``count`` (scalar tensors or real numbers).
    Output of :meth:`compute`: a float32 scalar, nats per token (or its ``exp``); NaN before anything was counted.

    Args:
        perplexity: report ``exp`` of the mean (a perplexity, or a perplexity bound for the ELBO).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = NLLPerToken()
        >>> metric.update(torch.tensor(6.0), torch.tensor(2.0))
        >>> metric.update(3.0, 1)
        >>> float(metric.compute())
        3.0
    """

    is_differentiable = False
    higher_is_better = False

    def __init__(self, *, perplexity: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.perplexity = check_bool("perplexity", perplexity)

    def update(self, total: torch.Tensor | float | LossOutput, count: torch.Tensor | float | None = None) -> None:
        """Add one batch's ``(total, count)``.

        A non-numeric value raises :class:`~dualobj.DualObjTypeError`. While validation is on, a NaN or infinite
        ``total`` or ``count``, or a negative ``count``, is refused with a :class:`~dualobj.DualObjError` and the
        state is left as it was (a metric never absorbs a NaN).
        """
        self._add(*total_count_update(total, count))

    def compute(self) -> torch.Tensor:
        """Σ total / Σ count (nats per token), or its ``exp``."""
        out = ratio(self.numerator, self.denominator)
        return out.exp() if self.perplexity else out


class MDELBOBound(NLLPerToken):
    """Deprecated: the same metric as :class:`NLLPerToken`, under another name. Use :class:`NLLPerToken`."""

    def __init__(self, *, perplexity: bool = False, **kwargs: object) -> None:
        warnings.warn("MDELBOBound is deprecated and will be removed: use NLLPerToken, the same metric",
                      DeprecationWarning, stacklevel=2)
        super().__init__(perplexity=perplexity, **kwargs)
