"""Exact loss normalisation over data-parallel ranks and gradient-accumulation micro-batches.

The rule (as torchtitan and Hugging Face ``num_items_in_batch`` apply it): every micro-batch on every rank divides
its summed loss ``total`` by one number, the count summed over all micro-batches of the step and all ranks. Then
each token (or each counted position) weighs the same wherever it sits, and the accumulated gradient equals the
gradient of the single-process loss on the whole global batch.
"""

from __future__ import annotations

import torch

from dualobj._errors import check_choice, fail
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
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(b, Batch) for b in items):
        raise fail("batches", "a Batch or a non-empty list of Batch", type(batches).__name__)
    return torch.stack([normalizer(b, normalize) for b in items]).sum()


def global_count(count: torch.Tensor | float, *, group: object | None = None) -> torch.Tensor:
    """Sum ``count`` over the ranks of ``group`` (identity when ``torch.distributed`` is not initialised).

    One ``all_reduce`` (a collective: every rank of ``group`` must call it). The result stays on the device of
    ``count`` (no host sync; with NCCL keep it on the GPU) and carries no gradient.

    Args:
        count: scalar, this rank's count (e.g. :func:`batch_count` over its micro-batches).
        group: the process group (default: the world).

    Returns:
        float32 scalar, the count over all ranks.
    """
    count = torch.as_tensor(count).detach().to(torch.float32).clone()
    if count.numel() != 1:
        raise fail("count", "a scalar", f"shape {list(count.shape)}")
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

    Returns:
        float32 scalar ``output.total * W / N`` (``W = 1`` without ``ddp_average`` or ``torch.distributed``);
        0 when ``N`` is 0.
    """
    if not isinstance(output, LossOutput):
        raise fail("output", "a LossOutput", type(output).__name__)
    local = output.count if count is None else count
    total_count = torch.as_tensor(local).detach().float() if reduced else global_count(local, group=group)
    world = 1
    if ddp_average and _dist_ready():
        world = torch.distributed.get_world_size(group)
    return output.total * world / total_count.to(output.total.device).clamp_min(1.0)
