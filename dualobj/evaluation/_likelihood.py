"""Held-out likelihoods of a model in its three modes: AR (causal), MD (ELBO, bidirectional) and prefix LM."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dualobj import _random
from dualobj._errors import (
    check_bool,
    check_choice,
    check_generator,
    check_ids,
    check_int,
    check_number,
    check_tensor,
    describe,
    fail,
    fail_type,
    validation_enabled,
)
from dualobj.masking import random_mask
from dualobj.objectives import ARObjective, Batch, MDObjective
from dualobj.objectives._fused import resolve_head as resolve_output_layer
from dualobj.schedules import sample_counts

LN2 = math.log(2.0)


@dataclass(frozen=True)
class NLL:
    """A summed negative log-likelihood (or bound) and what it was summed over.

    Attributes:
        nats: total, in nats.
        tokens: the number of scored tokens (bytes, with the byte tokenizer).
    """

    nats: float
    tokens: int

    def __post_init__(self) -> None:
        check_number("nats", self.nats)
        check_int("tokens", self.tokens, low=0)

    @property
    def per_token(self) -> float:
        """Mean nats per token (``nan`` when nothing was scored)."""
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_token(self) -> float:
        """Mean bits per token: bits per byte with the byte tokenizer."""
        return self.per_token / LN2


def resolve_head(model: nn.Module, head: nn.Linear | torch.Tensor | None) -> nn.Linear | torch.Tensor:
    """``head`` if given, else ``model.lm_head``."""
    if not callable(model):
        raise fail_type("model", "a callable model (an nn.Module)", describe(model))
    if head is not None:
        if not isinstance(head, (nn.Linear, nn.Embedding, torch.Tensor)):
            raise fail_type("head", "an nn.Linear, a tied nn.Embedding, a [V, H] weight tensor or None",
                            describe(head))
        return head
    out = getattr(model, "lm_head", None)
    if out is None:
        raise fail("head", "an output layer (or a model with an lm_head attribute)", describe(model))
    if not isinstance(out, (nn.Linear, torch.Tensor)):
        raise fail_type("head", "an nn.Linear or a [V, H] weight tensor as model.lm_head", describe(out))
    return out


def head_weight(head: nn.Linear | nn.Embedding | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of an output layer given as ``nn.Linear``, a tied ``nn.Embedding`` or
    a weight (the losses' :func:`~dualobj.objectives._fused.resolve_head`, FSDP2-sharded heads included)."""
    weight, bias = resolve_output_layer(head)
    return check_tensor("head", weight, ndim=2, floating=True), bias


def _chunks(tokens: torch.Tensor, doc_ids: torch.Tensor | None, batch_size: int) -> Iterator[tuple]:
    for s in range(0, tokens.shape[0], batch_size):
        yield s, tokens[s:s + batch_size], None if doc_ids is None else doc_ids[s:s + batch_size]


def _check_rows(tokens: torch.Tensor, doc_ids: torch.Tensor | None, head: nn.Linear | torch.Tensor,
                batch_size: int) -> None:
    """Structural checks of the rows and the batch size; the token ids (a value check) against the head's size."""
    check_tensor("tokens", tokens, ndim=2, integer=True)
    if doc_ids is not None:
        check_tensor("doc_ids", doc_ids, shape=tuple(tokens.shape), integer=True)
    check_int("batch_size", batch_size, low=1)
    check_ids("tokens", tokens, high=head_weight(head)[0].shape[0])


def _score(model: nn.Module, batch: Batch, head: nn.Linear | torch.Tensor, scorer: ARObjective | MDObjective,
           prefix_lengths: torch.Tensor | None = None) -> tuple[float, int]:
    """``(Σ weights·CE, number of scorable positions)`` of one batch."""
    kwargs = {"causal": batch.causal, "doc_ids": batch.doc_ids}
    if prefix_lengths is not None:
        kwargs["prefix_lengths"] = prefix_lengths
    hidden = model(batch.input_ids, **kwargs)
    out = scorer.loss(hidden, batch, head=head)
    return float(out.total), int(batch.valid_mask().sum())


