"""Held-out block-diffusion NELBO (an upper bound on −log p), by Monte Carlo with its standard error."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dualobj._errors import check_choice, check_int, check_tensor, describe, fail_type
from dualobj.evaluation._likelihood import NLL, head_weight, resolve_head
from dualobj.masking import RandomMasker
from dualobj.objectives import BlockDiffusionObjective
from dualobj.objectives._batch import IGNORE_INDEX
from dualobj.schedules import LinearSchedule, UniformSampler, sample_counts

EVAL_T_MIN = 1e-6


@dataclass(frozen=True)
class MonteCarloNLL(NLL):
    """A Monte Carlo estimate of a summed negative log-likelihood bound, with its standard error.

    Attributes:
        nats: the estimate, summed over rows, in nats.
        tokens: the number of scored (maskable) tokens.
        stderr: the standard error of ``nats`` (``nan`` with one sample per row).
        samples: Monte Carlo samples per row.
    """

    stderr: float = float("nan")
    samples: int = 1

    @property
    def per_token_stderr(self) -> float:
        """Standard error of :attr:`per_token`."""
        return self.stderr / self.tokens if self.tokens else float("nan")


def _row_totals(model: nn.Module, batch, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` float64: Σ weights·CE per row, projecting only the scored positions."""
    hidden = model(batch.input_ids, layout=batch.layout)
    scored = batch.labels != IGNORE_INDEX
    rows = scored.nonzero()[:, 0]
    h = hidden[scored].to(weight.dtype)
    logits = nn.functional.linear(h, weight, bias).float()
    ce = nn.functional.cross_entropy(logits, batch.labels[scored], reduction="none")
    contrib = (ce * batch.weights[scored].float()).double()
    return torch.zeros(batch.shape[0], dtype=torch.float64, device=ce.device).index_add_(0, rows, contrib)


