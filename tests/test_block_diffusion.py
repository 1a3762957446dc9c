"""Block diffusion: its attention mask against the rule, every CPU backend on it, the b = L and b = 1 reductions,
the unbiasedness of its NELBO estimate by enumeration, the evaluation, the HF mask, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dualobj import DualObjError
from dualobj.attention import AttentionLayout, attention, block_diffusion_mask
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import ARObjective, Batch, BlockDiffusionObjective, MDObjective
from dualobj.schedules import TimeSample, UniformSampler

MASK = 1
V = 12


# ----------------------------------------------------------------------------------------------- references


def brute_mask(L: int, b: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 2L, 2L] (B = 1 without documents) straight from the rule, with loops."""
    B = 1 if doc_ids is None else doc_ids.shape[0]
    out = torch.zeros(B, 2 * L, 2 * L, dtype=torch.bool)
    for r in range(B):
        run = [0] * L
        for p in range(1, L):
            run[p] = run[p - 1] + int(doc_ids is not None and int(doc_ids[r, p]) != int(doc_ids[r, p - 1]))
        for i in range(2 * L):
            for j in range(2 * L):
                qi_noisy, kj_noisy = i < L, j < L
                qp, kp = i % L, j % L
                qb, kb = qp // b, kp // b
                if qi_noisy and kj_noisy:
                    ok = qb == kb
                elif qi_noisy:
                    ok = kb < qb
                elif kj_noisy:
                    ok = False
                else:
                    ok = kb <= qb
                out[r, i, j] = ok and run[qp] == run[kp]
    return out


def brute_attention(q, k, v, allowed, scale):
    """Per-row, per-head, per-query softmax attention in float64 over the allowed keys."""
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for r in range(B):
        for h in range(H):
            for i in range(T):
                keys = allowed[r, i].nonzero().flatten()
                s = (k[r, keys, h].double() @ q[r, i, h].double()) * scale
                out[r, i, h] = torch.softmax(s, 0) @ v[r, keys, h].double()
    return out


