"""The objective contract: one training loop for every objective, mixtures of any objectives, token dtypes.

References are independent of the code under test: ``F.cross_entropy`` on hand-shifted logits, closed forms of the
expected MD loss of a fixed predictor, exact enumeration of the rank rotation, and plain torch for tied heads.
"""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dualobj
from dualobj import DualObjError
from dualobj.masking import GeometricSpans, SpanMasker, UniformSpans
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import (
    IGNORE_INDEX,
    ARObjective,
    Batch,
    BlockDiffusionObjective,
    DualObjective,
    MDObjective,
    Mixture,
    Objective,
    ObjectiveProtocol,
    cross_entropy,
    rank_component,
    rank_is_ar,
    row_counts,
)
from dualobj.schedules import constant, linear_ramp

MASK, NUM_SPECIAL, V = 3, 4, 24
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "objectives.md"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(B: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(NUM_SPECIAL, V, (B, L), generator=gen(seed))


def md(**kwargs) -> MDObjective:
    return MDObjective(MASK, num_special=NUM_SPECIAL, **kwargs)


class NextButOne(Objective):
    """A user-defined objective: causal rows, output ``i`` predicts token ``i + 2``."""

    def prepare(self, tokens, *, step=None, doc_ids=None, prompt_lengths=None, generator=None):
        tokens = tokens.long()
        B = tokens.shape[0]
        labels = torch.full_like(tokens, IGNORE_INDEX)
        labels[:, :-2] = tokens[:, 2:]
        ok = labels != IGNORE_INDEX
        return Batch(input_ids=tokens, labels=labels, weights=ok.float(), causal=torch.ones(B, dtype=torch.bool),
                     doc_ids=doc_ids, valid=ok)


class ProtocolOnly:
    """An objective that does not subclass Objective: it only has the two methods of the contract."""

    def __init__(self) -> None:
        self.inner = ARObjective()

    def prepare(self, tokens, *, step=None, doc_ids=None, prompt_lengths=None, generator=None):
        return self.inner.prepare(tokens, step=step, doc_ids=doc_ids, prompt_lengths=prompt_lengths)

    def loss(self, output, batch, *, head=None, bias=None, chunk_size=None):
        logits = output if head is None else output @ head.weight.T
        return cross_entropy(logits, batch)


def objectives() -> dict[str, object]:
    return {
        "ar": ARObjective(),
        "md": md(),
        "dual": DualObjective(0.5, md=md()),
        "dual-scheduled": DualObjective(linear_ramp(1.0, 0.25, steps=2), md=md(), split="step"),
        # AR, random-mask MD and a span-mask MLM (SpanBERT's geometric lengths, unweighted, scored in place).
        "mixture": Mixture({"ar": (ARObjective(), 0.5), "md": (md(), 0.25),
                            "span": (md(masker=SpanMasker(GeometricSpans(p=0.3, max_length=4)), shift=False), 0.25)}),
        "user": NextButOne(),
        "protocol-only": ProtocolOnly(),
        "block-diffusion": BlockDiffusionObjective(MASK, 4, num_special=NUM_SPECIAL),
    }


def train(objective, *, steps: int = 3, fused: bool = True) -> list[float]:
    """A training loop written against the contract only."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=V, dim=16, layers=1, heads=2, max_len=32, backend="math"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = gen(1)
    losses = []
    for step in range(steps):
        batch = objective.prepare(tokens(4, 10, seed=step), step=step, generator=g)
        hidden = model(batch.input_ids, layout=batch.layout)  # the batch says who attends to whom
        out = objective.loss(hidden, batch, head=model.lm_head) if fused else objective.loss(model.lm_head(hidden),
                                                                                            batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("name", list(objectives()))
def test_one_training_loop_runs_unchanged_with_every_objective(name):
    objective = objectives()[name]
    assert isinstance(objective, ObjectiveProtocol)
    for fused in (True, False):
        losses = train(objective, fused=fused)
        assert all(math.isfinite(x) and x > 0 for x in losses)


def test_the_loop_sees_the_same_numbers_on_both_scoring_paths():
    for name in ("dual", "mixture", "user"):
        a = train(objectives()[name], fused=True)
        b = train(objectives()[name], fused=False)
        assert a == pytest.approx(b, rel=1e-4), name


def test_step_is_accepted_by_every_objective_and_required_where_it_matters():
    x = tokens(4, 6)
    for name, objective in objectives().items():
        if name != "dual-scheduled":
            objective.prepare(x, generator=gen(0))  # constant weights: no step needed
        objective.prepare(x, step=7, generator=gen(0))
    scheduled = [
        DualObjective(linear_ramp(1.0, 0.5, steps=10), md=md()),
        DualObjective(constant(0.5), md=md(), split="both"),
        Mixture({"ar": (ARObjective(), linear_ramp(1.0, 0.5, steps=10)),
                 "md": (md(), linear_ramp(0.0, 0.5, steps=10))}),
        DualObjective(0.5, md=md(), split="rank", steps_per_epoch=2, rank=0, world_size=2),
        Mixture({"ar": (ARObjective(), 0.5), "md": (md(), 0.5)}, split="rank", steps_per_epoch=2, world_size=2,
                rank=1),
    ]
    for objective in scheduled:
        with pytest.raises(DualObjError, match=r"^step: expected the optimizer step"):
            objective.prepare(x, generator=gen(0))
        objective.prepare(x, step=3, generator=gen(0))
    with pytest.raises(DualObjError, match="step"):
        ARObjective().prepare(x, step=-1)
    with pytest.raises(DualObjError, match="step"):
        DualObjective(0.5, md=md()).prepare(x, step=1.5)


def test_a_scheduled_weight_follows_the_step():
    mix = Mixture({"ar": (ARObjective(), linear_ramp(1.0, 0.0, steps=10)),
                   "md": (md(), linear_ramp(0.0, 1.0, steps=10))})
    x = tokens(10, 6)
    assert mix.prepare(x, step=0, generator=gen(0)).component_counts() == (("ar", 10), ("md", 0))
    assert mix.prepare(x, step=3, generator=gen(0)).component_counts() == (("ar", 7), ("md", 3))
    assert mix.prepare(x, step=50, generator=gen(0)).component_counts() == (("ar", 0), ("md", 10))


# ---------------------------------------------------------------------------------------- the rows split


def fixed_logits(L: int, seed: int) -> torch.Tensor:
    return torch.randn(L, V, generator=gen(seed)) * 2


def test_mixture_rows_split_has_expected_loss_sum_of_weighted_component_losses():
    """E[loss] = Σ w_i L_i for AR, random-mask MD and span-mask MLM, over the random row counts and masks.

    Every row holds the same tokens and the "model" the same fixed logits, so each component's expected loss has a
    closed form. The logits are random, except that the in-place cross-entropy of every token is set to the same
    value ``c`` (checked with ``F.cross_entropy``), which makes the span masker's loss depend on its count only:

    - AR: the mean CE of output ``i`` on token ``i + 1`` (``F.cross_entropy`` on hand-shifted logits).
    - MD, in place, ELBO weighting, linear schedule: each maskable position is masked with probability ``t``
      exactly and weighted ``1/t``, so the expectation is the mean in-place CE over the maskable positions: ``c``.
    - span MLM, in place, no weighting: exactly ``k = stochastic_round(t·n)`` of the ``n`` maskable positions are
      masked whatever the spans, each costing ``c``; ``E[k] = E[t]·n`` with ``t`` uniform on ``[t_min, 1]``, so
      the expectation is ``(1 + t_min)/2 · c``.

    The first token is a special id, so all three components have ``L − 1`` valid positions per row and the
    mixture's ``total / count`` is the row-weighted mean of the component losses.
    """
    B, L, draws = 7, 9, 1500
    weights = {"ar": 0.5, "md": 0.3, "span": 0.2}  # 3.5, 2.1 and 1.4 rows: every count is rounded at random
    span = md(shift=False, masker=SpanMasker(UniformSpans(3)))
    mix = Mixture({"ar": (ARObjective(), weights["ar"]), "md": (md(shift=False), weights["md"]),
                   "span": (span, weights["span"])})
    row = tokens(1, L, seed=5)
    row[0, 0] = 1  # a special id: never masked, never predicted in place
    x = row.expand(B, L).clone()
    c = 1.7
    logits = fixed_logits(L, 6).double()
    others = logits.scatter(1, row[0][:, None], -math.inf).logsumexp(1)  # log Σ_{j != token} exp(z_j)
    logits[torch.arange(L), row[0]] = others + math.log(math.exp(-c) / (1 - math.exp(-c)))
    logits = logits.float()
    ar_ref = F.cross_entropy(logits[:-1], row[0, 1:]).item()
    inplace = F.cross_entropy(logits[1:], row[0, 1:], reduction="none")
    assert inplace.tolist() == pytest.approx([c] * (L - 1), rel=1e-5)
    assert abs(ar_ref - c) > 0.1  # AR scores other targets: its loss is not the in-place one
    t_min = 1e-3
    expected = weights["ar"] * ar_ref + weights["md"] * c + weights["span"] * (1 + t_min) / 2 * c

    losses, rows, md_metric, span_metric = [], {k: [] for k in weights}, [], []
    for s in range(draws):
        batch = mix.prepare(x, generator=gen(s))
        out = mix.loss(logits.expand(B, L, V), batch)
        losses.append(out.loss.item())
        for name, n in batch.component_counts():
            rows[name].append(n)
        assert set(out.metrics) >= {"ar/loss", "ar/tokens", "md/loss", "md/tokens", "span/loss", "span/tokens"}
        assert out.metrics["ar/tokens"].item() == dict(batch.component_counts())["ar"] * (L - 1)
        if dict(batch.component_counts())["ar"]:
            assert out.metrics["ar/loss"].item() == pytest.approx(ar_ref, rel=1e-5)
        if dict(batch.component_counts())["md"]:
            md_metric.append(out.metrics["md/loss"].item())
        if dict(batch.component_counts())["span"]:
            span_metric.append(out.metrics["span/loss"].item())
    losses = torch.tensor(losses, dtype=torch.float64)
    se = losses.std().item() / math.sqrt(draws)
    assert abs(losses.mean().item() - expected) < 4.5 * se, (losses.mean().item(), expected, se)
    for name, w in weights.items():
        counts = torch.tensor(rows[name], dtype=torch.float64)
        assert set(counts.tolist()) <= {math.floor(w * B), math.ceil(w * B)}
        assert abs(counts.mean().item() - w * B) < 4.5 * counts.std().item() / math.sqrt(draws)
    md_metric = torch.tensor(md_metric, dtype=torch.float64)
    # (+1e-6: with the same CE everywhere the count estimator gives c in every draw, up to float32 rounding)
    assert abs(md_metric.mean().item() - c) < 4.5 * md_metric.std().item() / math.sqrt(len(md_metric)) + 1e-6
    span_metric = torch.tensor(span_metric, dtype=torch.float64)
    span_ref = (1 + t_min) / 2 * c
    assert abs(span_metric.mean().item() - span_ref) < 4.5 * span_metric.std().item() / math.sqrt(len(span_metric))


@pytest.mark.parametrize("B", [1, 3, 8, 13])
def test_row_counts_are_systematic_roundings_with_exact_expectations(B, monkeypatch):
    from dualobj.objectives import _mixture

    weights = [0.45, 0.0, 0.3, 0.25]
    seen = {}
    grid = 4000
    for i in range(grid):  # u on a fine grid: the expectation over u is an average over the grid
        u = (i + 0.5) / grid
        monkeypatch.setattr(_mixture, "host_uniform", lambda g, u=u: u)
        counts = row_counts(weights, B, None)
        assert sum(counts) == B and counts[1] == 0
        for j, (n, w) in enumerate(zip(counts, weights)):
            assert math.floor(w * B) <= n <= math.ceil(w * B)
            seen.setdefault(j, []).append(n)
    for j, w in enumerate(weights):
        assert sum(seen[j]) / grid == pytest.approx(w * B, abs=1.0 / grid + 1e-9)


def test_rows_split_refuses_components_that_change_the_row_shape():
    class Doubling(Objective):  # returns two rows of 2L per input row, like a block-diffusion layout
        def prepare(self, tokens, *, step=None, doc_ids=None, prompt_lengths=None, generator=None):
            x = tokens.long().repeat(1, 2)
            return ARObjective().prepare(x)

    mix = Mixture({"ar": (ARObjective(), 0.5), "bd": (Doubling(), 0.5)})
    with pytest.raises(DualObjError, match=r"^split: .*use split='step' or 'rank'"):
        mix.prepare(tokens(4, 6), generator=gen(0))
    for split, w in (("step", 0.0), ("rank", 0.5)):  # one component per step or rank: nothing stacked, no refusal
        ok = Mixture({"ar": (ARObjective(), w), "bd": (Doubling(), 1 - w)}, split=split, steps_per_epoch=1,
                     rank=1, world_size=2)
        batch = ok.prepare(tokens(4, 6), step=0, generator=gen(0))
        assert batch.shape == (4, 12) and batch.component_counts() == (("ar", 0), ("bd", 4))


# ------------------------------------------------------------------------------------ other splits


@pytest.mark.parametrize("normalize", ["valid", "positions", "targets", "none"])
def test_mixture_both_split_is_exactly_the_weighted_sum(normalize):
    comps = {"ar": ARObjective(), "md": md(), "mlm": md(weighting="none", shift=False)}
    weights = {"ar": 0.2, "md": 0.5, "mlm": 0.3}
    mix = Mixture({k: (comps[k], weights[k]) for k in comps}, split="both", normalize=normalize)
    x = tokens(3, 8, seed=2)
    batch = mix.prepare(x, generator=gen(4))
    assert batch.shape == (9, 8) and batch.component_counts() == (("ar", 3), ("md", 3), ("mlm", 3))
    logits = torch.randn(9, 8, V, generator=gen(5))
    out = mix.loss(logits, batch)
    g = gen(4)  # the components draw from the generator in order, as inside the mixture
    refs = {k: cross_entropy(logits[3 * i : 3 * i + 3], comps[k].prepare(x, generator=g), normalize=normalize)
            for i, k in enumerate(comps)}
    torch.testing.assert_close(out.loss, sum(weights[k] * refs[k].loss for k in comps))
    plain = {k: cross_entropy(logits[3 * i : 3 * i + 3], comps[k].prepare(x, generator=gen(0)))
             for i, k in enumerate(comps)}
    torch.testing.assert_close(out.metrics["ar/loss"], plain["ar"].loss)  # mixing factors divided out


def test_mixture_step_split_picks_each_component_with_its_weight():
    weights = {"ar": 0.5, "md": 0.3, "mlm": 0.2}
    mix = Mixture({"ar": (ARObjective(), 0.5), "md": (md(), 0.3), "mlm": (md(shift=False), 0.2)}, split="step")
    x = tokens(2, 6)
    n = 1500
    hits = dict.fromkeys(weights, 0)
    for s in range(n):
        segments = dict(mix.prepare(x, generator=gen(s)).component_counts())
        (name,) = [k for k, rows in segments.items() if rows]
        hits[name] += 1
    for name, w in weights.items():
        assert abs(hits[name] - n * w) < 4.5 * math.sqrt(n * w * (1 - w))


def test_rank_rotation_for_three_components_is_exact():
    weights, world = [0.25, 0.5, 0.25], 8
    for epoch in range(8):
        picks = [rank_component(weights, rank=r, world_size=world, epoch=epoch) for r in range(world)]
        assert [picks.count(i) for i in range(3)] == [2, 4, 2]  # exactly w_i·W ranks every step
    for r in range(world):  # every shard sees each component a_i times over d = 4 epochs
        picks = [rank_component(weights, rank=r, world_size=world, epoch=e) for e in range(4)]
        assert [picks.count(i) for i in range(3)] == [1, 2, 1]
    for alpha, W in ((0.25, 4), (0.5, 2), (0.375, 8), (0.0, 4), (1.0, 4)):  # two components: the paper's rule
        for r in range(W):
            for e in range(6):
                assert (rank_component([alpha, 1 - alpha], rank=r, world_size=W, epoch=e) == 0) == rank_is_ar(
                    alpha, rank=r, world_size=W, epoch=e)
    mix = Mixture({"a": (ARObjective(), 0.25), "b": (md(), 0.5), "c": (md(shift=False), 0.25)}, split="rank",
                  steps_per_epoch=3, rank=1, world_size=4)
    assert [dict(mix.prepare(tokens(2, 5), step=s).component_counts()) for s in (0, 3)] == [
        {"a": 0, "b": 2, "c": 0}, {"a": 0, "b": 2, "c": 0}]
    assert dict(mix.prepare(tokens(2, 5), step=6).component_counts())["c"] == 2
    with pytest.raises(DualObjError, match="multiples of 1/world_size"):
        rank_component([0.3, 0.7], rank=0, world_size=4, epoch=0)


def test_dual_is_the_two_component_mixture():
    x = tokens(6, 7)
    for split in ("rows", "both", "step"):
        dual = DualObjective(0.4, md=md(), split=split)
        mix = Mixture({"ar": (ARObjective(), 0.4), "md": (md(), 0.6)}, split=split)
        a, b = dual.prepare(x, generator=gen(3)), mix.prepare(x, generator=gen(3))
        for field in ("input_ids", "labels", "weights", "causal"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (split, field)
        assert a.component_counts() == b.component_counts()


def test_split_draws_stay_on_the_host():
    # With a CPU generator the decision is a CPU draw of the caller's generator: same seed, same rows.
    dual = DualObjective(0.3, md=md())
    x = tokens(7, 5)
    assert all(dual.prepare(x, generator=gen(s)).num_causal == dual.prepare(x, generator=gen(s)).num_causal
               for s in range(20))
    # The row count follows the caller's generator's first draw, u <= frac(α·B) giving the extra row.
    for s in range(20):
        u = torch.rand((), generator=gen(s)).item()
        assert dual.prepare(x, generator=gen(s)).num_causal == 2 + (u <= 0.1 + 1e-12)


class _DeviceGenerator:
    """Stands in for a CUDA generator: its seed and Philox offset are host-side numbers."""

    device = torch.device("cuda")

    def __init__(self, seed: int, offset: int = 0) -> None:
        self.seed, self.offset = seed, offset

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset = offset


def test_a_device_generator_decides_on_the_host_reproducibly():
    from dualobj.objectives._mixture import host_uniform

    a, b = _DeviceGenerator(7), _DeviceGenerator(7)
    draws_a = [host_uniform(a) for _ in range(5)]
    assert draws_a == [host_uniform(b) for _ in range(5)]  # same seed, same decisions
    assert len(set(draws_a)) == 5 and all(0 <= u < 1 for u in draws_a)  # the offset moves on: fresh draws
    assert a.offset == 20 and a.offset % 4 == 0
    assert host_uniform(_DeviceGenerator(8)) != draws_a[0]


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: Mixture({"ar": (ARObjective(), 0.5), "md": (md(), 0.4)}), r"weights: expected weights summing to 1"),
        (lambda: Mixture({"ar": (ARObjective(), 1.5), "md": (md(), -0.5)}), r"weights\['ar'\]: expected a number in"),
        (lambda: Mixture({"ar": (ARObjective(), -0.5), "md": (md(), 1.5)}), r"weights\['ar'\]: expected a number in"),
        (lambda: Mixture({"ar": (ARObjective(), 0.5), "md": (md(), 0.5)}, split="layers"), "split: expected one of"),
        (lambda: Mixture({"ar": (ARObjective(), 0.5), "x": ("md", 0.5)}), r"components\['x'\]: expected an objective"),
        (lambda: Mixture([("a", ARObjective(), 0.5), ("a", md(), 0.5)]), "components: expected distinct names"),
        (lambda: Mixture({"ar": (ARObjective, 1.0)}), r"components\['ar'\]: expected an objective"),
        (lambda: Mixture({}), "components: expected at least one component"),
        (lambda: Mixture({"a/b": (ARObjective(), 1.0)}), "components: expected names"),
        (lambda: Mixture({"ar": ARObjective()}), r"components\['ar'\]: expected an \(objective, weight\) pair"),
        (lambda: Mixture(ARObjective()), "components: expected a mapping"),
        (lambda: Mixture({"ar": (ARObjective(), True)}), r"weights\['ar'\]"),
        (lambda: Mixture({"ar": (ARObjective(), 1.0)}, split="rank"), "steps_per_epoch: expected an int >= 1"),
        (lambda: Mixture({"ar": (ARObjective(), linear_ramp(1, 0.5, 10)), "md": (md(), 0.5)}).prepare(
            tokens(2, 4), step=5), r"weights: expected weights summing to 1 at step 5"),
        (lambda: DualObjective(0.5, md=md(), ar_scale=math.inf), "ar_scale: expected a finite number > 0"),
        (lambda: DualObjective(0.5, md=md(), ar_scale=0.0), "ar_scale: expected a number > 0"),
        (lambda: DualObjective(0.5, md=md(), ar_scale=True), "ar_scale"),
        (lambda: DualObjective(0.5, md=ARObjective()), "md: expected an MDObjective"),
        (lambda: ARObjective(z_loss=True), "z_loss"),
        (lambda: ARObjective().prepare(torch.tensor([[4, -2, 5]])), r"tokens: expected ids >= 0"),
        (lambda: ARObjective().prepare(tokens(2, 4), prompt_lengths=torch.tensor([1, -1])), "prompt_lengths"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(build, pattern):
    with pytest.raises(DualObjError, match=pattern):
        build()


def test_negative_ids_pass_unchecked_with_validation_off():
    with dualobj.validation(False):
        ARObjective().prepare(torch.tensor([[4, -2, 5]]))


# ---------------------------------------------------------------------------------------------- dtypes


def dtype_objectives():
    # AR, MD, the dual mix by rows and by both, and MD inside a one-component mixture.
    return {
        "ar": ARObjective(),
        "md": md(),
        "dual-rows": DualObjective(0.5, md=md()),
        "dual-both": DualObjective(0.5, md=md(), split="both"),
        "dual-rows-ar": DualObjective(1.0, md=md()),
        "md-in-mixture": Mixture({"md": (md(), 1.0)}),
    }


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("name", list(dtype_objectives()))
def test_narrow_integer_tokens_give_the_int64_loss(name, dtype):
    objective = dtype_objectives()[name]
    x = tokens(4, 9, seed=3)
    ref = objective.prepare(x, step=0, generator=gen(1))
    got = objective.prepare(x.to(dtype), step=0, generator=gen(1))
    assert got.input_ids.dtype == torch.int64 and got.labels.dtype == torch.int64
    assert torch.equal(got.labels, ref.labels) and torch.equal(got.input_ids, ref.input_ids)
    assert (got.labels >= IGNORE_INDEX).all() and (got.labels[got.labels != IGNORE_INDEX] >= 0).all()
    hidden = torch.randn(*ref.shape, 8, generator=gen(2))
    head = torch.nn.Linear(8, V)
    for kwargs in ({"head": head}, {}):
        out = hidden if kwargs else head(hidden)
        torch.testing.assert_close(objective.loss(out, got, **kwargs).loss, objective.loss(out, ref, **kwargs).loss)


# ---------------------------------------------------------------------------------------- tied heads


def test_an_embedding_as_head_is_the_tied_output_layer():
    emb = torch.nn.Embedding(V, 8)
    x = tokens(2, 7)
    hidden = torch.randn(2, 7, 8, generator=gen(0), requires_grad=True)
    batch = ARObjective().prepare(x)
    out = ARObjective().loss(hidden, batch, head=emb)
    ref = F.cross_entropy((hidden @ emb.weight.T)[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    g_out = torch.autograd.grad(out.loss, (hidden, emb.weight))
    g_ref = torch.autograd.grad(ref, (hidden, emb.weight))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- docs


def docs_block(heading: str) -> str:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_prefix_lm_composition_from_the_docs():
    """The prefix-LM snippet of docs/objectives.md, run as written: bidirectional prompt, loss on the continuation."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=V, dim=16, layers=2, heads=2, max_len=16, backend="math"))
    x = tokens(3, 10, seed=1)
    prompt_lengths = torch.tensor([4, 0, 7])
    namespace = {"model": model, "tokens": x, "prompt_lengths": prompt_lengths, "step": 0, "g": gen(0)}
    exec(compile(docs_block("Prefix LM"), str(DOCS), "exec"), namespace)
    batch, out = namespace["batch"], namespace["out"]
    # targets: continuation tokens only (output i predicts token i + 1 >= P)
    for b, P in enumerate(prompt_lengths.tolist()):
        want = [x[b, i + 1].item() if i + 1 >= P else IGNORE_INDEX for i in range(9)] + [IGNORE_INDEX]
        assert batch.labels[b].tolist() == want
    # the loss is plain CE of the prefix-LM model's logits on those targets
    logits = model.logits(x, causal=torch.ones(3, dtype=torch.bool), prefix_lengths=prompt_lengths)
    keep = batch.labels != IGNORE_INDEX
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[keep], batch.labels[keep]), rtol=1e-4, atol=1e-5)
    # attention: a late prompt token reaches the first prompt position (bidirectional prompt) ...
    y = x.clone()
    y[0, 3] = (x[0, 3] + 1 - NUM_SPECIAL) % (V - NUM_SPECIAL) + NUM_SPECIAL
    other = model.logits(y, causal=torch.ones(3, dtype=torch.bool), prefix_lengths=prompt_lengths)
    assert not torch.allclose(other[0, 0], logits[0, 0])
    # ... while a continuation token never reaches an earlier output (no leak of a target into its prediction)
    z = x.clone()
    z[0, 6] = (x[0, 6] + 1 - NUM_SPECIAL) % (V - NUM_SPECIAL) + NUM_SPECIAL
    later = model.logits(z, causal=torch.ones(3, dtype=torch.bool), prefix_lengths=prompt_lengths)
    torch.testing.assert_close(later[0, :6], logits[0, :6])


