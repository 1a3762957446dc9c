"""A plain PyTorch training loop on the dual objective, with gradient accumulation and synced metrics.

    python examples/plain_loop.py --steps 20

The same script runs data-parallel under torchrun (see examples/ddp_torchrun.py for the DDP wrapping): the loss
is normalised by the count over every micro-batch and every rank, and the metrics sync themselves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dualobj.data import ByteTokenizer
from dualobj.integrations import batch_count, global_count, global_loss
from dualobj.metrics import ARPerplexity, NLLPerToken, TokenAccuracy
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import ARObjective, DualObjective, MDObjective, cross_entropy

TOK = ByteTokenizer()


def rows(length: int = 64) -> torch.Tensor:
    """``[N, length]`` byte-token rows of this file's own text."""
    ids = TOK.encode(Path(__file__).read_bytes())
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


def main(steps: int = 20, micro_batches: int = 2, batch_size: int = 4, seed: int = 0) -> dict[str, float]:
    """Train ``steps`` optimizer steps; return the final loss and the held-out metrics."""
    torch.manual_seed(seed)
    data = rows()
    train, heldout = data[:-4], data[-4:]
    model = Transformer(TransformerConfig(vocab_size=TOK.vocab_size, dim=64, layers=2, heads=4, backend="math"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    md = MDObjective(TOK.mask_id, num_special=TOK.num_special)
    objective = DualObjective(0.5, md=md)
    generator = torch.Generator().manual_seed(seed)

    loss_value = float("nan")
    for step in range(steps):
        # 1. prepare every micro-batch of the step, so the denominator is known before any backward
        #    (every objective takes step=; one with a scheduled weight needs it)
        starts = torch.randint(0, train.shape[0] - batch_size + 1, (micro_batches,), generator=generator)
        batches = [objective.prepare(train[s : s + batch_size], step=step, generator=generator) for s in starts]
        count = global_count(batch_count(batches))  # summed over micro-batches, then over ranks
        # 2. one backward per micro-batch; the gradients add up to that of the global mean
        loss_value = 0.0
        for batch in batches:
            hidden = model(batch.input_ids, causal=batch.causal, doc_ids=batch.doc_ids)
            out = objective.loss(hidden, batch, head=model.lm_head)
            loss = global_loss(out, count=count, reduced=True)
            loss.backward()
            loss_value += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # 3. held-out metrics (each keeps summed states, so under DDP compute() is the exact global value)
    perplexity, accuracy, elbo = ARPerplexity(), TokenAccuracy(shift=False), NLLPerToken()
    with torch.no_grad():
        ar = ARObjective().prepare(heldout)
        logits = model.logits(ar.input_ids, causal=ar.causal)
        perplexity.update(logits, heldout)  # raw tokens: the metric shifts them
        accuracy.update(logits, ar.labels)  # Batch.labels are already aligned: shift=False
        mdb = md.prepare(heldout, generator=torch.Generator().manual_seed(1))
        elbo.update(cross_entropy(model.logits(mdb.input_ids, causal=mdb.causal), mdb))
    return {
        "loss": loss_value,
        "ar_perplexity": float(perplexity.compute()),
        "accuracy": float(accuracy.compute()),
        "md_elbo": float(elbo.compute()),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    print(main(parser.parse_args().steps))
