"""The objectives core: AR, MD and the dual mix, scored by one weighted cross-entropy.

Every loss is checked against an independent reference: ``F.cross_entropy`` on shifted logits, a brute-force
per-row loop of the MD estimator, closed forms (perfect and uniform predictors), and gradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dualobj import DualObjError
from dualobj.objectives import (
    IGNORE_INDEX,
    ARObjective,
    Batch,
    DualObjective,
    MDObjective,
    cross_entropy,
    global_loss,
    rank_is_ar,
)
from dualobj.schedules import LinearSchedule

MASK, NUM_SPECIAL = 3, 4  # ids 0..3 are special; 3 is <mask>


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(B: int, L: int, V: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(NUM_SPECIAL, V, (B, L), generator=gen(seed))


# --------------------------------------------------------------------------------------------------- AR


def test_ar_equals_cross_entropy_on_shifted_logits():
    x = tokens(3, 9, V=20)
    logits = torch.randn(3, 9, 20, generator=gen(1))
    out = ARObjective().loss(logits, ARObjective().prepare(x))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 20), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert out.count.item() == 3 * 8
    torch.testing.assert_close(out.metrics["ar/loss"], ref)
    assert out.metrics["md/tokens"].item() == 0


def test_ar_targets_stop_at_documents_padding_and_prompts():
    x = torch.tensor([[5, 6, 7, 8, 9, 0, 0]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    b = ARObjective(pad_id=0).prepare(x, doc_ids=doc, prompt_lengths=torch.tensor([2]))
    # position 0 -> token 6 lies in the prompt; 2 -> 8 crosses a document; 4 -> pad; 5 -> pad; 6 last.
    assert b.labels.tolist() == [[-100, 7, -100, 9, -100, -100, -100]]
    assert b.weights.tolist() == [[0, 1, 0, 1, 0, 0, 0]]
    assert b.causal.tolist() == [True] and b.causal.device.type == "cpu"


# --------------------------------------------------------------------------------------------------- MD


def brute_force_md(x, mask, t, logits, *, shift, estimator, maskable):
    """The MD estimator row by row, position by position, in float64 (linear schedule, t_min = 1e-3)."""
    B, L = x.shape
    total, valid = 0.0, 0
    for b in range(B):
        k = int(mask[b].sum())
        n = int(maskable[b].sum())
        if estimator == "count":
            w = n / k if k else 0.0  # k ~ U{1..n}: weight 1/(k·P(k)) = n/k
        elif estimator == "bernoulli":
            w = (1 - 1e-3) / float(t[b])  # t ~ U(t_min, 1): w(t) times the range's length
        elif estimator == "official":
            w = 1.0 / ((1 - 1e-4) * k / L + 1e-4)
        else:
            w = 1.0
        valid += n
        for j in range(L):
            if not mask[b, j]:
                continue
            out_pos = j - 1 if shift else j
            logp = torch.log_softmax(logits[b, out_pos].double(), -1)[x[b, j]]
            total += -w * float(logp)
    return total / valid


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("estimator", ["count", "bernoulli", "official", "none"])
def test_md_equals_brute_force_loop(shift, estimator):
    x = tokens(4, 11, V=24, seed=2)
    x[:, 0] = 1  # a BOS-like special id, never masked
    if estimator == "none":
        md = MDObjective(MASK, num_special=NUM_SPECIAL, shift=shift, weighting="none")
    else:
        md = MDObjective(MASK, num_special=NUM_SPECIAL, shift=shift, estimator=estimator)
    b = md.prepare(x, generator=gen(3))
    logits = torch.randn(4, 11, 24, generator=gen(4))
    out = md.loss(logits, b)
    mask = b.input_ids == MASK
    maskable = md.eligible(x)
    ref = brute_force_md(x, mask, b.t, logits, shift=shift, estimator=estimator, maskable=maskable)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)
    assert torch.equal(b.input_ids[~mask], x[~mask])
    assert not mask[:, 0].any()  # specials (and, with shift, the first token) are never masked
    assert out.metrics["ar/tokens"].item() == 0


def test_md_prepare_is_seeded_and_ignores_global_rng():
    x = tokens(5, 16)
    md = MDObjective(MASK, num_special=NUM_SPECIAL)
    torch.manual_seed(0)
    a = md.prepare(x, generator=gen(7))
    torch.manual_seed(123)
    torch.rand(10)
    b = md.prepare(x, generator=gen(7))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.t, b.t)


def test_md_respects_documents_padding_and_prompts():
    x = tokens(64, 12, seed=5)
    x[:, -2:] = 0  # padding
    doc = torch.tensor([0] * 5 + [1] * 7).expand(64, 12)
    md = MDObjective(MASK, num_special=NUM_SPECIAL, pad_id=0, min_count=1)
    b = md.prepare(x, doc_ids=doc, prompt_lengths=torch.full((64,), 2), generator=gen(6))
    masked = b.input_ids == MASK
    assert not masked[:, :2].any()  # prompt and first token
    assert not masked[:, 5].any()  # first token of the second document: no predecessor inside it
    assert not masked[:, -2:].any()  # padding
    assert masked.any()
    # shifted targets: output i scored exactly where input i+1 is masked
    assert torch.equal(b.labels[:, :-1] != IGNORE_INDEX, masked[:, 1:])
    assert torch.equal(b.labels[:, :-1][masked[:, 1:]], x[:, 1:][masked[:, 1:]])
    assert ((b.weights > 0) == (b.labels != IGNORE_INDEX)).all()


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 5),
    L=st.integers(1, 12),
    shift=st.booleans(),
    exact=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_md_batch_invariants(B, L, shift, exact, seed):
    x = tokens(B, L, seed=seed)
    md = MDObjective(MASK, num_special=NUM_SPECIAL, shift=shift, exact=exact)
    b = md.prepare(x, generator=gen(seed))
    masked = b.input_ids == MASK
    labelled = b.labels != IGNORE_INDEX
    assert torch.equal(masked | (b.input_ids == x), torch.ones_like(masked))
    if shift:
        assert not masked[:, 0].any()
        assert torch.equal(labelled[:, :-1], masked[:, 1:]) and not labelled[:, -1].any()
    else:
        assert torch.equal(labelled, masked)
    assert ((b.weights > 0) == labelled).all()
    assert (labelled <= b.valid_mask()).all()
    assert ((b.t >= 0) & (b.t <= 1)).all()


def test_perfect_predictor_has_zero_loss():
    x = tokens(6, 10)
    for objective in (ARObjective(), MDObjective(MASK, num_special=NUM_SPECIAL)):
        b = objective.prepare(x, generator=gen(0))
        logits = torch.full((6, 10, 32), -1e4)
        safe = b.labels.clamp_min(0)
        logits.scatter_(2, safe[..., None], 1e4)
        out = objective.loss(logits, b)
        assert out.loss.item() == 0.0
        assert out.metrics["accuracy"].item() == 1.0


def test_uniform_predictor_md_loss_is_log_vocab():
    """E[(1/t)·k·ln V]/n = ln V for the linear schedule with valid normalisation (exact-count and Bernoulli)."""
    V = 50
    x = tokens(4096, 16, V=V, seed=9)
    logits = torch.zeros(4096, 16, V)
    for exact in (True, False):
        md = MDObjective(MASK, num_special=NUM_SPECIAL, exact=exact, t_min=1e-3)
        out = md.loss(logits, md.prepare(x, generator=gen(10)))
        # Truncating t at t_min biases the mean by about t_min·ln V; the Monte-Carlo error is ~1%.
        assert out.loss.item() == pytest.approx(math.log(V), rel=0.05)


# --------------------------------------------------------------------------------------------------- dual


def test_rows_split_realises_alpha_in_expectation():
    md = MDObjective(MASK, num_special=NUM_SPECIAL)
    alpha, B, seeds = 0.3, 7, 2000  # αB = 2.1: stochastic rounding between 2 and 3 AR rows
    dual = DualObjective(alpha, md=md, split="rows")
    x = tokens(B, 6)
    counts = torch.tensor([dual.prepare(x, generator=gen(s)).num_causal for s in range(seeds)], dtype=torch.float64)
    assert set(counts.tolist()) <= {2.0, 3.0}
    share = counts.mean() / B
    se = counts.std() / B / math.sqrt(seeds)
    assert abs(share.item() - alpha) < 4 * se.item()
    # AR rows come first
    b = dual.prepare(x, generator=gen(0))
    n = b.num_causal
    assert b.causal[:n].all() and not b.causal[n:].any()


@pytest.mark.parametrize("normalize", ["valid", "positions", "targets", "none"])
def test_both_split_is_exact(normalize):
    alpha = 0.3
    md = MDObjective(MASK, num_special=NUM_SPECIAL)
    dual = DualObjective(alpha, md=md, split="both", normalize=normalize)
    x = tokens(4, 12, seed=11)
    x[:, 0] = 1
    b = dual.prepare(x, generator=gen(12))
    assert b.shape == (8, 12) and b.causal.tolist() == [True] * 4 + [False] * 4
    logits = torch.randn(8, 12, 32, generator=gen(13), requires_grad=True)
    out = dual.loss(logits, b)
    ar = cross_entropy(logits[:4], ARObjective().prepare(x), normalize=normalize).loss
    mdl = cross_entropy(logits[4:], md.prepare(x, generator=gen(12)), normalize=normalize).loss
    torch.testing.assert_close(out.loss, alpha * ar + (1 - alpha) * mdl)
    # metrics divide the mixing factors back out
    torch.testing.assert_close(out.metrics["ar/loss"], cross_entropy(logits[:4], ARObjective().prepare(x)).loss)


def test_ar_scale_doubles_ar_weights_only():
    md = MDObjective(MASK, num_special=NUM_SPECIAL)
    x = tokens(4, 8)
    one = DualObjective(0.5, md=md, split="rows").prepare(x, generator=gen(1))
    two = DualObjective(0.5, md=md, split="rows", ar_scale=2.0).prepare(x, generator=gen(1))
    ar = one.causal
    torch.testing.assert_close(two.weights[ar], 2 * one.weights[ar])
    torch.testing.assert_close(two.weights[~ar], one.weights[~ar])


def test_step_split_and_alpha_schedule():
    md = MDObjective(MASK, num_special=NUM_SPECIAL)
    dual = DualObjective(lambda step: 1.0 if step < 10 else 0.0, md=md, split="step")
    x = tokens(3, 5)
    assert dual.prepare(x, step=0, generator=gen(0)).causal.all()
    assert not dual.prepare(x, step=10, generator=gen(0)).causal.any()
    half = DualObjective(0.5, md=md, split="step")
    ar_steps = sum(bool(half.prepare(x, generator=gen(s)).causal.all()) for s in range(400))
    assert 160 < ar_steps < 240  # Binomial(400, 1/2): ±4 sd


def test_rank_rule_matches_the_paper_and_rotates():
    # 3/4 of 4 ranks masked (alpha = 1/4): rank r is AR when (epoch + r) % 4 < 1.
    table = [[rank_is_ar(0.25, rank=r, world_size=4, epoch=e) for r in range(4)] for e in range(4)]
    assert table == [[True, False, False, False], [False, False, False, True],
                     [False, False, True, False], [False, True, False, False]]
    for r in range(4):  # over a full rotation each rank runs AR exactly α·W times
        assert sum(table[e][r] for e in range(4)) == 1
    md = MDObjective(MASK, num_special=NUM_SPECIAL)
    dual = DualObjective(0.25, md=md, split="rank", steps_per_epoch=10, rank=3, world_size=4)
    assert not dual.prepare(tokens(2, 5), step=0).causal.any()
    assert dual.prepare(tokens(2, 5), step=10).causal.all()
    with pytest.raises(DualObjError, match="alpha"):
        rank_is_ar(0.3, rank=0, world_size=4, epoch=0)


# --------------------------------------------------------------------------------------------------- numerics


def test_all_ignored_batch_gives_zero_loss_and_zero_grads():
    x = tokens(2, 1)  # L = 1: no next token, so AR has no target at all
    b = ARObjective().prepare(x)
    logits = torch.randn(2, 1, 32, requires_grad=True)
    out = ARObjective().loss(logits, b)
    out.loss.backward()
    assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert all(not torch.isnan(v) for v in out.metrics.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_float32_loss(dtype):
    x = tokens(2, 6)
    b = ARObjective().prepare(x)
    logits = torch.randn(2, 6, 32).to(dtype)
    out = ARObjective(z_loss=1e-4).loss(logits, b)
    assert out.loss.dtype == torch.float32 and out.total.dtype == torch.float32
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 32), x[:, 1:].reshape(-1))
    ref = ref + 1e-4 * torch.logsumexp(logits[:, :-1].float(), -1).square().mean()
    torch.testing.assert_close(out.loss, ref)


def test_gradcheck_float64():
    x = tokens(2, 4, V=6)
    md = MDObjective(MASK, num_special=NUM_SPECIAL, min_count=1)
    dual = DualObjective(0.5, md=md, split="both", z_loss=0.1)
    b = dual.prepare(x, generator=gen(0))
    logits = torch.randn(4, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: dual.loss(z, b).loss, (logits,))


def test_hidden_and_head_equal_logits_path():
    x = tokens(3, 7)
    md = MDObjective(MASK, num_special=NUM_SPECIAL)
    dual = DualObjective(0.5, md=md, z_loss=1e-3)
    b = dual.prepare(x, generator=gen(2))
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 32)
    a = dual.loss(hidden, b, head=head)
    r = dual.loss(head(hidden), b)
    torch.testing.assert_close(a.loss, r.loss)
    for key in r.metrics:
        torch.testing.assert_close(a.metrics[key], r.metrics[key])
    ga = torch.autograd.grad(a.loss, hidden)[0]
    gr = torch.autograd.grad(r.loss, hidden)[0]
    torch.testing.assert_close(ga, gr)


def test_global_loss_without_process_group_is_the_loss():
    x = tokens(2, 6)
    b = ARObjective().prepare(x)
    out = ARObjective().loss(torch.randn(2, 6, 32), b)
    torch.testing.assert_close(global_loss(out), out.loss)
    torch.testing.assert_close(global_loss(out, count=2 * out.count), out.loss / 2)


def test_compile_fullgraph_traces_cross_entropy_and_deterministic_prepare():
    torch._dynamo.reset()
    ar = ARObjective()
    md = MDObjective(MASK, num_special=NUM_SPECIAL)
    x = tokens(2, 8)

    def step(x, logits, mask, t):
        a = cross_entropy(logits, ar.prepare(x), z_loss=1e-4).loss
        m = cross_entropy(logits, md.build(x, mask, t, maskable=md.eligible(x))).loss
        return a + m

    mask = torch.rand(2, 8, generator=gen(0)) < 0.5
    t = torch.tensor([0.5, 0.25])
    logits = torch.randn(2, 8, 32)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, logits, mask, t), step(x, logits, mask, t))


# --------------------------------------------------------------------------------------------------- errors


def test_bad_input_errors_name_the_argument():
    x = tokens(2, 5)
    b = ARObjective().prepare(x)
    with pytest.raises(DualObjError, match=r"logits: expected logits of shape \[B, L, \*\] = \[2, 5, \*\]"):
        cross_entropy(torch.randn(2, 4, 32), b)
    with pytest.raises(DualObjError, match=r"labels: expected values in \[0, 8\)"):
        cross_entropy(torch.randn(2, 5, 8), b)
    with pytest.raises(DualObjError, match="alpha"):
        DualObjective(1.5, md=MDObjective(MASK, num_special=NUM_SPECIAL))
    with pytest.raises(DualObjError, match=r"alpha\(3\)"):
        DualObjective(lambda s: -0.1, md=MDObjective(MASK, num_special=NUM_SPECIAL)).prepare(x, step=3)
    with pytest.raises(DualObjError, match="mask_token_id"):
        MDObjective(10, num_special=NUM_SPECIAL)
    with pytest.raises(DualObjError, match="mask_token_id"):
        MDObjective(10, special_ids=[0, 1, 2])
    with pytest.raises(DualObjError, match="tokens: expected a non-empty"):
        ARObjective().prepare(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(DualObjError, match="tokens: expected an integer tensor"):
        ARObjective().prepare(torch.zeros(2, 5))
    with pytest.raises(DualObjError, match=r"doc_ids: expected shape \[2, 5\]"):
        ARObjective().prepare(x, doc_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(DualObjError, match="normalize"):
        ARObjective(normalize="mean")
    with pytest.raises(DualObjError, match="split"):
        DualObjective(0.5, md=MDObjective(MASK, num_special=NUM_SPECIAL), split="layers")
    with pytest.raises(DualObjError, match="tokens: expected clean ids"):
        MDObjective(MASK, num_special=NUM_SPECIAL).prepare(torch.full((1, 4), MASK))
    with pytest.raises(DualObjError, match="weights"):
        Batch(input_ids=x, labels=x, weights=torch.ones(2, 4), causal=torch.ones(2, dtype=torch.bool))
    with pytest.raises(DualObjError, match="t: expected values in"):
        LinearSchedule().weight(torch.tensor([1.5]))
    assert issubclass(DualObjError, ValueError)
