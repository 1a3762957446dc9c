"""The ``variance`` suite: the MD training estimators side by side on the same model, data and compute.

For each estimator of :class:`dualobj.objectives.MDObjective` (exact count, Bernoulli, the official code's; with
independent, stratified or complementary draws) the suite trains nothing: it scores one fixed model on one fixed
batch ``R`` times with fresh masks and reports, per estimator,

- the mean and the variance of the loss, and the variance of the gradient norm, over the ``R`` draws;
- on a toy with ``n = 8`` maskable tokens per row, the bias against the exact negative ELBO (every mask enumerated),
  with its standard error.

Equal compute: every estimator scores ``B`` rows per step, made of ``B/2`` distinct sequences used twice (with two
independent masks, or a mask and its complement). The timed call of each implementation is one such step
(``prepare``, forward, loss, backward), so the table also shows that the estimators cost the same. The variance
and bias table is printed to stderr and written to the JSON (``sizes`` of each case).
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any

import torch
from torch import nn

from dualobj.bench._core import Case, Context, Impl

MASK_ID, NUM_SPECIAL = 0, 1
SEED = 0

ESTIMATORS: dict[str, dict[str, Any]] = {
    "count": {},
    "count stratified": {"stratified": True},
    "count complementary": {"complementary": True},
    "bernoulli": {"estimator": "bernoulli"},
    "bernoulli stratified": {"estimator": "bernoulli", "stratified": True},
    "bernoulli complementary": {"estimator": "bernoulli", "complementary": True},
    "official (biased)": {"estimator": "official"},
}
"""Name → MDObjective arguments (``stratified`` selects ``StratifiedSampler()``)."""

QUICK = {"toy": {"batch": 16, "length": 8, "vocab": 6, "repeats": 20},
         "text": {"batch": 8, "length": 32, "vocab": 32, "repeats": 10}}
FULL = {"toy": {"batch": 64, "length": 8, "vocab": 6, "repeats": 400},
        "text": {"batch": 32, "length": 256, "vocab": 64, "repeats": 200}}


class BagModel(nn.Module):
    """A small bidirectional model: each position sees its own embedding and the mean of the row's embeddings,
    so its loss depends on how much of the row is masked (as a real denoiser's does)."""

    def __init__(self, vocab: int, hidden: int = 32, seed: int = SEED) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, hidden, generator=gen) / math.sqrt(hidden))
        self.mix = nn.Parameter(torch.randn(hidden, hidden, generator=gen) / math.sqrt(hidden))
        self.out = nn.Parameter(torch.randn(hidden, vocab, generator=gen))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed[input_ids]
        h = torch.tanh(e + e.mean(1, keepdim=True) @ self.mix)
        return h @ self.out


def _objective(spec: dict[str, Any]) -> Any:
    from dualobj.objectives import MDObjective
    from dualobj.schedules import StratifiedSampler

    kwargs = {k: v for k, v in spec.items() if k != "stratified"}
    if spec.get("stratified"):
        kwargs["sampler"] = StratifiedSampler()
    return MDObjective(MASK_ID, num_special=NUM_SPECIAL, shift=False, **kwargs)


def _data(sizes: dict[str, int], device: str) -> torch.Tensor:
    """``B/2`` distinct rows of ordinary ids (a random walk, so neighbours are related)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    half, L, V = sizes["batch"] // 2, sizes["length"], sizes["vocab"]
    steps = torch.randint(-1, 2, (half, L), generator=gen)
    start = torch.randint(0, V - NUM_SPECIAL, (half, 1), generator=gen)
    return ((start + steps.cumsum(1)) % (V - NUM_SPECIAL) + NUM_SPECIAL).to(device)


def _step(md: Any, model: BagModel, rows: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """One step at equal compute: the ``B/2`` rows twice (complementary pairs, or two independent draws)."""
    tokens = rows if md.complementary else torch.cat([rows, rows])
    batch = md.prepare(tokens, generator=gen)
    loss = md.loss(model(batch.input_ids), batch).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def _exact(model: BagModel, rows: torch.Tensor, md: Any) -> float:
    """The per-token negative ELBO of ``rows`` under ``model``, every mask enumerated (``n <= 10``)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            maskable = md.eligible(row[None])[0]
            where = maskable.nonzero().flatten().tolist()
            n = len(where)
            masks = torch.zeros(2**n, row.numel(), dtype=torch.bool)
            for r, bits in enumerate(itertools.product([False, True], repeat=n)):
                masks[r, where] = torch.tensor(bits, dtype=torch.bool)
            inputs = torch.where(masks, MASK_ID, row)
            logp = torch.log_softmax(model(inputs).double(), -1)
            ce = -logp.gather(2, row.expand_as(inputs)[..., None])[..., 0]
            sums = (ce * masks).sum(1)
            k = masks.sum(1)
            total += sum(float(sums[k == j].mean()) / j for j in range(1, n + 1))
            count += n
    return total / count