class FixedTime:
    """A time sampler that always returns ``t`` (weight 1)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self, n, *, device="cpu", generator=None) -> TimeSample:
        t = torch.full((n,), self.t, device=device)
        return TimeSample(t, torch.ones_like(t))


def tiny_model(backend: str = "sdpa", dtype=torch.float64, seed: int = 0, max_len: int = 64) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(vocab_size=V, dim=16, layers=2, heads=2, max_len=max_len, backend=backend))
    return model.to(dtype)


def random_docs(B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    change = torch.rand(B, L, generator=g) < 0.3
    change[:, 0] = False
    return change.long().cumsum(1)


# ----------------------------------------------------------------------------------------------- the mask


@pytest.mark.parametrize("L,b", [(1, 1), (6, 1), (6, 6), (7, 3), (8, 3), (8, 4), (5, 2), (9, 4)])
def test_mask_matches_rule(L, b):
    assert torch.equal(block_diffusion_mask(L, b), brute_mask(L, b)[0])


def test_short_last_block_is_a_smaller_block():
    # L = 5, b = 2: blocks {0,1}, {2,3}, {4}; the noisy token 4 sees only itself among noisy tokens and clean 0..3.
    m = block_diffusion_mask(5, 2)
    assert m[4, :5].tolist() == [False, False, False, False, True]
    assert m[4, 5:].tolist() == [True, True, True, True, False]
    assert m[9, 5:].tolist() == [True] * 5  # the last clean token sees every clean token


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 10), data=st.data(), seed=st.integers(0, 1000), B=st.integers(1, 3))
def test_mask_matches_rule_with_documents(L, data, seed, B):
    b = data.draw(st.integers(1, L))
    docs = random_docs(B, L, seed)
    assert torch.equal(block_diffusion_mask(L, b, doc_ids=docs), brute_mask(L, b, docs))
    # the spec used by every backend builds the same mask
    spec = AttentionLayout(block_size=b, doc_ids=docs).spec(B, 2 * L)
    assert torch.equal(spec.mask("cpu")[:, 0], brute_mask(L, b, docs))


@pytest.mark.parametrize("L,b,docs", [(6, 1, False), (6, 6, False), (7, 3, False), (8, 3, True), (5, 2, True)])
def test_cpu_backends_equal_reference_on_layout(L, b, docs):
    B, H, D = 2, 2, 8
    g = torch.Generator().manual_seed(L * 10 + b)
    q0, k0, v0 = (torch.randn(B, 2 * L, H, D, generator=g) for _ in range(3))
    doc_ids = random_docs(B, L, seed=b) if docs else None
    layout = AttentionLayout(block_size=b, doc_ids=doc_ids)
    allowed = brute_mask(L, b, doc_ids).expand(B, 2 * L, 2 * L)
    ref = brute_attention(q0, k0, v0, allowed, D**-0.5)
    grad_out = torch.randn(B, 2 * L, H, D, generator=g)
    results = {}
    for backend in ("math", "sdpa"):
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
        out = attention(q, k, v, layout=layout, backend=backend)
        out.backward(grad_out)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        results[backend] = (out.detach(), q.grad, k.grad, v.grad)
    for a, c in zip(results["math"], results["sdpa"]):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=2e-5)
    with torch.no_grad():  # FlexAttention runs forward only on the CPU
        torch.testing.assert_close(attention(q0, k0, v0, layout=layout, backend="flex").double(), ref,
                                   atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- the objective


def test_batch_layout_and_fields():
    tokens = torch.tensor([[5, 6, 7, 8, 9], [4, 5, 6, 7, 8]])
    docs = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    bd = BlockDiffusionObjective(MASK, 2, num_special=2)
    batch = bd.prepare(tokens, doc_ids=docs, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (2, 10) and batch.block_size == 2 and batch.t.shape == (2, 3)
    assert torch.equal(batch.input_ids[:, 5:], tokens)  # the clean copy
    noisy = batch.input_ids[:, :5]
    masked = noisy == MASK
    assert torch.equal(torch.where(masked, tokens, noisy), tokens)
    assert torch.equal(batch.labels[:, :5], torch.where(masked, tokens, -100))
    assert (batch.labels[:, 5:] == -100).all() and (batch.weights[:, 5:] == 0).all()
    w = 1.0 / batch.t  # linear schedule
    expect_w = w[:, torch.arange(5) // 2] * masked
    torch.testing.assert_close(batch.weights[:, :5], expect_w)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1] * 2, [0, 1, 2, 3, 4] * 2]
    assert torch.equal(batch.doc_ids, torch.cat([docs, docs], 1))
    layout = batch.layout
    assert layout.block_size == 2 and torch.equal(layout.doc_ids, docs)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_token_dtype(dtype):
    tokens = torch.randint(2, V, (3, 9))
    bd = BlockDiffusionObjective(MASK, 4, num_special=2)
    ref = bd.prepare(tokens, generator=torch.Generator().manual_seed(3))
    got = bd.prepare(tokens.to(dtype), generator=torch.Generator().manual_seed(3))
    for name in ("input_ids", "labels", "weights", "valid", "position_ids"):
        assert torch.equal(getattr(ref, name), getattr(got, name)), name
    assert got.input_ids.dtype == torch.int64 and got.labels.dtype == torch.int64


def test_masker_sees_each_block_as_a_row():
    seen = {}

    def first_of_block(tokens, rate, *, maskable, generator=None):
        seen["shape"], seen["rate"] = tuple(tokens.shape), rate.clone()
        out = torch.zeros_like(maskable)
        out[:, 0] = True
        return out & maskable

    bd = BlockDiffusionObjective(MASK, 3, masker=first_of_block, sampler=FixedTime(0.5))
    batch = bd.prepare(torch.randint(2, V, (2, 7)))
    assert seen["shape"] == (6, 3) and torch.allclose(seen["rate"], torch.full((6,), 0.5))
    masked = batch.input_ids[:, :7] == MASK
    assert masked.tolist() == [[True, False, False, True, False, False, True]] * 2


@pytest.mark.parametrize("t_per", ["block", "row"])
def test_t_per_block_or_row(t_per):
    bd = BlockDiffusionObjective(MASK, 2, t_per=t_per)
    t = bd.prepare(torch.randint(2, V, (64, 8)), generator=torch.Generator().manual_seed(0)).t
    shared = bool((t == t[:, :1]).all())
    assert shared == (t_per == "row")


def test_fused_head_equals_logits_path():
    model = tiny_model(dtype=torch.float32)
    bd = BlockDiffusionObjective(MASK, 3, num_special=2)
    batch = bd.prepare(torch.randint(2, V, (3, 8)), generator=torch.Generator().manual_seed(1))
    hidden = model(batch.input_ids, layout=batch.layout)
    a = bd.loss(model.lm_head(hidden), batch)
    b = bd.loss(hidden, batch, head=model.lm_head)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    assert a.metrics["md/tokens"] == batch.weights.gt(0).sum()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_block_size_L_is_in_place_md_on_x_t(backend):
    L = 9
    model = tiny_model(backend)
    tokens = torch.randint(2, V, (4, L), generator=torch.Generator().manual_seed(5))
    bd = BlockDiffusionObjective(MASK, L, num_special=2, normalize="valid")
    batch = bd.prepare(tokens, generator=torch.Generator().manual_seed(6))
    out = bd.loss(model(batch.input_ids, layout=batch.layout), batch, head=model.lm_head)
    # the same t and mask, run as in-place MD on x_t alone with bidirectional attention
    mask = batch.input_ids[:, :L] == MASK
    md = MDObjective(MASK, shift=False, num_special=2, normalize="valid")
    md_batch = md.build(tokens, mask, batch.t[:, 0], maskable=bd.eligible(tokens))
    md_out = md.loss(model(md_batch.input_ids, causal=False), md_batch, head=model.lm_head)
    assert mask.any()
    torch.testing.assert_close(out.total, md_out.total, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.loss, md_out.loss, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_block_size_1_fully_masked_is_the_ar_factorisation(backend):
    L = 7
    model = tiny_model(backend)
    tokens = torch.randint(2, V, (3, L), generator=torch.Generator().manual_seed(7))
    bd = BlockDiffusionObjective(MASK, 1, sampler=FixedTime(1.0), normalize="none")
    batch = bd.prepare(tokens)
    assert (batch.input_ids[:, :L] == MASK).all()
    total = bd.loss(model(batch.input_ids, layout=batch.layout), batch, head=model.lm_head).total
    # brute force: for each j, the clean prefix x_<j then one mask token at j, causal; score x_j there
    expected = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for j in range(L):
            inp = torch.cat([tokens[:, :j], torch.full((3, 1), MASK)], dim=1)
            logits = model.lm_head(model(inp, causal=True))[:, -1]
            expected = expected + F.cross_entropy(logits.double(), tokens[:, j], reduction="sum")
    torch.testing.assert_close(total.double(), expected, atol=1e-8, rtol=1e-8)


# ----------------------------------------------------------------------------------------------- unbiasedness


def toy_logits(input_ids: torch.Tensor, base: torch.Tensor, L: int, b: int) -> torch.Tensor:
    """Per-position predictions ``base[i]`` sharpened by the masked share of the position's block (so the loss
    depends on how many tokens of the block are masked, which a biased estimator would expose)."""
    B = input_ids.shape[0]
    noisy = input_ids[:, :L] == MASK
    block_of = torch.arange(L) // b
    K = int(block_of.max()) + 1
    size = torch.bincount(block_of, minlength=K).double()
    masked = torch.zeros(B, K, dtype=torch.float64).index_add_(1, block_of, noisy.double())
    share = (masked / size)[:, block_of]  # [B, L]
    logits = base[None] * (1.0 + 2.0 * share[..., None])
    return torch.cat([logits, torch.zeros_like(logits)], dim=1)


def exact_nelbo(x: torch.Tensor, base: torch.Tensor, L: int, b: int) -> float:
    """Σ_blocks Σ_k G(k)/k by enumerating every masked subset of every block."""
    total = 0.0
    for start in range(0, L, b):
        pos = list(range(start, min(start + b, L)))
        n = len(pos)
        for k in range(1, n + 1):
            losses = []
            for subset in itertools.combinations(pos, k):
                scale = 1.0 + 2.0 * k / n
                losses.append(sum(float(F.cross_entropy(base[i] * scale, x[i])) for i in subset))
            total += sum(losses) / len(losses) / k
    return total


@pytest.mark.parametrize("L,b,t_per", [(7, 3, "block"), (7, 3, "row"), (8, 8, "block"), (6, 1, "block")])
def test_nelbo_estimate_is_unbiased(L, b, t_per):
    g = torch.Generator().manual_seed(11)
    x = torch.randint(2, V, (L,), generator=g)
    base = torch.randn(L, V, generator=g, dtype=torch.float64) * 1.5
    exact = exact_nelbo(x, base, L, b)
    N = 20000
    bd = BlockDiffusionObjective(MASK, b, t_per=t_per, sampler=UniformSampler(1e-4, 1.0), t_min=1e-4,
                                 normalize="none")
    batch = bd.prepare(x.expand(N, L), generator=torch.Generator().manual_seed(12))
    logits = toy_logits(batch.input_ids, base, L, b)
    ce = F.cross_entropy(logits.flatten(0, 1), batch.labels.clamp_min(0).flatten(), reduction="none")
    per_row = (ce.view(N, 2 * L) * batch.weights.double()).sum(1)
    torch.testing.assert_close(bd.loss(logits, batch).total.double(), per_row.sum(), rtol=1e-5, atol=1e-5)
    mean, se = float(per_row.mean()), float(per_row.std() / math.sqrt(N))
    assert abs(mean - exact) < 3 * se, (mean, exact, se)


# ----------------------------------------------------------------------------------------------- integrations


def test_hf_additive_mask_is_the_block_mask():
    from dualobj.integrations import additive_attention_mask

    docs = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    bd = BlockDiffusionObjective(MASK, 4)
    batch = bd.prepare(torch.randint(2, V, (2, 6)), doc_ids=docs, generator=torch.Generator().manual_seed(0))
    mask = additive_attention_mask(batch)
    assert mask.shape == (2, 1, 12, 12)
    assert torch.equal(mask[:, 0] == 0, brute_mask(6, 4, docs))
    from dualobj.integrations import allowed_keys

    assert torch.equal(allowed_keys(batch.causal, 12, doc_ids=docs, block_size=4), brute_mask(6, 4, docs))
    # padding given for one copy [B, L] hides the padded keys of both copies; a query still sees itself
    pad = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    padded = additive_attention_mask(batch, padding_mask=pad)[:, 0] == 0
    expect = brute_mask(6, 4, docs) & torch.cat([pad, pad], 1).bool()[:, None, :]
    expect |= torch.eye(12, dtype=torch.bool)
    assert torch.equal(padded, expect)
    with pytest.raises(DualObjError, match=r"^prefix_lengths: "):
        additive_attention_mask(batch, prefix_lengths=torch.tensor([1, 1]))


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_block_size():
    with pytest.raises(DualObjError, match="block_size"):
        BlockDiffusionObjective(MASK, 0)
    with pytest.raises(DualObjError, match="block_size"):
        BlockDiffusionObjective(MASK, True)
    with pytest.raises(DualObjError, match="block_size"):
        BlockDiffusionObjective(MASK, 9).prepare(torch.randint(2, V, (2, 8)))
    with pytest.raises(DualObjError, match="block_size"):
        block_diffusion_mask(4, 5)
    with pytest.raises(DualObjError, match="block_size"):
        block_diffusion_mask(4, 0)


def test_bd_batch_without_its_layout_is_refused():
    bd = BlockDiffusionObjective(MASK, 2)
    batch = bd.prepare(torch.randint(2, V, (2, 4)), generator=torch.Generator().manual_seed(0))
    q = torch.randn(2, 8, 2, 4)
    with pytest.raises(DualObjError, match=r"^layout: .*layout=batch.layout"):
        attention(q, q, q, causal=batch.causal)
    model = tiny_model(dtype=torch.float32)
    with pytest.raises(DualObjError, match=r"^layout: "):
        model(batch.input_ids, causal=batch.causal, doc_ids=batch.doc_ids)
    from dualobj.integrations import allowed_keys

    with pytest.raises(DualObjError, match=r"^layout: "):
        allowed_keys(batch.causal, 8)
    # with its layout it runs, and a moved batch keeps the guard
    assert model(batch.input_ids, layout=batch.layout).shape == (2, 8, 16)
    with pytest.raises(DualObjError, match=r"^layout: "):
        model(batch.to("cpu").input_ids, causal=batch.to("cpu").causal)


def test_layout_and_keywords_together_are_refused():
    q = torch.randn(1, 4, 1, 4)
    with pytest.raises(DualObjError, match=r"^layout: "):
        attention(q, q, q, layout=AttentionLayout(causal=True), causal=True)
    with pytest.raises(DualObjError, match=r"^causal: "):
        attention(q, q, q)
    with pytest.raises(DualObjError, match=r"^layout: "):
        attention(q, q, q, layout="causal")
    with pytest.raises(DualObjError, match=r"^q: "):
        attention(torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4),
                  layout=AttentionLayout(block_size=2))
    with pytest.raises(DualObjError, match=r"^prefix_lengths: "):
        AttentionLayout(block_size=2, prefix_lengths=torch.tensor([1]))


def test_cat_refuses_mixed_layouts_and_lengths():
    tokens = torch.randint(2, V, (2, 4))
    bd = BlockDiffusionObjective(MASK, 2).prepare(tokens, generator=torch.Generator().manual_seed(0))
    bd4 = BlockDiffusionObjective(MASK, 4).prepare(tokens, generator=torch.Generator().manual_seed(0))
    ar8 = ARObjective().prepare(torch.randint(2, V, (2, 8)))
    ar4 = ARObjective().prepare(tokens)
    with pytest.raises(DualObjError, match=r"^batches: .*layout"):
        Batch.cat([bd, ar8])  # same length 2L = 8, different layouts
    with pytest.raises(DualObjError, match=r"^batches: .*layout"):
        Batch.cat([bd, bd4])
    with pytest.raises(DualObjError, match=r"^batches: .*length"):
        Batch.cat([ar4, ar8])
    both = Batch.cat([bd, bd])
    assert both.shape == (4, 8) and both.block_size == 2 and both.t.shape == (4, 2)
    with pytest.raises(DualObjError, match=r"^layout: "):
        attention(torch.randn(4, 8, 1, 4), torch.randn(4, 8, 1, 4), torch.randn(4, 8, 1, 4), causal=both.causal)


def test_tokens_with_the_mask_id_are_refused():
    with pytest.raises(DualObjError, match=r"^tokens: "):
        BlockDiffusionObjective(MASK, 2).prepare(torch.tensor([[2, MASK, 3, 4]]))


# ----------------------------------------------------------------------------------------------- evaluation


class ToyModel(torch.nn.Module):
    """Returns :func:`toy_logits` as its "hidden states" (read out with an identity head)."""

    def __init__(self, base: torch.Tensor, L: int, b: int) -> None:
        super().__init__()
        self.base, self.L, self.b = base, L, b

    def forward(self, input_ids, layout=None):
        assert layout is not None and layout.block_size == self.b
        return toy_logits(input_ids, self.base, self.L, self.b)


@pytest.mark.parametrize(("t_per", "estimator"), [("block", "bernoulli"), ("row", "bernoulli"), ("block", "exact")])
def test_bd_nelbo_matches_enumeration_within_its_standard_error(t_per, estimator):
    from dualobj.evaluation import bd_nelbo

    L, b, N = 7, 3, 3000
    g = torch.Generator().manual_seed(21)
    x = torch.randint(2, V, (L,), generator=g)
    base = torch.randn(L, V, generator=g, dtype=torch.float64)
    exact = exact_nelbo(x, base, L, b) * N
    bd = BlockDiffusionObjective(MASK, b, t_per=t_per)
    est = bd_nelbo(ToyModel(base, L, b), x.expand(N, L), bd=bd, samples=3, head=torch.eye(V, dtype=torch.float64),
                   batch_size=1024, estimator=estimator)
    assert est.tokens == N * L and est.samples == 3
    assert 0 < est.stderr < 0.05 * exact
    assert abs(est.nats - exact) < 3 * est.stderr, (est.nats, exact, est.stderr)
    # one sample: no standard error; the same seed gives the same estimate
    one = bd_nelbo(ToyModel(base, L, b), x.expand(8, L), bd=bd, samples=1, head=torch.eye(V, dtype=torch.float64),
                   estimator=estimator)
    again = bd_nelbo(ToyModel(base, L, b), x.expand(8, L), bd=bd, samples=1, head=torch.eye(V, dtype=torch.float64),
                     estimator=estimator)
    assert math.isnan(one.stderr) and one.nats == again.nats


def test_bd_nelbo_runs_the_reference_model_and_refuses_bad_input():
    from dualobj.evaluation import bd_nelbo

    model = tiny_model(dtype=torch.float32)
    bd = BlockDiffusionObjective(MASK, 4, num_special=2)
    tokens = torch.randint(2, V, (5, 8), generator=torch.Generator().manual_seed(0))
    out = bd_nelbo(model, tokens, bd=bd, samples=2, batch_size=2)
    assert out.tokens == 40 and math.isfinite(out.nats) and out.stderr > 0
    with pytest.raises(DualObjError, match=r"^bd: "):
        bd_nelbo(model, tokens, bd=MDObjective(MASK))
    with pytest.raises(DualObjError, match=r"^samples: "):
        bd_nelbo(model, tokens, bd=bd, samples=0)
    with pytest.raises(DualObjError, match=r"^block_size: "):
        bd_nelbo(model, tokens[:, :3], bd=bd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("docs", [False, True])
def test_cuda_backends_equal_math_on_layout(backend, docs):
    B, L, b, H, D = 2, 96, 16, 2, 32
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(B, 2 * L, H, D, generator=g).cuda() for _ in range(3))
    grad_out = torch.randn(B, 2 * L, H, D, generator=g).cuda()
    layout = AttentionLayout(block_size=b, doc_ids=random_docs(B, L, 3).cuda() if docs else None)
    results = []
    for name in ("math", backend):
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
        out = attention(q, k, v, layout=layout, backend=name)
        out.backward(grad_out)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, atol=2e-3, rtol=2e-3)


def test_packed_documents_equal_separate_runs():
    L, b = 8, 2
    model = tiny_model()
    tokens = torch.randint(2, V, (2, L), generator=torch.Generator().manual_seed(8))
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [3, 3, 3, 3, 3, 3, 7, 7]])
    bd = BlockDiffusionObjective(MASK, b, normalize="none")
    packed = bd.prepare(tokens, doc_ids=docs, generator=torch.Generator().manual_seed(9))
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3] * 2
    total = bd.loss(model(packed.input_ids, layout=packed.layout), packed, head=model.lm_head).total
    mask, t = packed.input_ids[:, :L] == MASK, packed.t
    expected = 0.0
    for row, cuts in ((0, [(0, 4), (4, 8)]), (1, [(0, 6), (6, 8)])):
        for s, e in cuts:  # each document alone, with its blocks' masks and noise levels
            x = tokens[row:row + 1, s:e]
            everywhere = torch.ones_like(x, dtype=torch.bool)
            one = bd.build(x, mask[row:row + 1, s:e], t[row:row + 1, s // b:e // b], maskable=everywhere)
            expected = expected + bd.loss(model(one.input_ids, layout=one.layout), one, head=model.lm_head).total
    torch.testing.assert_close(total, expected, atol=1e-9, rtol=1e-9)


def test_clean_half_is_block_causal_over_x0():
    L = 8
    model = tiny_model()
    tokens = torch.randint(2, V, (2, L), generator=torch.Generator().manual_seed(4))
    batch = BlockDiffusionObjective(MASK, 1).prepare(tokens, generator=torch.Generator().manual_seed(5))
    hidden = model(batch.input_ids, layout=batch.layout)
    torch.testing.assert_close(hidden[:, L:], model(tokens, causal=True), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_llama_with_the_block_mask_and_positions_is_the_ar_factorisation(attn):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation=attn)
    model = transformers.LlamaForCausalLM(config).eval().double()
    from dualobj.integrations import additive_attention_mask

    L = 6
    tokens = torch.randint(2, V, (2, L), generator=torch.Generator().manual_seed(3))
    bd = BlockDiffusionObjective(MASK, 1, sampler=FixedTime(1.0), normalize="none")
    batch = bd.prepare(tokens)
    with torch.no_grad():
        mask = additive_attention_mask(batch, dtype=torch.float64)
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids).logits
        total = bd.loss(logits, batch).total
        expected = 0.0
        for j in range(L):  # HF's own causal attention on x_<j followed by a mask token at j
            inp = torch.cat([tokens[:, :j], torch.full((2, 1), MASK)], dim=1)
            expected += float(F.cross_entropy(model(input_ids=inp).logits[:, -1], tokens[:, j], reduction="sum"))
    assert abs(float(total) - expected) < 1e-8 * max(1.0, expected)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 12), data=st.data(), seed=st.integers(0, 10_000),
       t_per=st.sampled_from(["block", "row"]))
def test_prepare_invariants(B, L, data, seed, t_per):
    b = data.draw(st.integers(1, L))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, L), generator=g)
    tokens[tokens == MASK] = 0  # id 0 is special (num_special=2) and never masked; MASK never appears
    docs = random_docs(B, L, seed)
    prompt = torch.randint(0, L + 1, (B,), generator=g)
    bd = BlockDiffusionObjective(MASK, b, num_special=2, t_per=t_per)
    batch = bd.prepare(tokens, doc_ids=docs, prompt_lengths=prompt, generator=g)
    K = -(-L // b)
    assert batch.t.shape == (B, K) and ((batch.t >= 1e-3) & (batch.t <= 1)).all()
    noisy, clean = batch.input_ids[:, :L], batch.input_ids[:, L:]
    assert torch.equal(clean, tokens)
    masked = noisy == MASK
    maskable = (tokens >= 2) & (torch.arange(L)[None] >= prompt[:, None])
    assert not (masked & ~maskable).any() and torch.equal(torch.where(masked, tokens, noisy), tokens)
    assert torch.equal(batch.valid[:, :L], maskable) and not batch.valid[:, L:].any()
    block_of = [p // b for p in range(L)]
    for r in range(B):
        for p in range(L):
            w = float(1.0 / batch.t[r, block_of[p]]) if masked[r, p] else 0.0
            assert math.isclose(float(batch.weights[r, p]), w, rel_tol=1e-6)
            assert int(batch.labels[r, p]) == (int(tokens[r, p]) if masked[r, p] else -100)
            start = max(q for q in range(p + 1) if q == 0 or int(docs[r, q]) != int(docs[r, q - 1]))
            assert int(batch.position_ids[r, p]) == int(batch.position_ids[r, L + p]) == p - start
    assert (batch.labels[:, L:] == -100).all() and (batch.weights[:, L:] == 0).all()


def test_exact_count_masker_counts_per_block():
    from dualobj.masking import random_mask

    def exact(tokens, rate, *, maskable, generator=None):
        return random_mask(tokens, rate, exact=True, rounding="round", maskable=maskable, generator=generator)

    bd = BlockDiffusionObjective(MASK, 4, masker=exact, sampler=FixedTime(0.5))
    batch = bd.prepare(torch.randint(2, V, (16, 10)), generator=torch.Generator().manual_seed(0))
    per_block = (batch.input_ids[:, :10] == MASK).long()
    counts = [per_block[:, s:s + 4].sum(1) for s in (0, 4, 8)]
    assert (counts[0] == 2).all() and (counts[1] == 2).all() and (counts[2] == 1).all()  # last block: 2 tokens


def test_masker_must_return_a_block_mask():
    bad = BlockDiffusionObjective(MASK, 2, masker=lambda tokens, rate, *, maskable, generator=None: maskable.long())
    with pytest.raises(DualObjError, match=r"^masker"):
        bad.prepare(torch.randint(2, V, (2, 4)))
    with pytest.raises(DualObjError, match=r"^masker: "):
        BlockDiffusionObjective(MASK, 2, masker="random")
    with pytest.raises(DualObjError, match=r"^t_per: "):
        BlockDiffusionObjective(MASK, 2, t_per="token")
