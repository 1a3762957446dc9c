"""A Lightning module training the reference transformer on the dual objective, with torchmetrics logging.

    python examples/lightning_module.py --steps 20

Lightning's DDP averages gradients over ranks, so the step loss goes through ``global_loss`` (the global count,
times the world size); the ``Metric`` objects sync themselves when logged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from dualobj.data import ByteTokenizer
from dualobj.integrations import global_loss
from dualobj.metrics import ARPerplexity, NLLPerToken
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import ARObjective, DualObjective, MDObjective

TOK = ByteTokenizer()


class DualLM(L.LightningModule):
    """The reference transformer trained on α·L_AR + (1 − α)·L_MD."""

    def __init__(self, alpha: float = 0.5, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = Transformer(TransformerConfig(vocab_size=TOK.vocab_size, dim=64, layers=2, heads=4,
                                                   backend="math"))
        self.objective = DualObjective(alpha, md=MDObjective(TOK.mask_id, num_special=TOK.num_special))
        self.lr = lr
        self.generator = torch.Generator().manual_seed(0)
        self.train_loss = NLLPerToken()  # Σ total / Σ count over the epoch and every rank
        self.val_ppl = ARPerplexity()

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        batch = self.objective.prepare(tokens, step=self.global_step, generator=self.generator)
        hidden = self.model(batch.input_ids, causal=batch.causal, doc_ids=batch.doc_ids)
        out = self.objective.loss(hidden, batch, head=self.model.lm_head)
        self.train_loss.update(out)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/epoch_loss", self.train_loss, on_step=False, on_epoch=True)
        return global_loss(out)  # exact over ranks; equals out.loss on one process

    def validation_step(self, tokens: torch.Tensor, batch_idx: int) -> None:
        batch = ARObjective().prepare(tokens)
        logits = self.model.logits(batch.input_ids, causal=batch.causal)
        self.val_ppl.update(logits, tokens)
        self.log("val/ar_perplexity", self.val_ppl, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loaders(length: int = 64, batch_size: int = 4) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    ids = TOK.encode(Path(__file__).read_bytes())
    n = ids.numel() // length
    rows = ids[: n * length].view(n, length)
    train = torch.utils.data.DataLoader(rows[:-4], batch_size=batch_size, shuffle=True)
    val = torch.utils.data.DataLoader(rows[-4:], batch_size=batch_size)
    return train, val


def main(steps: int = 20) -> dict[str, float]:
    """Fit one epoch of ``steps`` steps, validate on one batch; return the logged metrics."""
    L.seed_everything(0, verbose=False)
    module = DualLM()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=1, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    train, val = loaders()
    trainer.fit(module, train, val)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    print(main(parser.parse_args().steps))