@torch.no_grad()
def ar_nll(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    head: nn.Linear | torch.Tensor | None = None,
    batch_size: int = 64,
) -> NLL:
    """Held-out next-token NLL with causal attention: ``Σ_i −log p(x_{i+1} | x_{≤i})``.

    Args:
        model: called as ``model(input_ids, causal=, doc_ids=)``, returning hidden states ``[B, L, H]``.
        tokens: ``[N, L]`` held-out rows.
        doc_ids: ``[N, L]`` document ids (no target crosses a document; attention stays inside one).
        head: the output layer (default ``model.lm_head``).
        batch_size: rows per forward pass.

    Returns:
        :class:`NLL` over every position whose next token lies in the same document.
    """
    head = resolve_head(model, head)
    _check_rows(tokens, doc_ids, head, batch_size)
    scorer = ARObjective(normalize="none")
    nats, count = 0.0, 0
    for _, x, d in _chunks(tokens, doc_ids, batch_size):
        a, b = _score(model, scorer.prepare(x, doc_ids=d), head, scorer)
        nats, count = nats + a, count + b
    return NLL(nats, count)


@torch.no_grad()
def prefix_nll(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    prefix_length: int,
    prefix_mode: bool = True,
    doc_ids: torch.Tensor | None = None,
    head: nn.Linear | torch.Tensor | None = None,
    batch_size: int = 64,
) -> NLL:
    """NLL of the tokens after the first ``prefix_length`` of each row, given the prefix.

    With ``prefix_mode=True`` the prefix attends to itself bidirectionally and the rest is causal (a prefix LM,
    the paper's Remark 3); with ``False`` everything is causal, which scores exactly the same targets so the two
    numbers compare directly.

    Args:
        model: called as ``model(input_ids, causal=, doc_ids=, prefix_lengths=)``.
        tokens: ``[N, L]`` rows.
        prefix_length: conditioning positions per row, in ``[1, L)``; targets are tokens ``prefix_length..L−1``.
        prefix_mode: bidirectional prefix (True) or plain causal (False).
        doc_ids: ``[N, L]`` document ids.
        head: the output layer (default ``model.lm_head``).
        batch_size: rows per forward pass.
    """
    head = resolve_head(model, head)
    _check_rows(tokens, doc_ids, head, batch_size)
    check_bool("prefix_mode", prefix_mode)
    L = tokens.shape[1]
    check_int("prefix_length", prefix_length)
    if not 1 <= prefix_length < L:
        raise fail("prefix_length", f"an int in [1, L={L})", repr(prefix_length))
    scorer = ARObjective(normalize="none")
    nats, count = 0.0, 0
    for _, x, d in _chunks(tokens, doc_ids, batch_size):
        p = torch.full((x.shape[0],), prefix_length, dtype=torch.long, device=x.device)
        batch = scorer.prepare(x, doc_ids=d, prompt_lengths=p)
        a, b = _score(model, batch, head, scorer, prefix_lengths=p if prefix_mode else None)
        nats, count = nats + a, count + b
    return NLL(nats, count)


