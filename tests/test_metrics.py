"""dualobj.metrics: classes equal the functions and plain-torch references (multi-process sync is in
test_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

import dualobj
from dualobj import DualObjError, DualObjTypeError, validation
from dualobj.metrics import (
    ARPerplexity,
    NLLPerToken,
    TokenAccuracy,
    ar_perplexity,
    md_elbo_bound,
    token_accuracy,
)
from dualobj.objectives import ARObjective, MDObjective, cross_entropy

V = 11


def data(seed: int, B: int = 3, L: int = 7, ignore: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * 2
    target = torch.randint(0, V, (B, L), generator=g)
    target[torch.rand(B, L, generator=g) < ignore] = -100
    return logits, target


def loop_nll_and_hits(logits: torch.Tensor, target: torch.Tensor, shift: bool) -> tuple[float, int, int]:
    """Brute force over every row and position: summed NLL, hits, scored targets."""
    nll, hits, n = 0.0, 0, 0
    B, L, _ = logits.shape
    for b in range(B):
        for i in range(L - 1 if shift else L):
            y = int(target[b, i + 1 if shift else i])
            if y == -100:
                continue
            row = logits[b, i].double()
            nll -= float(row[y] - torch.logsumexp(row, 0))
            hits += int(int(row.argmax()) == y)
            n += 1
    return nll, hits, n


@pytest.mark.parametrize("shift", [True, False])
def test_perplexity_and_accuracy_match_brute_force_and_functional(shift):
    metric_ppl, metric_acc = ARPerplexity(shift=shift), TokenAccuracy(shift=shift)
    nll, hits, n = 0.0, 0, 0
    for seed in range(3):
        logits, target = data(seed, B=seed + 1)
        metric_ppl.update(logits, target)
        metric_acc.update(logits, target)
        a, h, c = loop_nll_and_hits(logits, target, shift)
        nll, hits, n = nll + a, hits + h, n + c
        one_ppl = math.exp(a / c)
        assert float(ar_perplexity(logits, target, shift=shift)) == pytest.approx(one_ppl, rel=1e-5)
        assert float(token_accuracy(logits, target, shift=shift)) == pytest.approx(h / c, abs=1e-7)
    assert float(metric_ppl.compute()) == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert float(metric_acc.compute()) == pytest.approx(hits / n, abs=1e-7)


def test_perplexity_equals_torchmetrics_on_shifted_targets_and_our_ar_loss():
    logits, tokens = data(4, ignore=0.0)
    reference = Perplexity(ignore_index=-100)
    reference.update(logits[:, :-1], tokens[:, 1:])
    assert float(ar_perplexity(logits, tokens)) == pytest.approx(float(reference.compute()), rel=1e-5)
    batch = ARObjective().prepare(tokens)  # aligned labels: shift=False gives the same number
    expected = float(reference.compute())
    assert float(ar_perplexity(logits, batch.labels, shift=False)) == pytest.approx(expected, rel=1e-5)
    assert float(ar_perplexity(logits, tokens)) == pytest.approx(math.exp(float(cross_entropy(logits, batch).loss)),
                                                                 rel=1e-5)


def test_accuracy_equals_torchmetrics_micro_accuracy():
    logits, target = data(5)
    reference = MulticlassAccuracy(num_classes=V, average="micro", ignore_index=-100)
    reference.update(logits.reshape(-1, V), target.reshape(-1))
    assert float(token_accuracy(logits, target, shift=False)) == pytest.approx(float(reference.compute()), abs=1e-6)


def test_custom_ignore_index_and_low_precision_logits():
    logits, target = data(6, ignore=0.0)
    pad = 0
    target[:, -2:] = pad
    expected = torch.exp(F.cross_entropy(logits[:, :-1].reshape(-1, V), target[:, 1:].reshape(-1), ignore_index=pad))
    assert float(ar_perplexity(logits, target, ignore_index=pad)) == pytest.approx(float(expected), rel=1e-5)
    half = ar_perplexity(logits.bfloat16(), target, ignore_index=pad)
    assert half.dtype == torch.float32
    reference = torch.exp(F.cross_entropy(logits.bfloat16().float()[:, :-1].reshape(-1, V), target[:, 1:].reshape(-1),
                                          ignore_index=pad))
    assert float(half) == pytest.approx(float(reference), rel=1e-5)


def test_md_elbo_bound_matches_a_loop_over_masked_positions():
    md = MDObjective(0, num_special=2)
    tokens = torch.randint(2, V, (4, 9), generator=torch.Generator().manual_seed(7))
    metric, ppl = NLLPerToken(), NLLPerToken(perplexity=True)
    num, den = 0.0, 0.0
    for seed in range(3):
        batch = md.prepare(tokens, generator=torch.Generator().manual_seed(seed))
        logits = torch.randn(4, 9, V, generator=torch.Generator().manual_seed(10 + seed))
        out = cross_entropy(logits, batch)
        metric.update(out)
        ppl.update(out.total, out.count)
        # brute force: Σ over masked positions of (1/t_b)·CE, over the maskable (valid) positions
        part = 0.0
        for b in range(4):
            for i in range(9):
                y = int(batch.labels[b, i])
                if y != -100:
                    part -= float(torch.log_softmax(logits[b, i].double(), 0)[y]) / float(batch.t[b])
        n_valid = float(batch.valid_mask().sum())
        assert float(md_elbo_bound(out)) == pytest.approx(part / n_valid, rel=1e-5)
        num, den = num + part, den + n_valid
    assert float(metric.compute()) == pytest.approx(num / den, rel=1e-5)
    assert float(ppl.compute()) == pytest.approx(math.exp(num / den), rel=1e-5)


def test_nll_per_token_takes_plain_numbers():
    metric = NLLPerToken(perplexity=True)
    metric.update(12.0, 4)
    metric.update(torch.tensor(3.0), torch.tensor(2))
    assert float(metric.compute()) == pytest.approx(math.exp(15.0 / 6.0), rel=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_accumulating_chunks_equals_one_update_on_the_concatenation(seed, sizes):
    chunks = [data(seed + k, B=s) for k, s in enumerate(sizes)]
    whole_logits = torch.cat([c[0] for c in chunks])
    whole_target = torch.cat([c[1] for c in chunks])
    for cls, fn in ((ARPerplexity, ar_perplexity), (TokenAccuracy, token_accuracy)):
        metric = cls()
        for logits, target in chunks:
            metric.update(logits, target)
        expected = fn(whole_logits, whole_target)
        got = metric.compute()
        assert torch.allclose(got, expected, rtol=1e-5, equal_nan=True)


def test_nothing_counted_is_nan_and_reset_clears():
    logits = torch.randn(2, 3, V)
    target = torch.full((2, 3), -100)
    assert math.isnan(float(ar_perplexity(logits, target)))
    assert math.isnan(float(token_accuracy(logits, target)))
    assert math.isnan(float(md_elbo_bound(torch.tensor(0.0), torch.tensor(0.0))))
    metric = ARPerplexity()
    metric.update(*data(1))
    metric.reset()
    metric.update(logits, target)
    assert math.isnan(float(metric.compute()))


def test_perplexity_is_differentiable():
    logits, target = data(2)
    logits.requires_grad_(True)
    ar_perplexity(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ar_perplexity(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long)), "logits"),
        (lambda: ar_perplexity(torch.randn(2, 3, V), torch.zeros(2, 4, dtype=torch.long)), r"target: expected shape"),
        (lambda: ar_perplexity(torch.randn(2, 3, V), torch.zeros(2, 3)), "target: expected an integer"),
        (lambda: token_accuracy(torch.randn(2, 3, V), torch.full((2, 3), V)), r"target: expected ids in \[0, 11\)"),
        (lambda: md_elbo_bound(torch.tensor([1.0, 2.0]), torch.tensor(1.0)), "total: expected a scalar"),
        (lambda: md_elbo_bound(torch.tensor(1.0)), "count: expected"),
        (lambda: md_elbo_bound(torch.tensor(1.0), torch.ones(2)), "count: expected a scalar"),
        (lambda: NLLPerToken().update(cross_entropy(torch.zeros(1, 2, V), ARObjective().prepare(torch.ones(1, 2,
                                      dtype=torch.long))), 3.0), "count: expected None"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(DualObjError, match=match):
        call()


@pytest.mark.parametrize(
    ("make", "bad", "name", "value_check"),
    [
        (ARPerplexity, lambda: (torch.full((1, 3, V), float("nan")), torch.ones(1, 3, dtype=torch.long)), "logits",
         True),
        (TokenAccuracy, lambda: (torch.full((1, 3, V), float("inf")), torch.ones(1, 3, dtype=torch.long)), "logits",
         True),
        (ARPerplexity, lambda: (torch.zeros(1, 3, V), torch.tensor([[1, -5, 2]])), "target", False),
        (NLLPerToken, lambda: (torch.tensor(float("nan")), torch.tensor(2.0)), "total", True),
        (NLLPerToken, lambda: (torch.tensor(2.0), torch.tensor(float("inf"))), "count", True),
        (NLLPerToken, lambda: (1.0, torch.tensor(-3.0)), "count", True),
        (NLLPerToken, lambda: (float("inf"), 2), "total", False),  # Python numbers: checked always
        (NLLPerToken, lambda: (1.0, float("nan")), "count", False),
        (NLLPerToken, lambda: (1.0, -1), "count", False),
    ],
)
def test_a_refused_update_leaves_the_state_untouched(make, bad, name, value_check):
    """A metric refuses a non-finite (or out-of-range) update instead of absorbing it, and goes on as before."""
    metric = make()
    good = (torch.tensor(6.0), torch.tensor(2.0)) if make is NLLPerToken else data(0)
    metric.update(*good)
    before = float(metric.compute())
    with pytest.raises(DualObjError, match=f"^{name}: expected"):
        metric.update(*bad())
    assert float(metric.compute()) == pytest.approx(before, rel=1e-7)
    with validation(False):
        if value_check:  # a tensor value check: off with the switch, the same update is absorbed
            metric.update(*bad())
            assert not float(metric.compute()) == pytest.approx(before, rel=1e-7)
        elif name != "target":  # a Python number is checked whatever the switch
            with pytest.raises(DualObjError, match=f"^{name}: expected"):
                metric.update(*bad())


@pytest.mark.parametrize("count", ["3", None, [1, 2], True, torch.tensor(1 + 1j), torch.tensor(True)])
def test_non_numeric_count_is_a_type_error(count):
    with pytest.raises(DualObjTypeError, match=r"^count: expected"):
        NLLPerToken().update(torch.tensor(1.0), count)


def test_md_elbo_bound_metric_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="NLLPerToken"):
        metric = dualobj.metrics.MDELBOBound(perplexity=True)
    assert isinstance(metric, NLLPerToken)
    metric.update(4.0, 2)
    assert float(metric.compute()) == pytest.approx(math.exp(2.0))
