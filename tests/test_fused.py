"""The fused linear + cross-entropy against the naive full-logits computation.

The reference is plain torch: ``F.linear`` then ``F.cross_entropy(reduction="none")`` times the per-token weights,
with the z-loss from ``torch.logsumexp``, differentiated by autograd. Low-precision inputs are compared with the
reference evaluated in float64 on the same (rounded) values, with a tolerance that the naive low-precision graph
itself needs against that reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dualobj import DualObjError
from dualobj._errors import validation
from dualobj.bench import loss as bench_loss
from dualobj.bench._core import Context
from dualobj.objectives import (
    IGNORE_INDEX,
    ARObjective,
    DualObjective,
    MDObjective,
    cross_entropy,
    linear_cross_entropy,
)
from dualobj.objectives import _fused as fused_module
from dualobj.objectives._fused import default_chunk_size, score_hidden

MASK = 3




def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(N, H, V, *, dtype=torch.float32, ignored=0.3, bias=True, seed=0):
    """Inputs with some ignored rows and weights in [0.1, 2.1) (0 at ignored rows)."""
    g = gen(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_()) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignored] = IGNORE_INDEX
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = ((torch.rand(N, generator=g, dtype=wdtype) * 2 + 0.1) * (y != IGNORE_INDEX)).requires_grad_()
    return h, W, b, y, w


def reference(h, W, b, y, w, z_loss=0.0, reduction="sum", dtype=None):
    """Naive: build the logits, CE per row (0 at ignored rows), weighted, reduced; in ``dtype`` if given."""
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype is not None else (lambda t: t)
    logits = F.linear(cast(h), cast(W), cast(b))
    logits = logits if dtype is not None else logits.float()
    labelled = y != IGNORE_INDEX
    per = F.cross_entropy(logits, y, reduction="none")
    if z_loss:
        per = per + z_loss * torch.logsumexp(logits, -1).square() * labelled
    per = per * (w if w is not None else labelled.to(per.dtype)).to(per.dtype)
    if reduction == "none":
        return per
    total = per.sum()
    return total / labelled.sum().clamp_min(1) if reduction == "mean" else total


def grads(out, tensors, seed=5):
    g = torch.randn(out.shape, generator=gen(seed), dtype=out.dtype) if out.ndim else torch.tensor(1.7)
    present = [t for t in tensors if t is not None]
    got = torch.autograd.grad((out * g.to(out.dtype)).sum(), present)
    return [x.double() for x in got]


def assert_rel(got, want, tol, what=""):
    """Max absolute error within ``tol`` times the reference's largest magnitude (plus a tiny floor)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} (tol {tol})"


@pytest.fixture(params=["selected", "all rows"])
def rows_mode(request, monkeypatch):
    """Both sweeps: the labelled rows gathered first (the CPU default) and every row visited with weight 0 at
    ignored rows (what an accelerator does, to avoid the data-dependent ``nonzero`` and its host sync)."""
    if request.param == "all rows":
        monkeypatch.setattr(fused_module, "SELECT_ROWS_ON", set())
    return request.param