def antithetic_times(n: int, samples: int, *, generator: torch.Generator | None) -> torch.Tensor:
    """``[samples, n]`` noise levels in (0, 1): sample ``2j`` draws ``u ~ U(0,1)`` per row, sample ``2j+1`` uses
    ``1 − u`` (antithetic pairs; an odd last sample is a plain draw)."""
    check_int("n", n, low=0)
    check_int("samples", samples, low=1)
    check_generator("generator", generator)
    rows = []
    for _ in range((samples + 1) // 2):
        u = _random.rand((n,), generator=generator, device="cpu")
        rows += [u, 1.0 - u]
    return torch.stack(rows[:samples])


@torch.no_grad()
def md_elbo(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    md: MDObjective,
    doc_ids: torch.Tensor | None = None,
    samples: int = 4,
    estimator: str = "antithetic",
    seed: int = 0,
    head: nn.Linear | torch.Tensor | None = None,
    batch_size: int = 64,
) -> NLL:
    r"""Monte Carlo estimate of the masked-diffusion negative ELBO (an upper bound on −log p), bidirectional.

    Two unbiased estimators of the same bound
    :math:`\sum_{k=1}^{n} \frac{1}{k}\,\mathbb{E}_{|M|=k}\big[\sum_{i\in M} -\log p_\theta(x_i \mid x_{\setminus M})
    \big]`
    (``masked_diffusion_anchors`` §4.2), for a row with ``n`` maskable tokens:

    - ``"antithetic"``: ``t`` per row from antithetic pairs ``(u, 1 − u)``, each maskable token masked
      independently with probability ``t`` (Bernoulli), weight ``1/t``: the continuous-time ELBO of the linear
      schedule, whose expectation is exactly the bound above.
    - ``"exact"``: ``k ~ U{1..n}`` (:func:`dualobj.schedules.sample_counts`, stratified over the rows), exactly
      ``k`` tokens masked, weight ``n/k`` (LLaDA's evaluation estimator).

    The evaluation draws come from a generator seeded with ``seed``, so every model is scored on the same masks.

    Args:
        model: called as ``model(input_ids, causal=False, doc_ids=)``.
        tokens: ``[N, L]`` clean held-out rows (without the mask id; ids below the head's vocabulary size).
        md: the MD objective the model was trained with (mask id, shift, which ids may be masked). The bound
            itself does not depend on the training schedule, so the linear schedule (weight ``1/t``) is used.
        doc_ids: ``[N, L]`` document ids.
        samples: masks per row (>= 1).
        estimator: ``"antithetic"`` or ``"exact"``.
        seed: the evaluation seed.
        head: the output layer (default ``model.lm_head``).
        batch_size: rows per forward pass.

    Returns:
        :class:`NLL`: the bound summed over rows (averaged over samples) and the number of maskable tokens, so
        ``per_token`` is the per-token bound, comparable with :func:`ar_nll` on the same rows.
    """
    if not isinstance(md, MDObjective):
        raise fail_type("md", "an MDObjective", describe(md))
    head = resolve_head(model, head)
    _check_rows(tokens, doc_ids, head, batch_size)
    check_int("samples", samples, low=1)
    check_choice("estimator", estimator, ("antithetic", "exact"))
    check_int("seed", seed)
    if validation_enabled() and bool((tokens == md.mask_token_id).any()):
        raise fail("tokens", f"clean ids without mask_token_id={md.mask_token_id}",
                   f"{int((tokens == md.mask_token_id).sum())} positions holding it")
    scorer = MDObjective(md.mask_token_id, shift=md.shift, t_min=1e-6, normalize="none")
    gen = torch.Generator().manual_seed(seed)
    times = antithetic_times(tokens.shape[0], samples, generator=gen)
    nats, count = 0.0, 0
    for start, x, d in _chunks(tokens, doc_ids, batch_size):
        maskable = md.eligible(x, doc_ids=d)
        for s in range(samples):
            if estimator == "antithetic":
                t = times[s, start:start + x.shape[0]].to(x.device).clamp_min(1e-6)
                mask = random_mask(x, t, exact=False, maskable=maskable, generator=gen)
            else:
                counts = sample_counts(maskable.sum(dim=1), stratified=True, generator=gen)
                mask = random_mask(x, counts.rate, exact=True, maskable=maskable, rounding="round", generator=gen)
                t = torch.where(counts.count > 0, counts.rate, 1.0)  # weight 1/t = n/k
            a, b = _score(model, scorer.build(x, mask, t, maskable=maskable, doc_ids=d), head, scorer)
            nats += a / samples
        count += b
    return NLL(nats, count)