def test_mixture_example_from_the_docs():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=260, dim=16, layers=1, heads=2, max_len=64, backend="math"))
    x = torch.randint(4, 260, (8, 32), generator=gen(0))
    namespace = {"model": model, "tokens": x, "step": 5, "g": gen(1)}
    exec(compile(docs_block("Mixtures of objectives"), str(DOCS), "exec"), namespace)
    out = namespace["out"]
    assert math.isfinite(out.loss.item())
    assert {"ar/loss", "md/loss", "mlm/loss", "ar/tokens", "md/tokens", "mlm/tokens"} <= set(out.metrics)


# ------------------------------------------------------------------------------------ component metrics


def test_component_metrics_against_a_per_row_loop_and_across_stacked_batches():
    mix = Mixture({"ar": (ARObjective(), 0.4), "md": (md(), 0.35), "mlm": (md(shift=False, weighting="none"), 0.25)})
    parts = [mix.prepare(tokens(5, 8, seed=s), generator=gen(s)) for s in range(3)]
    batch = Batch.cat(parts)  # e.g. micro-batches stacked: every name appears in several groups of rows
    assert batch.component_names == ("ar", "md", "mlm") and batch.component.shape == (15,)
    logits = torch.randn(15, 8, V, generator=gen(9))
    out = mix.loss(logits, batch)
    ce = F.cross_entropy(logits.reshape(-1, V), batch.labels.reshape(-1), reduction="none").view(15, 8)
    for i, name in enumerate(batch.component_names):
        rows = [r for r in range(15) if batch.component[r] == i]
        total = sum(float((ce[r] * batch.weights[r] / (1 if batch.scale is None else batch.scale[r])).sum())
                    for r in rows)
        valid = sum(int(batch.valid_mask()[r].sum()) for r in rows)
        tokens_ = sum(int((batch.labels[r] != IGNORE_INDEX).sum()) for r in rows)
        assert out.metrics[f"{name}/loss"].item() == pytest.approx(total / max(valid, 1), rel=1e-5)
        assert out.metrics[f"{name}/tokens"].item() == tokens_
    assert dict(batch.component_counts()) == {
        n: sum(dict(p.component_counts())[n] for p in parts) for n in batch.component_names}
    # stacking batches of other mixtures (or none) drops the labels rather than mixing names up
    assert Batch.cat([parts[0], ARObjective().prepare(tokens(2, 8))]).component is None


