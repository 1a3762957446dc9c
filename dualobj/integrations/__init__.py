"""Bridges to training stacks: dense attention masks for Hugging Face models, a ``Trainer`` subclass, and the
count helpers for exact normalisation under gradient accumulation and data parallelism.

:class:`DualObjectiveTrainer` needs ``transformers`` (the ``hf`` extra) and is imported on first use.
"""

from __future__ import annotations

from typing import Any

from dualobj.integrations._masks import additive_attention_mask, allowed_keys, layout_allowed_keys
from dualobj.objectives import batch_count, global_count, global_loss

__all__ = [
    "DualObjectiveTrainer",
    "additive_attention_mask",
    "allowed_keys",
    "batch_count",
    "global_count",
    "global_loss",
    "layout_allowed_keys",
]


def __getattr__(name: str) -> Any:
    if name == "DualObjectiveTrainer":
        from dualobj.integrations._hf import DualObjectiveTrainer

        return DualObjectiveTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