def measure(ctx: Context) -> dict[str, dict[str, dict[str, float]]]:
    """``{setting: {estimator: stats}}`` for the toy (with the bias) and the text setting."""
    settings = QUICK if ctx.quick else FULL
    out: dict[str, dict[str, dict[str, float]]] = {}
    for setting, sizes in settings.items():
        model = BagModel(sizes["vocab"]).to(ctx.device)
        rows = _data(sizes, ctx.device)
        exact = _exact(model.cpu(), rows.cpu(), _objective({})) if setting == "toy" else None
        model.to(ctx.device)
        out[setting] = {}
        for name, spec in ESTIMATORS.items():
            md = _objective(spec)
            gen = torch.Generator(device=ctx.device).manual_seed(SEED + 2)
            draws = [_step(md, model, rows, gen) for _ in range(sizes["repeats"])]
            losses = torch.stack([d[0] for d in draws]).double().cpu()
            norms = torch.tensor([d[1] for d in draws], dtype=torch.float64)
            R = len(draws)
            stats = {"mean": float(losses.mean()), "var_loss": float(losses.var()), "var_grad_norm": float(norms.var())}
            if exact is not None:
                stats["exact"] = exact
                stats["bias"] = stats["mean"] - exact
                stats["bias_se"] = math.sqrt(stats["var_loss"] / R)
            out[setting][name] = stats
    return out


def table(stats: dict[str, dict[str, dict[str, float]]]) -> str:
    """The variance and bias table as plain text (variances relative to the default ``count`` in brackets)."""
    lines = []
    for setting, rows in stats.items():
        base = rows["count"]
        lines.append(f"{setting}: estimator | mean loss | Var loss (x count) | Var |grad| (x count) | bias ± se")
        for name, s in rows.items():
            bias = f"{s['bias']:+.4f} ± {s['bias_se']:.4f}" if "bias" in s else "-"
            rel_loss = s["var_loss"] / max(base["var_loss"], 1e-300)
            rel_grad = s["var_grad_norm"] / max(base["var_grad_norm"], 1e-300)
            lines.append(f"  {name:<24} {s['mean']:.4f}  {s['var_loss']:.3e} ({rel_loss:.2f})"
                         f"  {s['var_grad_norm']:.3e} ({rel_grad:.2f})  {bias}")
    return "\n".join(lines)


def cases(ctx: Context) -> list[Case]:
    """One case per setting; each estimator's timed call is one step (prepare, forward, loss, backward)."""
    stats = measure(ctx)
    print(table(stats), file=sys.stderr)
    settings = QUICK if ctx.quick else FULL
    out = []
    for setting, sizes in settings.items():
        model = BagModel(sizes["vocab"]).to(ctx.device)
        rows = _data(sizes, ctx.device)

        def make(spec: dict[str, Any], model: BagModel = model, rows: torch.Tensor = rows) -> Any:
            md = _objective(spec)
            gen = torch.Generator(device=ctx.device).manual_seed(SEED + 3)
            return lambda: _step(md, model, rows, gen)[0]

        impls = [Impl(name, (lambda spec=spec, make=make: make(spec)), ours=name == "count")
                 for name, spec in ESTIMATORS.items()]
        out.append(Case(f"{setting} {sizes['batch']}x{sizes['length']}", impls,
                        sizes={**sizes, "stats": stats[setting]}, units=sizes["batch"] * sizes["length"]))
    return out


if __name__ == "__main__":  # pragma: no cover - a quick look without the runner
    print(table(measure(Context(quick="--quick" in sys.argv))))
