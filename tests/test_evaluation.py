"""Evaluation estimators against brute force on tiny cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dualobj import DualObjError
from dualobj.data import Corpus, Document
from dualobj.evaluation import (
    Question,
    ar_nll,
    choice_accuracy,
    completion_logprobs,
    md_elbo,
    next_line_probe,
    prefix_nll,
    score_choices,
)
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import MDObjective

V = 12  # ids 0..3 special, 4..11 "bytes"




@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=V, dim=16, layers=2, heads=2, max_len=64)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.5)
    return m


def logp(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model.logits(ids, **kw), dim=-1)


def test_a_tied_embedding_head_scores_like_its_weight(model):
    # a tied nn.Embedding as head= reads the same [V, H] weight as passing that weight (no bias)
    tokens = torch.randint(4, V, (2, 7), generator=torch.Generator().manual_seed(2))
    tied = torch.nn.Embedding(V, 16).double()
    with torch.no_grad():
        tied.weight.copy_(model.lm_head.weight)
    got = ar_nll(model, tokens, head=tied)
    want = ar_nll(model, tokens, head=model.lm_head.weight.detach())
    assert got.tokens == want.tokens and got.nats == pytest.approx(want.nats, rel=1e-12)


def test_ar_nll_matches_a_loop(model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, V, (3, 9), generator=g)
    docs = torch.tensor([[0] * 4 + [1] * 5, [2] * 9, [3] * 2 + [4] * 7])
    nll = ar_nll(model, tokens, doc_ids=docs, batch_size=2)
    want, n = 0.0, 0
    for b in range(3):
        lp = logp(model, tokens[b:b + 1], causal=True, doc_ids=docs[b:b + 1])[0]
        for i in range(8):
            if docs[b, i] == docs[b, i + 1]:
                want -= float(lp[i, tokens[b, i + 1]])
                n += 1
    assert nll.tokens == n == 3 * 8 - 2
    assert nll.nats == pytest.approx(want, rel=1e-9)
    assert nll.bits_per_token == pytest.approx(want / n / math.log(2))


@pytest.mark.parametrize("prefix_mode", [True, False])
def test_prefix_nll_matches_a_loop(model, prefix_mode):
    tokens = torch.randint(4, V, (2, 10), generator=torch.Generator().manual_seed(2))
    P = 4
    got = prefix_nll(model, tokens, prefix_length=P, prefix_mode=prefix_mode)
    want = 0.0
    for b in range(2):
        kw = {"prefix_lengths": torch.tensor([P])} if prefix_mode else {}
        lp = logp(model, tokens[b:b + 1], causal=True, **kw)[0]
        want -= sum(float(lp[i, tokens[b, i + 1]]) for i in range(P - 1, 9))
    assert got.tokens == 2 * (10 - P)
    assert got.nats == pytest.approx(want, rel=1e-9)


def test_prefix_mode_changes_the_score(model):
    """With two layers the prefix positions' bidirectional states reach the completion (one layer would not)."""
    tokens = torch.randint(4, V, (2, 10), generator=torch.Generator().manual_seed(3))
    a = prefix_nll(model, tokens, prefix_length=5, prefix_mode=True)
    b = prefix_nll(model, tokens, prefix_length=5, prefix_mode=False)
    assert a.tokens == b.tokens and a.nats != pytest.approx(b.nats)


def exact_nelbo(model, row: torch.Tensor, md: MDObjective) -> float:
    """Σ_k (1/k) E_{|M|=k}[Σ_{i∈M} CE_i] by enumerating every subset of the maskable positions."""
    maskable = md.eligible(row[None])[0]
    pos = maskable.nonzero().squeeze(1).tolist()
    n = len(pos)
    total = 0.0
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(pos, k))
        acc = 0.0
        for M in subsets:
            x = row.clone()
            x[list(M)] = md.mask_token_id
            lp = logp(model, x[None], causal=False)[0]
            acc -= sum(float(lp[i - 1, row[i]]) for i in M)  # shifted read-out: position i-1 predicts i
        total += acc / len(subsets) / k
    return total


@pytest.mark.parametrize("estimator", ["antithetic", "exact"])
def test_md_elbo_is_unbiased_for_the_exact_bound(model, estimator):
    md = MDObjective(3, num_special=4)
    row = torch.tensor([1, 5, 9, 6, 11, 4])  # BOS then 5 maskable bytes (the first byte has a predecessor)
    exact = exact_nelbo(model, row, md)
    reps = 4000
    tokens = row.expand(reps, -1).clone()
    est = md_elbo(model, tokens, md=md, samples=2, estimator=estimator, seed=0, batch_size=reps)
    assert est.tokens == reps * 5
    # The spread of independent 500-row estimates bounds the standard error of the 4000-row, 2-sample one.
    means = [md_elbo(model, tokens[:500], md=md, samples=1, estimator=estimator, seed=s, batch_size=500).nats
             / 500 for s in range(1, 9)]
    se = torch.tensor(means).std().item() / math.sqrt(8)
    mean = est.nats / reps
    assert abs(mean - exact) < 4 * se
    assert mean == pytest.approx(exact, rel=0.02)


def test_md_elbo_is_seeded_and_bounds_the_ar_nll_scale(model):
    md = MDObjective(3, num_special=4)
    tokens = torch.randint(4, V, (8, 12), generator=torch.Generator().manual_seed(5))
    a = md_elbo(model, tokens, md=md, seed=3)
    b = md_elbo(model, tokens, md=md, seed=3)
    c = md_elbo(model, tokens, md=md, seed=4)
    assert a == b and a.nats != c.nats
    assert a.tokens == ar_nll(model, tokens).tokens  # the same positions are scored in both modes