# ------------------------------------------------------------------------------------------- equality, fp32


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_naive_fp32_odd_shapes(reduction, z_loss, bias, rows_mode):
    h, W, b, y, w = make(37, 13, 29, bias=bias)
    out = linear_cross_entropy(h, W, y, w, bias=b, z_loss=z_loss, chunk_size=5, reduction=reduction)
    ref = reference(h, W, b, y, w, z_loss, reduction)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads(out, (h, W, b, w)), grads(ref, (h, W, b, w)), "hWbw"):
        assert_rel(got, want, 1e-5, name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_unweighted_matches_f_cross_entropy(dtype, tol):
    h, W, b, y, _ = make(40, 8, 50, dtype=dtype)
    out = linear_cross_entropy(h, W, y, bias=b, chunk_size=7, reduction="mean")
    ref = F.cross_entropy(F.linear(h, W, b).float(), y)  # mean over non-ignored rows
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for got, want in zip(grads(out, (h, W, b)), grads(ref, (h, W, b))):
        assert_rel(got, want, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_within_dtype_tolerance(dtype, tol):
    h, W, b, y, w = make(45, 24, 67, dtype=dtype)
    out = linear_cross_entropy(h, W, y, w, bias=b, z_loss=1e-3, chunk_size=8)
    assert out.dtype == torch.float32
    exact = reference(h, W, b, y, w, 1e-3, dtype=torch.float64)
    naive = reference(h, W, b, y, w, 1e-3)
    exact_grads = grads(exact, (h, W, b))
    # The naive low-precision graph meets the tolerance, and so must we.
    for ours, theirs, want in zip(grads(out, (h, W, b)), grads(naive, (h, W, b)), exact_grads):
        assert_rel(theirs, want, tol, "naive")
        assert_rel(ours, want, tol, "fused")
        assert ours.dtype == torch.float64  # compared in float64; produced in the input dtype below
    assert torch.autograd.grad(linear_cross_entropy(h, W, y, w), h)[0].dtype == dtype
    torch.testing.assert_close(out.double(), exact, rtol=tol / 10, atol=tol / 10)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(1, 40),
    H=st.integers(1, 9),
    V=st.integers(2, 40),
    chunk=st.integers(1, 50),
    ignored=st.sampled_from([0.0, 0.5, 0.9]),
    z_loss=st.sampled_from([0.0, 0.1]),
    reduction=st.sampled_from(["sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_chunk_equals_naive(N, H, V, chunk, ignored, z_loss, reduction, seed):
    h, W, b, y, w = make(N, H, V, dtype=torch.float64, ignored=ignored, seed=seed)
    out = linear_cross_entropy(h, W, y, w, bias=b, z_loss=z_loss, chunk_size=chunk, reduction=reduction)
    ref = reference(h, W, b, y, w, z_loss, reduction, dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, (h, W, b, w)), grads(ref, (h, W, b, w))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_chunk_size_does_not_change_the_result():
    h, W, b, y, w = make(64, 16, 100)
    outs = [linear_cross_entropy(h, W, y, w, bias=b, chunk_size=c) for c in (1, 3, 64, 1000)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])


@pytest.mark.parametrize("per_row", [False, True])
def test_the_custom_ops_pass_torch_opcheck(per_row):
    """Schema, fake (meta) implementation against the real one, autograd registration, AOT dispatch."""
    h, W, b, y, w = make(7, 4, 9, ignored=0.3, seed=2)
    op = torch.ops.dualobj.fused_linear_ce.default
    torch.library.opcheck(op, (h, W, b, w, y, 0.01, IGNORE_INDEX, 3, True, per_row, [True, True, True, True]))
    torch.library.opcheck(op, (h, W, None, None, y, 0.0, IGNORE_INDEX, 4, False, per_row, [True, False, False, False]))
    backward = torch.ops.dualobj.fused_linear_ce_backward.default
    torch.library.opcheck(backward, (h.detach(), W.detach(), None, w.detach(), y, 0.0, IGNORE_INDEX, 2,
                                     [True, True, False]))


def test_gradcheck_float64(rows_mode):
    h, W, b, y, w = make(7, 3, 5, dtype=torch.float64, ignored=0.3, seed=3)
    for reduction in ("sum", "none"):
        def fn(h, W, b, w, reduction=reduction):
            return linear_cross_entropy(h, W, y, w, bias=b, z_loss=0.05, chunk_size=3, reduction=reduction)

        assert torch.autograd.gradcheck(fn, (h, W, b, w))


# ------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("weighted", [True, False])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction, weighted, rows_mode):
    h, W, b, y, w = make(6, 4, 9, ignored=1.0)
    assert (y == IGNORE_INDEX).all()
    w = w if weighted else None
    z_loss = 0.1 if weighted else 0.0
    out = linear_cross_entropy(h, W, y, w, bias=b, z_loss=z_loss, reduction=reduction)
    assert (out == 0).all()
    for g in grads(out, (h, W, b, w)):
        assert torch.isfinite(g).all() and (g == 0).all()


def test_unlabelled_rows_never_reach_the_output_layer():
    h, W, b, y, w = make(20, 6, 11, ignored=0.5)
    dirty = h.detach().clone()
    dirty[y == IGNORE_INDEX] = float("nan")  # would poison any product that touched these rows
    dirty.requires_grad_()
    with pytest.raises(DualObjError, match=r"^hidden: expected finite values, got 60 NaN/inf of 120"):
        linear_cross_entropy(dirty, W, y, w, bias=b)  # validation (on by default) refuses any NaN
    with validation(False):
        out = linear_cross_entropy(dirty, W, y, w, bias=b)
    torch.testing.assert_close(out, reference(h, W, b, y, w))
    (gh,) = torch.autograd.grad(out, dirty)
    assert (gh[y == IGNORE_INDEX] == 0).all()


def test_custom_ignore_index(rows_mode):
    h, W, b, y, w = make(12, 5, 7, ignored=0.4)
    y2 = torch.where(y == IGNORE_INDEX, torch.full_like(y, -1), y)
    out = linear_cross_entropy(h, W, y2, w, bias=b, ignore_index=-1)
    torch.testing.assert_close(out, reference(h, W, b, y, w))


def test_accuracy_without_logits(rows_mode):
    h, W, b, y, w = make(50, 6, 5, ignored=0.2)
    loss, acc = linear_cross_entropy(h, W, y, w, bias=b, chunk_size=8, return_accuracy=True)
    keep = y != IGNORE_INDEX
    want = (F.linear(h, W, b).argmax(-1) == y)[keep].float().mean()
    torch.testing.assert_close(acc, want)
    assert not acc.requires_grad and 0 < want < 1
    torch.testing.assert_close(loss, reference(h, W, b, y, w))


def test_no_grad_and_frozen_weight():
    h, W, b, y, w = make(10, 4, 6)
    with torch.no_grad():
        out = linear_cross_entropy(h, W, y, w, bias=b)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference(h, W, b, y, w).detach())
    frozen = W.detach()
    out = linear_cross_entropy(h, frozen, y, w.detach())
    (gh,) = torch.autograd.grad(out, h)
    (want,) = torch.autograd.grad(reference(h, frozen, None, y, w.detach()), h)
    torch.testing.assert_close(gh, want)


def test_a_retained_graph_gives_the_same_gradients_twice():
    h, W, _, y, w = make(6, 3, 5)
    out = linear_cross_entropy(h, W, y, w)
    first = torch.autograd.grad(out, (h, W), retain_graph=True)
    second = torch.autograd.grad(out, (h, W))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autocast_runs_the_head_in_the_autocast_dtype():
    h, W, _, y, w = make(16, 8, 12, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, W, y, w)
        ref = reference(h, W, None, y, w)
    torch.testing.assert_close(out, ref)
    got, want = grads(out, (h, W)), grads(ref, (h, W))
    for a, e in zip(got, want):
        assert_rel(a, e, 2e-2)


def test_default_chunk_size():
    assert default_chunk_size(32768) == 1024
    assert default_chunk_size(50304) == 512
    assert default_chunk_size(10) == 1 << 22
    assert default_chunk_size(10**9) == 16


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"hidden": torch.randn(4)}, "hidden"),
        ({"hidden": torch.randint(0, 3, (4, 3))}, "hidden"),
        ({"weight": torch.randn(5, 2)}, "weight"),
        ({"weight": torch.randn(5, 3, dtype=torch.float64)}, "weight"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels"),
        ({"labels": torch.tensor([0, 1, 5, 2])}, "labels"),
        ({"labels": torch.tensor([0, 1, -7, 2])}, "labels"),
        ({"labels": torch.zeros(4)}, "labels"),
        ({"weights": torch.ones(3)}, "weights"),
        ({"bias": torch.zeros(4)}, "bias"),
        ({"z_loss": -1.0}, "z_loss"),
        ({"z_loss": float("nan")}, "z_loss"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"reduction": "avg"}, "reduction"),
        ({"hidden": torch.tensor([[0.0, 1, 2], [0, float("nan"), 0], [1, 1, 1], [2, 2, 2]])}, "hidden"),
        ({"weight": torch.full((5, 3), float("inf"))}, "weight"),
        ({"bias": torch.tensor([0.0, 0, float("-inf"), 0, 0])}, "bias"),
        ({"weights": torch.tensor([1.0, float("nan"), 1, 1])}, "weights"),
        ({"ignore_index": 1.5}, "ignore_index"),
        ({"ignore_index": True}, "ignore_index"),
        ({"z_loss": True}, "z_loss"),
        ({"z_loss": float("inf")}, "z_loss"),
        ({"chunk_size": True}, "chunk_size"),
        ({"return_accuracy": 1}, "return_accuracy"),
    ],
)
def test_bad_input_names_argument_expected_and_received(kwargs, argument):
    args = {"hidden": torch.randn(4, 3), "weight": torch.randn(5, 3), "labels": torch.tensor([0, 1, 4, -100])}
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(DualObjError, match=rf"^{argument}: expected .+, got .+"):
        linear_cross_entropy(hidden, weight, labels, **args)


