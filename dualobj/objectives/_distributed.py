"""Exact loss normalisation over data-parallel ranks and gradient-accumulation micro-batches."""

from __future__ import annotations

import torch

from dualobj._errors import fail
from dualobj.objectives._batch import LossOutput


def global_count(count: torch.Tensor, *, group: object | None = None) -> torch.Tensor:
    """Sum ``count`` over the ranks of ``group`` (identity when ``torch.distributed`` is not initialised).

    The result stays on the device (no host sync) and carries no gradient.
    """
    count = count.detach().clone()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def global_loss(
    output: LossOutput,
    *,
    count: torch.Tensor | None = None,
    group: object | None = None,
    ddp_average: bool = True,
) -> torch.Tensor:
    """The loss normalised by the count over all ranks (and micro-batches), ready for ``backward``.

    Every rank divides its ``total`` by the same global count, so tokens weigh the same wherever they are.
    DDP averages gradients over ranks; with ``ddp_average=True`` the loss is multiplied by the world size to
    cancel that average (turn it off when gradients are summed, e.g. FSDP with its divide factor set to 1).

    Args:
        output: this rank's :class:`LossOutput` for one micro-batch.
        count: the normaliser summed over every micro-batch of the step on this rank; by default this
            micro-batch's ``output.count``. It is all-reduced here.
        group: the process group (default: the world).
        ddp_average: compensate DDP's gradient averaging.

    Returns:
        scalar ``output.total * world / global_count`` (``world`` = 1 without ``ddp_average``).
    """
    if not isinstance(output, LossOutput):
        raise fail("output", "a LossOutput", type(output).__name__)
    total_count = global_count(output.count if count is None else count, group=group)
    world = 1
    dist = torch.distributed
    if ddp_average and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
    return output.total * world / total_count.clamp_min(1.0)