def test_completion_logprobs_in_each_mode_match_loops(model):
    ctx = [[5, 6, 7], [8]]
    comp = [[9, 10], [4, 5, 6]]
    got = {mode: completion_logprobs(model, ctx, comp, mode=mode, batch_size=3)[0] for mode in ("ar", "prefix", "md")}
    for n in range(2):
        seq = torch.tensor([[1, *ctx[n], *comp[n]]])
        P = 1 + len(ctx[n])
        ar = logp(model, seq, causal=True)[0]
        pre = logp(model, seq, causal=True, prefix_lengths=torch.tensor([P]))[0]
        want_ar = sum(float(ar[P - 1 + j, c]) for j, c in enumerate(comp[n]))
        want_pre = sum(float(pre[P - 1 + j, c]) for j, c in enumerate(comp[n]))
        want_md = 0.0
        for j, c in enumerate(comp[n]):
            x = seq.clone()
            x[0, P + j] = 3
            want_md += float(logp(model, x, causal=False)[0, P + j - 1, c])
        assert got["ar"][n] == pytest.approx(want_ar, rel=1e-6)  # summed in float32
        assert got["prefix"][n] == pytest.approx(want_pre, rel=1e-6)
        assert got["md"][n] == pytest.approx(want_md, rel=1e-6)
    _, lengths = completion_logprobs(model, ctx, comp)
    assert lengths.tolist() == [2, 3]


def test_padding_does_not_change_scores(model):
    ctx, comp = [[5, 6, 7, 8, 9, 10]], [[4, 4]]
    for mode in ("ar", "prefix", "md"):
        alone = completion_logprobs(model, ctx, comp, mode=mode)[0]
        padded = completion_logprobs(model, [*ctx, [5]], [*comp, [6]], mode=mode)[0]
        assert alone[0] == pytest.approx(float(padded[0]), rel=1e-6)


def test_score_choices_and_accuracy():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=260, dim=16, layers=1, heads=2, max_len=16)).eval()
    qs = [Question(b"ab", (b"c", b"dd"), 1), Question(b"x", (b"yy", b"z"), 0)]
    scores = score_choices(model, qs, mode="ar", normalize=False)
    lp, _ = completion_logprobs(model, [b"ab", b"ab", b"x", b"x"], [b"c", b"dd", b"yy", b"z"])
    torch.testing.assert_close(scores.flatten(), lp)
    mean = score_choices(model, qs, mode="ar")
    torch.testing.assert_close(mean.flatten(), lp / torch.tensor([1, 2, 2, 1]))
    assert choice_accuracy(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), qs) == 1.0
    assert choice_accuracy(torch.tensor([[1.0, 0.0], [2.0, 1.0]]), qs) == 0.5


def probe_corpus() -> Corpus:
    docs = []
    for d in range(4):
        lines = [f"doc{d} line number {i} with text\n" for i in range(40)]
        docs.append(Document(f"f{d}.py", "".join(lines).encode()))
    return Corpus(tuple(docs), "test")


def test_next_line_probe_is_deterministic_and_correct():
    corpus = probe_corpus()
    qs = next_line_probe(corpus, questions=20, options=3, context_bytes=40, max_line=40, seed=1)
    assert qs == next_line_probe(corpus, questions=20, options=3, context_bytes=40, max_line=40, seed=1)
    assert len(qs) == 20
    answers = set()
    for q in qs:
        assert len(q.options) == 3 and len(q.context) == 40
        true = q.options[q.answer]
        doc = next(d for d in corpus.documents if q.context + true in d.text)
        prefix = true.split(b" ")[0]
        assert all(not o.startswith(prefix) for i, o in enumerate(q.options) if i != q.answer)
        assert doc.text.index(q.context + true) >= 0
        answers.add(q.answer)
    assert answers == {0, 1, 2}


def test_bad_inputs(model):
    tokens = torch.randint(4, V, (2, 6))
    md = MDObjective(3, num_special=4)
    with pytest.raises(DualObjError, match="prefix_length"):
        prefix_nll(model, tokens, prefix_length=6)
    with pytest.raises(DualObjError, match="samples"):
        md_elbo(model, tokens, md=md, samples=0)
    with pytest.raises(DualObjError, match="estimator"):
        md_elbo(model, tokens, md=md, estimator="stratified")
    with pytest.raises(DualObjError, match="md"):
        md_elbo(model, tokens, md="mask")
    with pytest.raises(DualObjError, match="mode"):
        completion_logprobs(model, [[5]], [[6]], mode="bidirectional")
    with pytest.raises(DualObjError, match="completions"):
        completion_logprobs(model, [[5]], [[]])
    with pytest.raises(DualObjError, match="tokens"):
        ar_nll(model, torch.zeros(6, dtype=torch.long))
    with pytest.raises(DualObjError, match="batch_size"):
        ar_nll(model, tokens, batch_size=0)
    with pytest.raises(DualObjError, match="two documents"):
        next_line_probe(Corpus((Document("a", b"x" * 100 + b"\nline of text\n"),), "one"), questions=1)
    with pytest.raises(DualObjError, match="options"):
        score_choices(model, [Question(b"a", (b"b", b"c"), 0), Question(b"a", (b"b",), 0)])