@torch.no_grad()
def bd_nelbo(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    bd: BlockDiffusionObjective,
    doc_ids: torch.Tensor | None = None,
    samples: int = 4,
    estimator: str = "exact",
    seed: int = 0,
    head: nn.Linear | torch.Tensor | None = None,
    batch_size: int = 64,
) -> MonteCarloNLL:
    r"""Monte Carlo estimate of the block-diffusion negative ELBO of held-out rows, with its standard error.

    Two unbiased estimators of the bound below:

    - ``"exact"`` (default): every block with ``n`` maskable tokens draws ``k ~ U{1..n}``, masks exactly ``k`` of
      them and weighs their in-place cross-entropy by ``n/k``. Its variance is finite (LLaDA's evaluation estimator,
      block by block); ``bd.t_per`` does not apply (the bound itself does not depend on it).
    - ``"bernoulli"``: every block draws its own ``t ~ U(0, 1]`` (or one per row, as ``bd.t_per`` says), masks
      each maskable token independently with probability ``t`` and weighs by ``1/t``: the continuous-time form,
      whose variance grows without bound as ``t → 0`` (its sample mean is heavy-tailed, so a single draw is more
      often below the bound than above it).

    Both estimate
    :math:`\sum_k \sum_{m=1}^{n_k} \frac{1}{m}\,\mathbb{E}_{|M|=m}\big[\sum_{i\in M} -\log p_\theta(x_i \mid
    x^k_{\setminus M}, x^{<k})\big]` whatever the model (the bound does not depend on the training schedule, so the
    linear one is used). With ``block_size = 1`` the bound is the AR NLL in expectation; with ``block_size = L`` it
    is the masked-diffusion bound with in-place targets.

    The standard error is that of the sum over rows: rows are independent, so it is
    ``sqrt(Σ_rows var_row / samples)`` with each row's sample variance over its ``samples`` draws (``nan`` when
    ``samples`` is 1). The draws come from a generator seeded with ``seed``, so every model sees the same masks.

    Args:
        model: called as ``model(input_ids, layout=batch.layout)``, returning hidden states ``[B, 2L, H]``.
        tokens: ``[N, L]`` clean held-out rows.
        bd: the block-diffusion objective the model was trained with (mask id, block size, ``t_per``, which ids may
            be masked).
        doc_ids: ``[N, L]`` document ids.
        samples: Monte Carlo samples per row (>= 1; >= 2 for a standard error).
        estimator: ``"exact"`` or ``"bernoulli"``.
        seed: the evaluation seed.
        head: the output layer (default ``model.lm_head``).
        batch_size: rows per forward pass (each of ``2L`` tokens).

    Returns:
        :class:`MonteCarloNLL` summed over rows (averaged over samples), with the number of maskable tokens, so
        ``per_token`` compares with :func:`~dualobj.evaluation.ar_nll` and :func:`~dualobj.evaluation.md_elbo`.

    Example:
        >>> import torch
        >>> from dualobj.models import Transformer, TransformerConfig
        >>> model = Transformer(TransformerConfig(vocab_size=16, dim=32, layers=1, heads=2))
        >>> bd = BlockDiffusionObjective(mask_token_id=0, block_size=4)
        >>> out = bd_nelbo(model, torch.randint(1, 16, (3, 8)), bd=bd, samples=2)
        >>> out.tokens, out.stderr > 0
        (24, True)
    """
    check_tensor("tokens", tokens, ndim=2, integer=True)
    if doc_ids is not None:
        check_tensor("doc_ids", doc_ids, shape=tuple(tokens.shape), integer=True)
    if not isinstance(bd, BlockDiffusionObjective):
        raise fail_type("bd", "a BlockDiffusionObjective", describe(bd))
    check_int("samples", samples, low=1)
    check_choice("estimator", estimator, ("exact", "bernoulli"))
    check_int("seed", seed)
    check_int("batch_size", batch_size, low=1)
    weight, bias = head_weight(resolve_head(model, head))
    scorer = BlockDiffusionObjective(
        bd.mask_token_id, bd.block_size, schedule=LinearSchedule(), sampler=UniformSampler(EVAL_T_MIN, 1.0),
        t_per=bd.t_per, special_ids=bd.special_ids, num_special=bd.num_special, pad_id=bd.pad_id,
        t_min=EVAL_T_MIN, normalize="none",
        masker=RandomMasker(exact=True, rounding="round") if estimator == "exact" else None,
    )
    gen = torch.Generator().manual_seed(seed)
    nats, var, count = 0.0, 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        x = tokens[start:start + batch_size]
        d = None if doc_ids is None else doc_ids[start:start + batch_size]
        draws = []
        for _ in range(samples):
            if estimator == "exact":
                batch = _exact_count_batch(scorer, x, d, gen)
            else:
                batch = scorer.prepare(x, doc_ids=d, generator=gen)
            draws.append(_row_totals(model, batch, weight, bias))
        per = torch.stack(draws)  # [samples, n]
        nats += float(per.mean(0).sum())
        if samples > 1:
            var += float(per.var(0, correction=1).sum()) / samples
        count += int(scorer.eligible(x).sum())
    stderr = math.sqrt(var) if samples > 1 else float("nan")
    return MonteCarloNLL(nats, count, stderr=stderr, samples=samples)


def _exact_count_batch(scorer: BlockDiffusionObjective, x: torch.Tensor, doc_ids: torch.Tensor | None,
                       gen: torch.Generator):
    """The ``[x_t ; x_0]`` batch of the exact-count estimator: ``k ~ U{1..n}`` masked tokens in each block with
    ``n`` maskable ones, at level ``t = k/n`` so that the linear schedule's weight ``1/t`` is ``n/k``."""
    B, L = x.shape
    b, K = scorer.block_size, scorer.num_blocks(L)
    maskable = scorer.eligible(x)
    padded = nn.functional.pad(maskable, (0, K * b - L), value=False)
    n = padded.reshape(B, K, b).sum(-1)  # [B, K] maskable tokens per block
    counts = sample_counts(n.reshape(-1), stratified=False, generator=gen)
    rate = counts.rate.reshape(B, K).float()
    mask = scorer.block_mask(x, rate, maskable, gen)  # exactly round(rate · n) = k per block
    t = torch.where(n > 0, rate, torch.ones_like(rate))  # blocks without maskable tokens score nothing
    return scorer.build(x, mask, t, maskable=maskable, doc_ids=doc_ids)