def test_non_finite_values_pass_with_validation_off():
    h, W, _, y, w = make(6, 3, 5)
    bad = W.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DualObjError, match=r"^weight: expected finite values, got 1 NaN/inf of 15"):
        linear_cross_entropy(h, bad, y, w)
    with validation(False):  # the value checks are off: the NaN reaches the result, as it would on a GPU run
        assert linear_cross_entropy(h, bad, y, w).isnan()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"z_loss": float("nan")}, r"^z_loss: expected a finite number >= 0, got nan"),
        ({"z_loss": -0.5}, r"^z_loss: expected a number >= 0, got -0.5"),
        ({"z_loss": "0.1"}, r"^z_loss: expected a number >= 0, got '0.1'"),
        ({"logits": float("inf")}, r"^logits: expected finite values, got 1 NaN/inf of 160"),
        ({"weights": float("nan")}, r"^batch.weights: expected finite values, got 1 NaN/inf of 20"),
        ({"labels": 8}, r"^labels: expected values in \[0, 8\) or -100, got 8"),
    ],
)
def test_cross_entropy_refuses_bad_values(change, match):
    logits = torch.randn(4, 5, 8, generator=gen(1))
    batch = ARObjective().prepare(torch.randint(0, 8, (4, 5), generator=gen(0)))
    if "logits" in change:
        logits[1, 2, 3] = change["logits"]
    if "weights" in change:
        batch.weights[0, 0] = change["weights"]
    if "labels" in change:
        batch.labels[2, 1] = change["labels"]
    with pytest.raises(DualObjError, match=match):
        cross_entropy(logits, batch, z_loss=change.get("z_loss", 0.0))
    if "logits" in change or "weights" in change:  # value checks only: with validation off the NaN goes through
        with validation(False):
            assert not cross_entropy(logits, batch).loss.isfinite()


