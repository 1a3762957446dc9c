"""Data-parallel training with the paper's per-rank split, launched by torchrun (gloo on CPU, NCCL on GPUs).

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --steps 10

Each rank runs one objective per step (``split="rank"``: ``α·W`` ranks AR, the rest MD, rotating every data
epoch), every rank divides its summed loss by the count over all ranks, and DDP's gradient average is undone by
``global_loss``, so the update equals that of one process on the whole global batch. Run without torchrun it
trains on one process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dualobj.data import ByteTokenizer
from dualobj.integrations import global_loss
from dualobj.metrics import ARPerplexity, NLLPerToken
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import ARObjective, DualObjective, MDObjective, cross_entropy

TOK = ByteTokenizer()


class LM(nn.Module):
    """Transformer plus output layer, so DDP sees every parameter used inside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Transformer(TransformerConfig(vocab_size=TOK.vocab_size, dim=64, layers=2, heads=4,
                                                 backend="math"))

    def forward(self, input_ids: torch.Tensor, causal: torch.Tensor, doc_ids: torch.Tensor | None = None):
        return self.net.logits(input_ids, causal=causal, doc_ids=doc_ids)


def main(steps: int = 10, batch_size: int = 4, length: int = 64) -> dict[str, float]:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")

    ids = TOK.encode(Path(__file__).read_bytes())
    n = ids.numel() // length
    rows = ids[: n * length].view(n, length)
    shard = rows[rank::world]  # this rank's data shard
    steps_per_epoch = max(1, shard.shape[0] // batch_size)

    torch.manual_seed(0)  # same initial weights on every rank
    model = LM().to(device)
    ddp = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    alpha = 0.5 if world % 2 == 0 else 1.0 / world  # α·W must be a whole number of ranks
    objective = DualObjective(alpha, md=MDObjective(TOK.mask_id, num_special=TOK.num_special), split="rank",
                              steps_per_epoch=steps_per_epoch)
    generator = torch.Generator().manual_seed(1000 + rank)
    train_loss = NLLPerToken()

    for step in range(steps):
        i = (step % steps_per_epoch) * batch_size
        batch = objective.prepare(shard[i : i + batch_size], step=step, generator=generator).to(device)
        logits = ddp(batch.input_ids, batch.causal, batch.doc_ids)
        out = cross_entropy(logits, batch)
        global_loss(out).backward()  # total·W / (count over all ranks); DDP averages the gradients
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss.update(out)

    perplexity = ARPerplexity().to(device)  # held-out rows split over ranks; compute() syncs the sums
    with torch.no_grad():
        held = rows[-2 * world :][rank::world].to(device)
        ar = ARObjective().prepare(held)
        perplexity.update(model(ar.input_ids, ar.causal), held)
    result = {"train_loss": float(train_loss.compute()), "ar_perplexity": float(perplexity.compute())}
    if rank == 0:
        print(f"world={world} alpha={alpha}", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    main(parser.parse_args().steps)
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
