"""Functional metrics: per-batch sums (``update``) and the final ratio (``compute``), shared by the Metric classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualobj._errors import check_tensor, fail
from dualobj.objectives import IGNORE_INDEX, LossOutput


def _aligned(
    logits: torch.Tensor, target: torch.Tensor, shift: bool, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``logits [B, L, V]`` and ``target [B, L]``; return ``[N, V]`` logits and ``[N]`` targets to score."""
    check_tensor("logits", logits, ndim=3, floating=True)
    B, L, V = logits.shape
    check_tensor("target", target, shape=(B, L), integer=True)
    if shift:
        logits, target = logits[:, :-1], target[:, 1:]
    flat_target = target.reshape(-1)
    flat_target = torch.where(flat_target == ignore_index, IGNORE_INDEX, flat_target)
    if not torch.compiler.is_compiling():
        bad = (flat_target != IGNORE_INDEX) & ((flat_target < 0) | (flat_target >= V))
        if bool(bad.any()):
            raise fail("target", f"values in [0, {V}) or ignore_index={ignore_index}", int(flat_target[bad][0]))
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

    Returns:
        ``(total, count)``: detached float64 scalars.
    """
    if isinstance(total, LossOutput):
        if count is not None:
            raise fail("count", "None when total is a LossOutput (its own count is used)", count)
        total, count = total.total, total.count
    if isinstance(total, (int, float)) and not isinstance(total, bool):
        total = torch.tensor(float(total), dtype=torch.float64)
    check_tensor("total", total, floating=True)
    if total.numel() != 1:
        raise fail("total", "a scalar (the summed weighted cross-entropy)", f"shape {list(total.shape)}")
    if count is None:
        raise fail("count", "a scalar tensor or number (the normaliser) when total is a tensor", None)
    count = torch.as_tensor(count, device=total.device)
    if count.numel() != 1:
        raise fail("count", "a scalar (the normaliser)", f"shape {list(count.shape)}")
    return total.detach().double().reshape(()), count.detach().double().reshape(())


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
    total, count = total_count_update(total, count)
    out = ratio(total, count)
    return out.exp() if perplexity else out
