"""Functional metrics: per-batch sums (``update``) and the final ratio (``compute``), shared by the Metric classes."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from dualobj._errors import (
    check_bool,
    check_finite,
    check_ids,
    check_int,
    check_number,
    check_tensor,
    describe,
    fail,
    fail_type,
    validation_enabled,
)
from dualobj.objectives import IGNORE_INDEX, LossOutput


def _aligned(
    logits: torch.Tensor, target: torch.Tensor, shift: bool, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``logits [B, L, V]`` and ``target [B, L]``; return ``[N, V]`` logits and ``[N]`` targets to score.

    Structural checks always run; the values (target ids in ``[0, V)``, finite logits) are checked while validation
    is on, before anything is summed, so a refused batch leaves a metric's state untouched.
    """
    check_bool("shift", shift)
    check_int("ignore_index", ignore_index)
    check_tensor("logits", logits, ndim=3, floating=True)
    B, L, V = logits.shape
    if V < 1:
        raise fail("logits", "a vocabulary dimension V >= 1", describe(logits))
    check_tensor("target", target, shape=(B, L), integer=True)
    if target.device != logits.device:
        raise fail("target", f"a tensor on the device of logits ({logits.device})", f"one on {target.device}")
    if shift:
        logits, target = logits[:, :-1], target[:, 1:]
    flat_target = target.reshape(-1)
    flat_target = torch.where(flat_target == ignore_index, IGNORE_INDEX, flat_target)
    if validation_enabled():
        check_ids("target", flat_target, high=V, allow=(IGNORE_INDEX,))  # ignore_index is -100 by now
        check_finite("logits", logits)
    return logits.reshape(-1, V), flat_target