# ------------------------------------------------------------------------------------------- objectives


def batches():
    x = torch.randint(4, 40, (4, 11), generator=gen(7))
    md = MDObjective(MASK, num_special=4)
    yield "ar", ARObjective(z_loss=1e-3), x
    yield "md", MDObjective(MASK, num_special=4, z_loss=1e-3), x
    yield "dual", DualObjective(0.5, md=md, normalize="positions", z_loss=1e-3), x


@pytest.mark.parametrize("name,objective,x", list(batches()), ids=["ar", "md", "dual"])
def test_objective_loss_with_head_equals_cross_entropy_on_logits(name, objective, x, rows_mode):
    batch = objective.prepare(x, generator=gen(1))
    hidden = torch.randn(*x.shape, 16, generator=gen(2), requires_grad=True)
    head = torch.nn.Linear(16, 40)
    fused = objective.loss(hidden, batch, head=head, chunk_size=6)
    naive = cross_entropy(head(hidden), batch, z_loss=objective.z_loss, normalize=objective.normalize)
    for field in ("loss", "total", "count"):
        torch.testing.assert_close(getattr(fused, field), getattr(naive, field))
    assert fused.metrics.keys() == naive.metrics.keys() and "z_loss" in fused.metrics
    for key in naive.metrics:
        torch.testing.assert_close(fused.metrics[key], naive.metrics[key], msg=key)
    params = (hidden, head.weight, head.bias)
    for got, want in zip(torch.autograd.grad(fused.loss, params), torch.autograd.grad(naive.loss, params)):
        assert_rel(got, want, 1e-5)


def test_score_hidden_checks_its_arguments():
    x = torch.randint(4, 20, (2, 5), generator=gen(0))
    batch = ARObjective().prepare(x)
    with pytest.raises(DualObjError, match=r"^hidden: expected"):
        score_hidden(torch.randn(2, 4, 8), torch.randn(20, 8), batch)
    with pytest.raises(DualObjError, match=r"^head: expected"):
        score_hidden(torch.randn(2, 5, 8), torch.randn(20, 7), batch)
    with pytest.raises(DualObjError, match=r"^labels: expected"):
        score_hidden(torch.randn(2, 5, 8), torch.randn(10, 8), batch)  # labels up to 19 > V = 10
    with pytest.raises(DualObjError, match=r"^normalize: expected"):
        score_hidden(torch.randn(2, 5, 8), torch.randn(20, 8), batch, normalize="tokens")


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(30, 8), torch.nn.Linear(8, 30)
    objective = DualObjective(0.5, md=MDObjective(MASK, num_special=4))
    batch = objective.prepare(torch.randint(4, 30, (4, 9), generator=gen(3)), generator=gen(4))

    def step(input_ids):
        out = objective.loss(torch.tanh(emb(input_ids)), batch, head=head, chunk_size=8)
        out.loss.backward()
        return out.loss.detach(), out.metrics["accuracy"]

    eager = step(batch.input_ids)
    eager_grads = [p.grad.clone() for p in (emb.weight, head.weight, head.bias)]
    for p in (emb.weight, head.weight, head.bias):
        p.grad = None
    compiled = torch.compile(step, backend="aot_eager")(batch.input_ids)
    torch.testing.assert_close(compiled, eager)
    for p, want in zip((emb.weight, head.weight, head.bias), eager_grads):
        torch.testing.assert_close(p.grad, want)


# ------------------------------------------------------------------------------------------- bench suite


def test_bench_suite_quick_cases_agree():
    cases = bench_loss.cases(Context(quick=True))
    assert [c.name.split(" ")[0] for c in cases] == ["weighted", "MD", "unweighted"]
    for case in cases:
        outputs = {i.name: i.make()() for i in case.impls if i.available is None}
        assert case.check(outputs) is None, case.name
        assert sum(i.ours for i in case.impls) == 1
    # The check does catch a disagreement.
    broken = dict(outputs)
    loss, gh, gw = broken["naive"]
    broken["naive"] = (loss, gh, gw * 1.01)
    assert "grad of weight" in cases[-1].check(broken)
