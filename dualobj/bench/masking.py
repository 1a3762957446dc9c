"""The ``masking`` suite: dualobj's batched masks beside per-row loops, a full sort and Hugging Face's collator.

Every case masks the same ``[B, L]`` token batch (64 × 2048 by default; ids ``< 16`` are special and never
masked, as in the paper's tokenizer). Masks are random, so implementations cannot agree position by position; the
check instead holds each one to its own promise: no special position masked, exact counts where an implementation
promises them (``max(1, ⌊n·rate⌋)`` to ``⌊n·rate⌋ + 1``, two more for
whole uniform{1..3} spans), and otherwise a mean rate within 5 standard errors of the
target (the Hugging Face collator and the Bernoulli mask). Targets are the goals of ``docs/masking.md``: exact
counts ≥ 1.5× the per-row loop and ≥ 5× the Hugging Face collator, span masking ≥ 3× the per-row span loop.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dualobj.bench import _baselines_masking as base
from dualobj.bench._core import Case, Context, Impl

NUM_SPECIAL = 16
VOCAB = 51200
MASK_ID = 4
SEED = 0

QUICK = {"batch": 8, "length": 256}
FULL = {"batch": 64, "length": 2048}


def _tokens(sizes: dict[str, int], device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, VOCAB, (sizes["batch"], sizes["length"]), generator=gen)
    tokens[:, 0] = 1  # every row starts with BOS, as the paper's packed rows do
    return tokens.to(device)


def _generator(device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(SEED + 1)


def _check(
    tokens: torch.Tensor, rates: torch.Tensor, *, exact: set[str], whole_spans: dict[str, int] | None = None
) -> Callable[[dict[str, Any]], str | None]:
    """Each output is a ``[B, L]`` bool mask; see the module docstring for what is required of it."""
    allowed = (tokens >= NUM_SPECIAL).cpu()
    n = allowed.sum(1)
    rates = rates.cpu().double()
    low = torch.floor(n * rates).long().clamp_min(1)
    spans = whole_spans or {}

    def check(outputs: dict[str, Any]) -> str | None:
        for name, mask in outputs.items():
            mask = mask.cpu()
            if (mask & ~allowed).any():
                return f"{name}: a special position is masked"
            count = mask.sum(1)
            extra = 1 + spans.get(name, 0)
            if name in exact or name in spans:
                if ((count < low) | (count > torch.floor(n * rates).long() + extra)).any():
                    return f"{name}: per-row counts {count.tolist()[:4]}... outside [⌊n·rate⌋, ⌊n·rate⌋ + {extra}]"
            else:
                total, expected = count.sum().item(), (n * rates).sum().item()
                if abs(total - expected) > 5 * max(1.0, (n * rates * (1 - rates)).sum().item()) ** 0.5:
                    return f"{name}: {total} masked in all, expected about {expected:.0f}"
        return None

    return check


def _ours_exact(tokens: torch.Tensor, rates: torch.Tensor, ctx: Context) -> Callable[[], Any]:
    from dualobj.masking import maskable_positions, random_mask

    gen = _generator(ctx.device)

    def run() -> torch.Tensor:
        allowed = maskable_positions(tokens, num_special=NUM_SPECIAL)
        return random_mask(tokens, rates, maskable=allowed, min_count=1, generator=gen)

    return run


def _ours_bernoulli(tokens: torch.Tensor, rates: torch.Tensor, ctx: Context) -> Callable[[], Any]:
    from dualobj.masking import maskable_positions, random_mask

    gen = _generator(ctx.device)
    return lambda: random_mask(tokens, rates, exact=False, maskable=maskable_positions(tokens, num_special=NUM_SPECIAL),
                               generator=gen)


def _ours_hf_equivalent(tokens: torch.Tensor, ctx: Context) -> Callable[[], Any]:
    """What the collator does, with dualobj: rows → batch, exact 15% mask, 80/10/10, labels."""
    from dualobj.masking import corrupt, maskable_positions, random_mask

    gen = _generator(ctx.device)
    rows = list(tokens)

    def run() -> torch.Tensor:
        batch = torch.stack(rows)
        mask = random_mask(batch, 0.15, maskable=maskable_positions(batch, num_special=NUM_SPECIAL), generator=gen)
        corrupt(batch, mask, mask_token_id=MASK_ID, random_p=0.1, keep_p=0.1, vocab_range=(NUM_SPECIAL, VOCAB),
                generator=gen)
        labels = torch.where(mask, batch, -100)
        return labels != -100

    return run


def _ours_span(tokens: torch.Tensor, rate: float, lengths: Any, ctx: Context) -> Callable[[], Any]:
    from dualobj.masking import maskable_positions, span_mask

    gen = _generator(ctx.device)

    def run() -> torch.Tensor:
        allowed = maskable_positions(tokens, num_special=NUM_SPECIAL)
        return span_mask(tokens, rate, lengths=lengths, maskable=allowed, min_count=1, generator=gen)

    return run


def _hf_available() -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install 'dualobj[hf]')"
    return None


def cases(ctx: Context) -> list[Case]:
    """Exact-count (p = 0.15 and the paper's t ~ U(0, 1)), mask + 80/10/10 against HF, uniform and T5 spans."""
    from dualobj.masking import T5Spans, UniformSpans

    sizes = dict(QUICK if ctx.quick else FULL)
    B, L = sizes["batch"], sizes["length"]
    label = f"{B}x{L}"
    tokens = _tokens(sizes, ctx.device)
    common: dict[str, Any] = {"sizes": sizes, "units": B * L, "unit": "tok"}
    flat = torch.full((B,), 0.15, device=ctx.device)
    diffusion = torch.rand(B, generator=torch.Generator().manual_seed(SEED + 2)).to(ctx.device)

    def loop(rates: torch.Tensor) -> Impl:
        return Impl("paper loop", lambda: lambda: base.paper_exact_loop(tokens, rates, NUM_SPECIAL,
                                                                         _generator(ctx.device)))

    def sort(rates: torch.Tensor) -> Impl:
        return Impl("argsort", lambda: lambda: base.sorted_exact(tokens, rates, NUM_SPECIAL, _generator(ctx.device)))

    rng = np.random.default_rng(SEED)
    return [
        Case(f"exact p=0.15 {label}",
             [Impl("dualobj", lambda: _ours_exact(tokens, flat, ctx), ours=True), loop(flat), sort(flat),
              Impl("bernoulli", lambda: _ours_bernoulli(tokens, flat, ctx))],
             check=_check(tokens, flat, exact={"dualobj", "paper loop", "argsort"}),
             targets={"paper loop": 1 / 1.5}, **common),
        Case(f"exact t~U(0,1) {label}",
             [Impl("dualobj", lambda: _ours_exact(tokens, diffusion, ctx), ours=True), loop(diffusion),
              sort(diffusion)],
             check=_check(tokens, diffusion, exact={"dualobj", "paper loop", "argsort"}),
             targets={"paper loop": 1 / 1.5}, **common),
        Case(f"mask+80/10/10 p=0.15 {label}",
             [Impl("dualobj", lambda: _ours_hf_equivalent(tokens, ctx), ours=True),
              Impl("HF collator", lambda: base.hf_collator(tokens, VOCAB, NUM_SPECIAL, SEED),
                   available=_hf_available())],
             check=_check(tokens, flat, exact=set()), targets={"HF collator": 1 / 5}, **common),
        Case(f"span uniform{{1..3}} p=0.15 {label}",
             [Impl("dualobj", lambda: _ours_span(tokens, 0.15, UniformSpans(3), ctx), ours=True),
              Impl("paper span loop", lambda: lambda: base.paper_span_loop(tokens, 0.15, NUM_SPECIAL, 3,
                                                                           _generator(ctx.device)))],
             check=_check(tokens, flat, exact={"dualobj"}, whole_spans={"paper span loop": 2}),
             targets={"paper span loop": 1 / 3}, **common),
        Case(f"span T5 r=0.15 μ=3 {label}",
             [Impl("dualobj", lambda: _ours_span(torch.full_like(tokens, NUM_SPECIAL), 0.15, T5Spans(3.0), ctx),
                   ours=True),
              Impl("T5 numpy per row", lambda: lambda: base.t5_loop((B, L), 0.15, 3.0, rng))],
             check=_t5_check(B, L), **common),
    ]


def _t5_check(B: int, L: int) -> Callable[[dict[str, Any]], str | None]:
    noise = min(max(round(L * 0.15), 1), L - 1)
    spans = max(round(noise / 3.0), 1)

    def check(outputs: dict[str, Any]) -> str | None:
        for name, mask in outputs.items():
            mask = mask.cpu()
            starts = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0].long()
            if (mask.sum(1) != noise).any() or (starts != spans).any():
                return f"{name}: expected {noise} noise tokens in {spans} spans per row"
        return None

    return check