def nll_update(
    logits: torch.Tensor, target: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of scored targets of one batch.

    Args:
        logits: ``[B, L, V]`` model output (any float dtype; scored in float32).
        target: ``[B, L]`` int. With ``shift=True`` the input tokens (or unshifted labels, as Hugging Face takes
            them): position ``i`` is scored on ``target[:, i + 1]``. With ``shift=False`` already aligned labels,
            such as :attr:`dualobj.objectives.Batch.labels`.
        shift: score position ``i`` on ``target[:, i + 1]``.
        ignore_index: target value that is not scored (``-100`` is never scored either).

    Returns:
        ``(nll_sum, count)``: float64 scalars.
    """
    flat, labels = _aligned(logits, target, shift, ignore_index)
    nll = F.cross_entropy(flat.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum()
    return nll.double(), count.double()


def correct_update(
    logits: torch.Tensor, target: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 correct predictions and scored targets of one batch (arguments as :func:`nll_update`).

    Returns:
        ``(correct, count)``: float64 scalars.
    """
    flat, labels = _aligned(logits, target, shift, ignore_index)
    keep = labels != IGNORE_INDEX
    correct = (flat.argmax(dim=-1) == labels) & keep
    return correct.sum().double(), keep.sum().double()


def total_count_update(
    total: torch.Tensor | float | LossOutput, count: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``(total, count)`` from a :class:`~dualobj.objectives.LossOutput` or from two scalars (tensors or numbers,
    e.g. ``nll.nats`` and ``nll.tokens`` of a :mod:`dualobj.evaluation` result).

    Non-numeric values are refused (:class:`~dualobj.DualObjTypeError`); while validation is on, so are a NaN or
    infinite ``total`` or ``count`` and a negative ``count``.

    Returns:
        ``(total, count)``: detached float64 scalars on ``total``'s device.
    """
    if isinstance(total, LossOutput):
        if count is not None:
            raise fail("count", "None when total is a LossOutput (its own count is used)", describe(count))
        total, count = total.total, total.count
    total = _scalar("total", total, "the summed negative log-likelihood or weighted cross-entropy")
    if count is None:
        raise fail_type("count", "a scalar tensor or number (the normaliser) when total is not a LossOutput", None)
    count = _scalar("count", count, "the normaliser").to(total.device)
    if validation_enabled():
        check_finite("total", total)
        check_finite("count", count)
        if bool(count < 0):
            raise fail("count", "a count >= 0", float(count))
    return total.detach().reshape(()), count.detach().reshape(())


def _scalar(name: str, value: object, what: str) -> torch.Tensor:
    """A real Python number or a one-element real tensor, as a float64 tensor."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise fail_type(name, f"a real scalar ({what})", describe(value))
        if value.numel() != 1:
            raise fail(name, f"a scalar ({what})", f"shape {list(value.shape)}")
        return value.detach().double()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise fail_type(name, f"a scalar tensor or a real number ({what})", describe(value))
    # A Python number is checked always (no device sync): finite, and a count >= 0.
    return torch.tensor(check_number(name, value, low=0.0 if name == "count" else None), dtype=torch.float64)


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` in float32, NaN when nothing was counted."""
    out = numerator / denominator
    return torch.where(denominator > 0, out, torch.full_like(out, float("nan"))).float()


def ar_perplexity(
    logits: torch.Tensor, target: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    r"""Perplexity of next-token prediction: :math:`\exp\big(\frac{1}{N}\sum_i -\log p(x_{i+1}\mid x_{\le i})\big)`.

    Unlike ``torchmetrics.functional.text.perplexity``, targets are shifted by default, so the input tokens can be
    passed as they are. Use ``shift=False`` with :attr:`Batch.labels <dualobj.objectives.Batch.labels>`, which
    are already aligned and also stop at padding and packed-document boundaries.

    Args:
        logits: ``[B, L, V]`` causal model output.
        target: ``[B, L]`` int tokens (``shift=True``) or aligned labels (``shift=False``).
        shift: score position ``i`` on ``target[:, i + 1]``.
        ignore_index: target value that is not scored.

    Returns:
        float32 scalar; NaN when no target was scored.

    Example:
        >>> import torch
        >>> round(float(ar_perplexity(torch.zeros(1, 4, 10), torch.tensor([[1, 2, 3, 4]]))), 4)
        10.0
    """
    nll, count = nll_update(logits, target, shift=shift, ignore_index=ignore_index)
    return ratio(nll, count).exp()


def token_accuracy(
    logits: torch.Tensor, target: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Micro-averaged top-1 token accuracy: correct predictions over all scored targets of the batch.

    Args:
        logits: ``[B, L, V]`` model output.
        target: ``[B, L]`` int tokens (``shift=True``) or aligned labels such as ``Batch.labels`` (``shift=False``).
        shift: score position ``i`` on ``target[:, i + 1]``.
        ignore_index: target value that is not scored.

    Returns:
        float32 scalar in [0, 1]; NaN when no target was scored.

    Example:
        >>> import torch
        >>> logits = torch.nn.functional.one_hot(torch.tensor([[2, 3, 0]]), 5).float()
        >>> float(token_accuracy(logits, torch.tensor([[1, 2, 3]])))
        1.0
    """
    correct, count = correct_update(logits, target, shift=shift, ignore_index=ignore_index)
    return ratio(correct, count)


def md_elbo_bound(
    total: torch.Tensor | LossOutput, count: torch.Tensor | float | None = None, *, perplexity: bool = False
) -> torch.Tensor:
    r"""The masked-diffusion negative-ELBO per token, an upper bound on the NLL per token: ``total / count``.

    ``total`` is :math:`\sum w(t)\,\mathrm{CE}` over the masked targets and ``count`` the scorable positions,
    exactly :attr:`LossOutput.total <dualobj.objectives.LossOutput.total>` and ``.count`` of an
    :class:`~dualobj.objectives.MDObjective` with ``normalize="valid"``, ``weighting="elbo"`` and ``z_loss=0``.
    Averaged over many draws of ``t`` and masks this estimates :math:`-\mathrm{ELBO}/n \ge -\log p(x)/n`.

    Args:
        total: scalar weighted CE sum, or a ``LossOutput`` (then ``count`` must be ``None``).
        count: scalar number of scorable positions.
        perplexity: return ``exp(bound)``, an upper bound on the perplexity.

    Returns:
        float32 scalar (nats per token, or a perplexity bound); NaN when ``count`` is 0.

    Example:
        >>> import torch
        >>> float(md_elbo_bound(torch.tensor(6.0), torch.tensor(3.0)))
        2.0
    """
    check_bool("perplexity", perplexity)
    total, count = total_count_update(total, count)
    out = ratio(total, count)
    return out.exp() if perplexity else out
