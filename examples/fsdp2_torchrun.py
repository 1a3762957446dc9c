"""The dual objective under FSDP2 (``torch.distributed.fsdp.fully_shard``) with the fused loss, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_torchrun.py --steps 10
    torchrun --standalone --nproc_per_node 2 examples/fsdp2_torchrun.py --steps 10 --tied --accumulate 2

Every transformer block is its own FSDP2 unit, the output layer is a unit of its own (untied) or shares the root
unit with the embedding it is tied to (``--tied``), and the root module holds the rest. The loss never builds the
``[B, L, V]`` logits: ``objective.loss(hidden, batch, head=model.lm_head)`` runs the fused linear cross-entropy.
Given the ``fully_shard``-ed ``lm_head`` module, the loss unshards it (``lm_head.unshard()``) before reading its
weight, and FSDP reduce-scatters the weight's gradient at the end of the backward. Every micro-batch divides its
summed loss by the count over all micro-batches and all ranks (``global_loss``), so the update equals that of one
process on the whole global batch. Gloo on the CPU, NCCL on GPUs; without torchrun it runs on one process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dualobj.data import ByteTokenizer
from dualobj.metrics import NLLPerToken
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import DualObjective, MDObjective, batch_count, global_count, global_loss

TOK = ByteTokenizer()


def build(*, tied: bool, device: torch.device) -> Transformer:
    """The reference transformer; with ``tied`` its output layer shares the embedding's weight."""
    torch.manual_seed(0)  # same initial weights on every rank
    model = Transformer(TransformerConfig(vocab_size=TOK.vocab_size, dim=64, layers=2, heads=4, backend="math"))
    if tied:
        model.lm_head.weight = model.embed.weight
    return model.to(device)


def shard(model: Transformer, mesh: object, *, tied: bool) -> Transformer:
    """Wrap the blocks, the untied output layer and the root in ``fully_shard`` (tied weights share one unit)."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    if not tied:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(steps: int = 10, batch_size: int = 4, length: int = 64, *, tied: bool = False,
         accumulate: int = 1) -> dict[str, float]:
    """Train ``steps`` optimizer steps of ``accumulate`` micro-batches; return the synced mean training loss."""
    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    ids = TOK.encode(Path(__file__).read_bytes())
    n = ids.numel() // length
    rows = ids[: n * length].view(n, length)[rank::world]  # this rank's data shard

    model = build(tied=tied, device=device)
    if distributed:  # one process needs no sharding (world size 1 works too and still goes through DTensor)
        shard(model, init_device_mesh(device.type, (world,)), tied=tied)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    objective = DualObjective(0.5, md=MDObjective(TOK.mask_id, num_special=TOK.num_special))
    generator = torch.Generator().manual_seed(1000 + rank)
    train_loss = NLLPerToken()

    for step in range(steps):
        micro = []
        for k in range(accumulate):
            i = ((step * accumulate + k) * batch_size) % max(1, rows.shape[0] - batch_size)
            micro.append(objective.prepare(rows[i : i + batch_size], step=step, generator=generator).to(device))
        count = global_count(batch_count(micro))  # known before any forward: one all-reduce per step
        for k, batch in enumerate(micro):
            if distributed:  # reduce-scatter the gradients only after the last micro-batch
                model.set_requires_gradient_sync(k == accumulate - 1)
            hidden = model(batch.input_ids, causal=batch.causal, doc_ids=batch.doc_ids)
            out = objective.loss(hidden, batch, head=model.lm_head)
            global_loss(out, count=count, reduced=True).backward()
            train_loss.update(out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {"train_loss": float(train_loss.compute())}  # compute() sums over ranks
    if rank == 0:
        print(f"world={world} tied={tied} accumulate={accumulate}", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tied", action="store_true", help="tie the output layer to the embedding")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    args = parser.parse_args()
    main(args.steps, tied=args.tied, accumulate=args.accumulate)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
