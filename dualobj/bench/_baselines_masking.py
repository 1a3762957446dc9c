"""Baselines for the ``masking`` suite, written the way public pretraining code masks (one row at a time).

- :func:`paper_exact_loop`: the dual-objective paper's diffusion masking. Per row: uniform scores, special ids
  pushed to +inf, a stochastically rounded count ``k = max(1, int(n·t + u))`` read back to Python, and the mask
  ``score <= (k-th smallest score)`` from ``topk``.
- :func:`paper_span_loop`: the same code base's span masking (GPT-BERT). Per row: the sequence is tiled by spans of
  length uniform on {1, ..., m}, each span's positions share one score, and the same top-k threshold takes whole
  spans (so the count is ``k`` to ``k + m − 1``).
- :func:`t5_loop`: T5's ``random_spans_noise_mask`` in numpy, called once per row (as the Flax T5 collator and
  fairseq do).
- :func:`sorted_exact`: a batched exact-count mask by a full ``argsort`` of random scores (what dualobj did before
  its radix selection).
- :func:`hf_collator`: Hugging Face ``DataCollatorForLanguageModeling(mlm_probability=0.15)`` with a word-level
  tokenizer built in memory (no download).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _paper_apply_mask(row: torch.Tensor, scores: torch.Tensor, rate: float, num_special: int,
                      generator: torch.Generator) -> torch.Tensor:
    """The paper code's per-row selection: specials at +inf, ``k = max(1, int(n·rate + u))`` read back to Python,
    then every position whose score is at most the ``k``-th smallest (``[L]`` bool)."""
    special = row < num_special
    scores[special] = float("inf")
    n = int((~special).sum())
    k = max(1, int(n * rate + torch.rand(1, generator=generator, device=row.device).item()))
    threshold = torch.topk(scores, k, largest=False).values.max()
    return scores <= threshold


def paper_exact_loop(
    tokens: torch.Tensor, rates: torch.Tensor, num_special: int, generator: torch.Generator
) -> torch.Tensor:
    """Exact-count masks, one row at a time with host reads (``[B, L]`` bool)."""
    masks = []
    for row, rate in zip(tokens, rates.tolist()):
        scores = torch.rand(row.shape, generator=generator, device=row.device)
        masks.append(_paper_apply_mask(row, scores, rate, num_special, generator))
    return torch.stack(masks)


def paper_span_loop(
    tokens: torch.Tensor, rate: float, num_special: int, max_span: int, generator: torch.Generator
) -> torch.Tensor:
    """Whole-span masks from a tiling with lengths uniform on {1..max_span}, one row at a time (``[B, L]`` bool)."""
    masks = []
    for row in tokens:
        L = row.shape[0]
        lengths = torch.randint(1, max_span + 1, (L,), generator=generator, device=row.device)
        scores = torch.rand(L, generator=generator, device=row.device).repeat_interleave(lengths)[:L]
        masks.append(_paper_apply_mask(row, scores, rate, num_special, generator))
    return torch.stack(masks)


def _segment_lengths(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of ``total`` into ``parts`` positive lengths."""
    first = np.zeros(total, dtype=np.int64)
    first[1:] = rng.permutation(total - 1) < parts - 1
    return np.bincount(np.cumsum(first), minlength=parts)


def t5_row(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask for one row of ``length`` tokens (``[length]`` bool)."""
    noise = min(max(int(np.round(length * density)), 1), length - 1)
    spans = max(int(np.round(noise / mean_span)), 1)
    noise_lengths = _segment_lengths(noise, spans, rng)
    clean_lengths = _segment_lengths(length - noise, spans, rng)
    interleaved = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    marks = np.zeros(length, dtype=np.int64)
    marks[np.cumsum(interleaved)[:-1]] = 1
    return np.cumsum(marks) % 2 == 1


def t5_loop(shape: tuple[int, int], density: float, mean_span: float, rng: np.random.Generator) -> torch.Tensor:
    """T5 noise masks, one numpy call per row (``[B, L]`` bool)."""
    B, L = shape
    return torch.from_numpy(np.stack([t5_row(L, density, mean_span, rng) for _ in range(B)]))


def sorted_exact(
    tokens: torch.Tensor, rates: torch.Tensor, num_special: int, generator: torch.Generator
) -> torch.Tensor:
    """Batched exact-count masks by ranking random scores with a full ``argsort`` (``[B, L]`` bool)."""
    B, L = tokens.shape
    allowed = tokens >= num_special
    n = allowed.sum(1)
    u = torch.rand(B, generator=generator, device=tokens.device)
    k = torch.floor(rates * n + u).long().clamp_min(1)
    scores = torch.rand(B, L, generator=generator, device=tokens.device).masked_fill(~allowed, 2.0)
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=tokens.device).expand(B, L))
    return rank < k[:, None]


def hf_collator(tokens: torch.Tensor, vocab: int, num_special: int, seed: int) -> Callable[[], Any]:
    """Hugging Face's MLM collator on ``B`` 1-D LongTensor rows; the callable returns the masked positions.

    All ``num_special`` low ids are registered as special tokens, so the collator excludes them as dualobj does.
    """
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    names = [f"<special{i}>" for i in range(num_special)] + [f"w{i}" for i in range(num_special, vocab)]
    backend = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token=names[0]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=names[0], bos_token=names[1], eos_token=names[2], pad_token=names[3],
        mask_token=names[4], additional_special_tokens=names[5:num_special],
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=seed, return_tensors="pt")
    features = list(tokens.cpu())

    def run() -> torch.Tensor:
        return collator(features)["labels"] != -100

    return run
