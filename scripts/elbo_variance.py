"""Variance of the Monte-Carlo masked-diffusion ELBO estimator: stratified vs uniform time sampling.

The data is drawn from a random Markov chain and scored by a fixed denoiser that ignores t (it predicts a masked
token from the nearest clean token to its left through the chain's transition matrix). For each noise schedule
the per-token NELBO of a batch is estimated ``--batches`` times with uniform t and with stratified t,
through :class:`dualobj.objectives.MDObjective` with the Bernoulli estimator (truncated on the mask rate at
t_min = 1e-3) and in-place targets; the table reports
the mean and the variance of the batch estimate and the variance ratio. The last rows use the exact-count
evaluation estimator (k ~ U{1..n}, weight n/k) with independent and stratified counts.

Usage::

    python scripts/elbo_variance.py [--batch 32] [--length 64] [--batches 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from dualobj.masking import random_mask
from dualobj.objectives import MDObjective
from dualobj.schedules import (
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    LogSchedule,
    PolynomialSchedule,
    StratifiedSampler,
    TimeSample,
    UniformSampler,
    sample_counts,
)

MASK = 0
STATES = 8  # token ids 1..STATES; 0 is <mask>


class PerBatch:
    """A sampler for ``batches`` independent batches of ``batch`` rows, concatenated (a TimeSampler)."""

    def __init__(self, inner, batch: int) -> None:
        self.inner, self.batch = inner, batch

    def __call__(self, n, *, device="cpu", generator=None) -> TimeSample:
        parts = [self.inner(self.batch, device=device, generator=generator) for _ in range(n // self.batch)]
        return TimeSample(torch.cat([p.t for p in parts]), torch.cat([p.weight for p in parts]))


class ChainDenoiser:
    """Predicts a masked token from the nearest clean token on its left (the stationary law when there is none)."""

    def __init__(self, length: int, generator: torch.Generator) -> None:
        logits = 2.5 * torch.randn(STATES, STATES, generator=generator, dtype=torch.float64)
        self.P = logits.softmax(-1)
        evals, evecs = torch.linalg.eig(self.P.T)
        pi = evecs[:, evals.real.argmax()].real
        self.pi = pi / pi.sum()
        powers = [torch.eye(STATES, dtype=torch.float64)]
        for _ in range(length):
            powers.append(powers[-1] @ self.P)
        self.log_powers = torch.stack(powers).clamp_min(1e-30).log()  # [length + 1, S, S]

    def sample(self, rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``[rows, length]`` token ids in 1..STATES drawn from the chain."""
        x = torch.multinomial(self.pi.expand(rows, STATES), 1, generator=generator)[:, 0]
        out = [x]
        for _ in range(length - 1):
            x = torch.multinomial(self.P[x], 1, generator=generator)[:, 0]
            out.append(x)
        return torch.stack(out, 1) + 1

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` ids with ``<mask>`` → ``[N, L, STATES + 1]`` float32 logits (column 0 is ``<mask>``)."""
        N, L = ids.shape
        pos = torch.arange(L).expand(N, L)
        clean = ids != MASK
        last = torch.where(clean, pos, -1).cummax(1).values  # nearest clean position at or left of i
        dist = (pos - last).clamp_max(L)
        state = (ids.gather(1, last.clamp_min(0)) - 1).clamp_min(0)
        logp = self.log_powers[dist, state]  # [N, L, S]
        logp = torch.where((last >= 0)[..., None], logp, self.pi.log())
        return torch.cat([torch.full((N, L, 1), -torch.inf, dtype=logp.dtype), logp], -1).float()


def row_nelbo(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return (weights * ce).sum(1).double()


def batch_estimates(rows: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Per-token NELBO of each batch ``[batches]`` from per-row estimates."""
    return rows.view(-1, batch).mean(1) / length


def var_and_rel_se(est: torch.Tensor) -> tuple[float, float]:
    """Sample variance of ``est`` and its relative standard error ``sqrt((kurtosis − 1)/n)``."""
    centred = est - est.mean()
    var = centred.pow(2).mean().item()
    kurtosis = centred.pow(4).mean().item() / var**2
    return est.var().item(), ((kurtosis - 1) / len(est)) ** 0.5


def row(name: str, stats: list[tuple[float, float, float]]) -> str:
    (m_u, v_u, r_u), (m_a, v_a, r_a) = stats
    spread = (r_u**2 + r_a**2) ** 0.5
    return (f"| {name} | {m_u:.4f} | {m_a:.4f} | {v_u:.2e} | {v_a:.2e} | {v_u / v_a:.2f} "
            f"± {v_u / v_a * spread:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    B, L, R = args.batch, args.length, args.batches
    g = torch.Generator().manual_seed(args.seed)
    model = ChainDenoiser(L, g)
    tokens = model.sample(B * R, L, g)  # R batches of B different sequences, shared by every estimator
    schedules = {
        "linear 1 − t": LinearSchedule(),
        "cosine '1-sin'": CosineSchedule("1-sin"),
        "cosine 'cos'": CosineSchedule("cos"),
        "cosine 'cos^2'": CosineSchedule("cos^2"),
        "polynomial p=2": PolynomialSchedule(2),
        "log": LogSchedule(),
        "geometric 1e-4..20": GeometricSchedule(),
    }
    start = time.perf_counter()
    print(f"B={B} rows of L={L} tokens per batch, {R} batches, seed {args.seed}; per-token NELBO (nats)\n")
    print("| estimator | mean, uniform | mean, stratified | Var uniform | Var stratified | "
          "ratio uniform/stratified (± 1 s.e.) |")
    print("|---|---|---|---|---|---|")
    for name, schedule in schedules.items():
        stats = []
        for sampler in (UniformSampler(), StratifiedSampler()):
            md = MDObjective(MASK, schedule=schedule, sampler=PerBatch(sampler, B), shift=False, exact=False,
                             num_special=1)
            batch = md.prepare(tokens, generator=torch.Generator().manual_seed(args.seed + 1))
            est = batch_estimates(row_nelbo(model(batch.input_ids), batch.labels, batch.weights), B, L)
            stats.append((est.mean().item(), *var_and_rel_se(est)))
        print(row(name, stats))
    stats = []
    n = torch.full((B,), L)
    for stratified in (False, True):
        gen = torch.Generator().manual_seed(args.seed + 2)
        counts = [sample_counts(n, stratified=stratified, generator=gen) for _ in range(R)]
        rate = torch.cat([c.rate for c in counts])
        weight = torch.cat([c.weight for c in counts])
        mask = random_mask(tokens, rate, exact=True, rounding="round", generator=gen)
        labels = torch.where(mask, tokens, -100)
        rows = row_nelbo(model(torch.where(mask, MASK, tokens)), labels, weight[:, None] * mask)
        est = batch_estimates(rows, B, L)
        stats.append((est.mean().item(), *var_and_rel_se(est)))
    print(row(f"exact count k ~ U{{1..{L}}}, weight n/k", stats))
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
