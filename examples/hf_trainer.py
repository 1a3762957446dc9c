"""Train a tiny Llama (random init, no download) with the Hugging Face Trainer on the dual objective.

    python examples/hf_trainer.py --steps 20

The corpus is this file's own bytes. Byte ids are 0..255; id 256 is <mask>.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from dualobj.integrations import DualObjectiveTrainer
from dualobj.objectives import DualObjective, MDObjective

MASK_ID = 256
VOCAB = 260


class ByteChunks(torch.utils.data.Dataset):
    """Fixed-length byte chunks of a text: items are ``{"input_ids": [L]}``."""

    def __init__(self, data: bytes, length: int) -> None:
        ids = torch.tensor(list(data), dtype=torch.long)
        n = ids.numel() // length
        self.rows = ids[: n * length].view(n, length)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        attn_implementation="sdpa",  # "eager" takes the same 4D additive mask
    )
    return LlamaForCausalLM(config)


def build_trainer(
    output_dir: str, *, steps: int = 20, alpha: float = 0.5, accumulation: int = 2, seed: int = 0
) -> DualObjectiveTrainer:
    objective = DualObjective(alpha, md=MDObjective(MASK_ID, special_ids=[MASK_ID]))
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=3e-3,
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    dataset = ByteChunks(Path(__file__).read_bytes(), length=64)
    return DualObjectiveTrainer(model=tiny_llama(seed), args=args, train_dataset=dataset, objective=objective)


def main(steps: int = 20) -> list[float]:
    """Train ``steps`` optimizer steps; return the logged training losses."""
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(out, steps=steps)
        trainer.train()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    losses = main(parser.parse_args().steps)
    print("logged losses:", [round(x, 3) for x in losses])
