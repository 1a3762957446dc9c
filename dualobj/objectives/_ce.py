"""One weighted cross-entropy that scores every objective, and the reduction shared with the fused path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualobj._errors import check_choice, check_finite, check_number, check_tensor, fail, fail_type, validation_enabled
from dualobj.objectives._batch import IGNORE_INDEX, Batch, LossOutput, component_metrics

NORMALIZERS = ("valid", "positions", "targets", "none")
"""What ``count`` is: ``"valid"`` scorable positions (the per-token ELBO for MD rows; the targets for AR rows),
``"positions"`` all ``B·L`` positions (the official dual-objective code), ``"targets"`` labelled positions
(masked positions for MD rows: not an ELBO), ``"none"`` 1 (the plain sum)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype when wider (float64 stays float64 for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def check_labels(
    labels: torch.Tensor, vocab_size: int, argument: str = "labels", ignore_index: int = IGNORE_INDEX
) -> None:
    """Raise if a label is outside ``[0, vocab_size)`` and not ``ignore_index``.

    A value check: it runs only while validation is on (:func:`dualobj.validation_enabled`), since reading the
    result is a device-to-host sync on an accelerator.
    """
    if not validation_enabled():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise fail(argument, f"values in [0, {vocab_size}) or {ignore_index}", f"{value}")


def normalizer(batch: Batch, normalize: str) -> torch.Tensor:
    """The float32 scalar ``count`` for ``normalize`` (one of :data:`NORMALIZERS`)."""
    check_choice("normalize", normalize, NORMALIZERS)
    device = batch.labels.device
    if normalize == "valid":
        return batch.valid_mask().sum(dtype=torch.float32)
    if normalize == "positions":
        return torch.full((), float(batch.labels.numel()), device=device)  # a fill, not a host copy
    if normalize == "targets":
        return (batch.labels != IGNORE_INDEX).sum(dtype=torch.float32)
    return torch.ones((), device=device)


def finish(
    total: torch.Tensor,
    ce: torch.Tensor,
    correct: torch.Tensor,
    lse_sq: torch.Tensor | None,
    batch: Batch,
    normalize: str,
) -> LossOutput:
    """Build the :class:`LossOutput` from the differentiable ``total`` and detached per-position values.

    Args:
        total: scalar with gradient, ``Σ weights · (CE + z_loss · lse²)``.
        ce: ``[B, L]`` float32, detached, unweighted CE (0 where unlabelled).
        correct: ``[B, L]`` bool, detached, argmax equals the label (False where unlabelled).
        lse_sq: ``[B, L]`` float32 detached ``logsumexp²`` or ``None`` when no z-loss was asked for.
        batch: the batch scored.
        normalize: one of :data:`NORMALIZERS`.
    """
    count = normalizer(batch, normalize)
    loss = total / count.clamp_min(1.0)
    with torch.no_grad():
        labelled = batch.labels != IGNORE_INDEX
        causal = batch.causal.to(device=ce.device, non_blocking=True)[:, None]
        scale = batch.scale if batch.scale is not None else torch.ones_like(batch.weights[:, 0])
        base_w = batch.weights / scale[:, None].clamp_min(torch.finfo(torch.float32).tiny)
        ar_t = labelled & causal
        md_t = labelled & ~causal
        md_valid = batch.valid_mask() & ~causal
        ar_n = ar_t.sum(dtype=torch.float32)
        md_n = md_t.sum(dtype=torch.float32)
        md_v = md_valid.sum(dtype=torch.float32)
        all_n = labelled.sum(dtype=torch.float32)
        metrics = {
            "ar/loss": (ce * ar_t).sum() / ar_n.clamp_min(1.0),
            "ar/tokens": ar_n,
            "md/loss": (ce * base_w * md_t).sum() / md_v.clamp_min(1.0),
            "md/tokens": md_n,
            "md/mask_rate": md_n / md_v.clamp_min(1.0),
            "accuracy": (correct & labelled).sum(dtype=torch.float32) / all_n.clamp_min(1.0),
        }
        if batch.component is not None:  # a mixture's batch: metrics per named component as well
            component = batch.component.to(device=ce.device, non_blocking=True)
            metrics.update(component_metrics(ce * base_w * labelled, labelled, batch.valid_mask(), component,
                                             batch.component_names))
        if lse_sq is not None:
            metrics["z_loss"] = (lse_sq * labelled).sum() / all_n.clamp_min(1.0)
    return LossOutput(loss=loss, total=total, count=count, metrics=metrics)


def check_batch_against(output_shape: torch.Size, batch: Batch, argument: str, what: str) -> None:
    """Check that the first two dims of a model output match the batch's ``[B, L]``."""
    if not isinstance(batch, Batch):
        raise fail_type("batch", "a dualobj Batch", type(batch).__name__)
    B, L = batch.shape
    if len(output_shape) != 3 or tuple(output_shape[:2]) != (B, L):
        raise fail(argument, f"{what} of shape [B, L, *] = [{B}, {L}, *] (from batch.input_ids)",
                   f"shape {list(output_shape)}")


def cross_entropy(
    logits: torch.Tensor,
    batch: Batch,
    *,
    z_loss: float = 0.0,
    normalize: str = "valid",
) -> LossOutput:
    r"""Weighted cross-entropy of ``logits`` against a :class:`Batch`, in float32 whatever the logits' dtype.

    .. math::
        \text{total} = \sum_{b,i} w_{b,i}\big(\mathrm{CE}(\ell_{b,i}, y_{b,i}) + \zeta\,\mathrm{lse}(\ell_{b,i})^2\big),
        \qquad \text{loss} = \text{total} / \text{count}

    Args:
        logits: ``[B, L, V]`` model output (any float dtype).
        batch: from an objective's ``prepare``; ``labels`` and ``weights`` are ``[B, L]``.
        z_loss: coefficient ``ζ`` of the z-loss ``logsumexp(logits)²`` (PaLM), weighted like the CE.
        normalize: the denominator, one of ``"valid"``, ``"positions"``, ``"targets"``, ``"none"``
            (see :data:`NORMALIZERS`).

    While validation is on (the default; :func:`dualobj.set_validation`) labels outside ``[0, V)`` and NaN/inf
    in the logits or the batch weights are refused. These checks read tensor values (a device-to-host sync on an
    accelerator); with validation off, and inside ``torch.compile``, they are skipped.

    Returns:
        :class:`LossOutput`. An all-ignored batch gives ``loss == 0`` with zero gradients.

    Example:
        >>> import torch
        >>> from dualobj.objectives import ARObjective, cross_entropy
        >>> batch = ARObjective().prepare(torch.tensor([[1, 2, 3, 4]]))
        >>> out = cross_entropy(torch.zeros(1, 4, 8), batch)
        >>> round(out.loss.item(), 4) == round(float(torch.log(torch.tensor(8.0))), 4)
        True
    """
    check_tensor("logits", logits, floating=True)
    check_batch_against(logits.shape, batch, "logits", "logits")
    check_number("z_loss", z_loss, low=0)
    check_choice("normalize", normalize, NORMALIZERS)
    V = logits.shape[-1]
    if V == 0:
        raise fail("logits", "a vocabulary dimension V >= 1", f"shape {list(logits.shape)}")
    check_labels(batch.labels, V)
    check_finite("logits", logits)
    check_finite("batch.weights", batch.weights)
    dtype = compute_dtype(logits.dtype)
    flat = logits.reshape(-1, V).to(dtype)
    labels = batch.labels.reshape(-1)
    ce = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="none")
    weights = batch.weights.reshape(-1).to(dtype)
    per_pos = ce
    lse_sq = None
    if z_loss > 0:
        lse = torch.logsumexp(flat, dim=-1)
        lse_sq = lse.square() * (labels != IGNORE_INDEX)
        per_pos = per_pos + z_loss * lse_sq
    total = (per_pos * weights).sum()
    with torch.no_grad():
        correct = flat.argmax(dim=-1) == labels
    B, L = batch.shape
    return finish(
        total,
        ce.detach().float().view(B, L),
        correct.view(B, L),
        None if lse_sq is None else lse_sq.detach().float().view(B, L),
        batch,
        normalize,
    )