def test_component_metrics_trace_once_whatever_the_row_counts():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    x = tokens(6, 7)
    ar = ARObjective().prepare(x)

    def metrics(logits, component):
        batch = Batch(input_ids=ar.input_ids, labels=ar.labels, weights=ar.weights, causal=ar.causal,
                      valid=ar.valid, component=component, component_names=("a", "b"))
        out = cross_entropy(logits, batch)
        return out.metrics["a/loss"], out.metrics["b/tokens"]

    compiled = torch.compile(metrics, backend=counter, fullgraph=True)
    logits = torch.randn(6, 7, V, generator=gen(0))
    for split in (1, 4, 6):
        component = (torch.arange(6) >= split).long()
        got, want = compiled(logits, component), metrics(logits, component)
        torch.testing.assert_close(got, want)
        assert want[1].item() == (6 - split) * 6
    assert counter.frame_count == 1


# ------------------------------------------------------------------------------------------ packaging


def test_the_package_ships_py_typed_as_package_data():
    import importlib.resources

    assert importlib.resources.files("dualobj").joinpath("py.typed").is_file()
    pyproject = (DOCS.parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dualobj = \[.*"py\.typed".*\]', section, flags=re.M)


def test_integrations_import_only_public_names_of_other_packages():
    import ast

    for path in (DOCS.parents[1] / "dualobj" / "integrations").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dualobj."):
                parts = node.module.split(".")
                private_elsewhere = parts[1] != "integrations" and any(p.startswith("_") for p in parts[2:])
                assert not private_elsewhere, f"{path.name} imports {node.module}"


# ------------------------------------------------------------------------------------------ properties

@settings(max_examples=60, deadline=None)
@given(raw=st.lists(st.integers(0, 20), min_size=1, max_size=5).filter(any), B=st.integers(0, 40),
       u=st.floats(0, 1, exclude_max=True))
def test_row_counts_always_sum_to_B_and_round_each_share(raw, B, u):
    import dualobj.objectives._mixture as mixture

    weights = [r / sum(raw) for r in raw]
    real = mixture.host_uniform
    mixture.host_uniform = lambda g: u
    try:
        counts = row_counts(weights, B, None)
    finally:
        mixture.host_uniform = real
    assert sum(counts) == B and len(counts) == len(weights)
    for n, w in zip(counts, weights):
        assert math.floor(w * B - 1e-9) <= n <= math.ceil(w * B + 1e-9)
        if w == 0:
            assert n == 0


@settings(max_examples=60, deadline=None)
@given(W=st.sampled_from([1, 2, 4, 6, 8, 12]), data=st.data())
def test_rank_rotation_is_exact_for_any_weights_on_the_rank_grid(W, data):
    k = data.draw(st.integers(1, 4))
    cuts = sorted(data.draw(st.lists(st.integers(0, W), min_size=k - 1, max_size=k - 1)))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, W])]
    weights = [c / W for c in counts]
    d = math.lcm(*(W // math.gcd(c, W) for c in counts))
    for epoch in range(3):
        picks = [rank_component(weights, rank=r, world_size=W, epoch=epoch) for r in range(W)]
        assert [picks.count(i) for i in range(k)] == counts
    for r in range(W):
        picks = [rank_component(weights, rank=r, world_size=W, epoch=e) for e in range(d)]
        assert [picks.count(i) * W for i in range(k)] == [c * d for c in counts]
