"""Exact loss normalisation over data-parallel ranks and gradient-accumulation micro-batches.

The rule (as torchtitan and Hugging Face ``num_items_in_batch`` apply it): every micro-batch on every rank divides
its summed loss ``total`` by one number, the count summed over all micro-batches of the step and all ranks. Then
each token (or each counted position) weighs the same wherever it sits, and the accumulated gradient equals the
gradient of the single-process loss on the whole global batch.
"""

from __future__ import annotations

import numbers

import torch

from dualobj._errors import (
    check_bool,
    check_choice,
    check_finite,
    check_number,
    describe,
    fail,
    fail_type,
    validation_enabled,
)
from dualobj.objectives._batch import Batch, LossOutput
from dualobj.objectives._ce import NORMALIZERS, normalizer


def _dist_ready() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def batch_count(batches: Batch | list[Batch], normalize: str = "valid") -> torch.Tensor:
    """The loss denominator of one or more prepared batches, known before any forward pass.

    It is the ``count`` that :func:`~dualobj.objectives.cross_entropy` will report with the same ``normalize``,
    summed over ``batches`` (the micro-batches of one optimizer step). For AR rows it counts the targets; for MD
    rows with ``"valid"`` the scorable positions, masked or not (the per-token ELBO), with ``"targets"`` the masked
    ones only. Pass the result to :func:`global_count`, then to :func:`global_loss` as ``count``.

    Args:
        batches: one :class:`Batch` or a list of them.
        normalize: one of ``"valid"``, ``"positions"``, ``"targets"``, ``"none"``.

    Returns:
        float32 scalar on the batches' device, no gradient.
    """
    check_choice("normalize", normalize, NORMALIZERS)
    items = [batches] if isinstance(batches, Batch) else batches
    if not isinstance(items, (list, tuple)) or not all(isinstance(b, Batch) for b in items):
        raise fail_type("batches", "a Batch or a non-empty list of Batch", describe(batches))
    if not items:
        raise fail("batches", "a Batch or a non-empty list of Batch", "an empty list")
    return torch.stack([normalizer(b, normalize) for b in items]).sum()


def _local_count(count: object) -> torch.Tensor:
    """A real scalar (tensor or number) as a detached float32 tensor copy, finite and >= 0 (a Python number is
    checked always; a tensor, a value check, while validation is on)."""
    if isinstance(count, torch.Tensor):
        if count.dtype == torch.bool or count.is_complex():
            raise fail_type("count", "a real scalar tensor or number", describe(count))
        if count.numel() != 1:
            raise fail("count", "a scalar", f"shape {list(count.shape)}")
        out = count.detach().to(torch.float32).reshape(()).clone()
    elif isinstance(count, numbers.Real) and not isinstance(count, bool):
        return torch.tensor(check_number("count", count, low=0.0), dtype=torch.float32)  # checked always: no sync
    else:
        raise fail_type("count", "a real scalar tensor or number", describe(count))
    if validation_enabled():
        check_finite("count", out)
        if bool(out < 0):
            raise fail("count", "a count >= 0", float(out))
    return out


def global_count(count: torch.Tensor | float, *, group: object | None = None) -> torch.Tensor:
    """Sum ``count`` over the ranks of ``group`` (identity when ``torch.distributed`` is not initialised).

    One ``all_reduce`` (a collective: every rank of ``group`` must call it). The result stays on the device of
    ``count`` (no host sync; with NCCL keep it on the GPU) and carries no gradient.

    Args:
        count: scalar, this rank's count (e.g. :func:`batch_count` over its micro-batches): a real scalar tensor or
            number (anything else raises :class:`~dualobj.DualObjTypeError`); NaN, inf or a negative count is
            refused while validation is on.
        group: the process group (default: the world).

    Returns:
        float32 scalar, the count over all ranks.
    """
    count = _local_count(count)
    if _dist_ready():
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM, group=group)
    return count


def global_loss(
    output: LossOutput,
    *,
    count: torch.Tensor | None = None,
    group: object | None = None,
    ddp_average: bool = True,
    reduced: bool = False,
) -> torch.Tensor:
    r"""The loss normalised by the count over all ranks (and micro-batches), ready for ``backward``.

    Every rank divides its ``total`` by the same global count ``N``, so tokens weigh the same wherever they are:

    .. math::
        \text{loss}_r = W \cdot \text{total}_r / N, \qquad
        \frac{1}{W}\sum_r \nabla \text{loss}_r = \nabla \frac{\sum_r \text{total}_r}{N}.

    DDP (and FSDP by default) averages gradients over the ``W`` ranks; with ``ddp_average=True`` the loss is
    multiplied by ``W`` to cancel that average. Turn it off when gradients are summed (FSDP2 with
    ``set_gradient_divide_factor(1.0)``). With gradient accumulation, compute ``count`` over all micro-batches
    first (:func:`batch_count`) and call this once per micro-batch; the gradients then add up to the global one.

    Args:
        output: this rank's :class:`LossOutput` for one micro-batch.
        count: the normaliser over every micro-batch of the step on this rank (all-reduced here), or over every
            rank too with ``reduced=True``; by default this micro-batch's ``output.count``.
        group: the process group (default: the world).
        ddp_average: compensate the data-parallel gradient averaging.
        reduced: ``count`` is already summed over ranks (from :func:`global_count`): no collective here.

    A non-numeric ``count`` raises :class:`~dualobj.DualObjTypeError`; while validation is on, a NaN, infinite or
    negative count is refused (it would otherwise be clamped to 1 and the loss silently mis-scaled).

    Returns:
        float32 scalar ``output.total * W / N`` (``W = 1`` without ``ddp_average`` or ``torch.distributed``);
        0 when ``N`` is 0.
    """
    if not isinstance(output, LossOutput):
        raise fail_type("output", "a LossOutput", describe(output))
    check_bool("ddp_average", ddp_average)
    check_bool("reduced", reduced)
    local = output.count if count is None else count
    total_count = _local_count(local) if reduced else global_count(local, group=group)
    world = 1
    if ddp_average and _dist_ready():
        world = torch.distributed.get_world_size(group)
    return output.total * world / total_count.to(output.total.device).clamp_min(1.0)
