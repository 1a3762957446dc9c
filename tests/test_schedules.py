"""Noise schedules, time samplers and step schedules, checked against closed forms and brute force."""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualobj._errors import DualObjError
from dualobj.masking import random_mask
from dualobj.objectives import DualObjective, MDObjective, cross_entropy
from dualobj.schedules import (
    CosineSchedule,
    GeometricSchedule,
    KumaraswamySampler,
    LinearSchedule,
    LogSchedule,
    NoiseSchedule,
    PolynomialSchedule,
    StratifiedSampler,
    TimeSampler,
    UniformSampler,
    constant,
    cosine_ramp,
    join,
    linear_ramp,
    repetition_alpha,
    repetition_rule,
    sample_counts,
    schedule_from_alpha,
    warmup,
)

# ---------------------------------------------------------------------------------------------------------------
# Closed forms

PI = math.pi
# (schedule, α(t) written independently with the math module, w(t) at t = 0.1, 0.5, 0.9 from the reference table)
TABLE = [
    (LinearSchedule(), lambda t: 1 - t, (10.0, 2.0, 1.111)),
    (CosineSchedule("1-sin"), lambda t: 1 - math.sin(PI * t / 2), (9.918, 1.571, 0.249)),
    (CosineSchedule("cos"), lambda t: math.cos(PI * t / 2), (19.959, 3.792, 1.839)),
    (CosineSchedule("cos^2"), lambda t: math.cos(PI * t / 2) ** 2, (19.835, 3.142, 0.498)),
    (PolynomialSchedule(2), lambda t: 1 - t**2, (20.0, 4.0, 2.222)),
    (PolynomialSchedule(0.5), lambda t: 1 - t**0.5, (5.0, 1.0, 0.5556)),
    (LogSchedule(), lambda t: 1 - math.log2(1 + t), (9.538, 1.644, 0.820)),
    (
        GeometricSchedule(1e-4, 20.0),
        lambda t: math.exp(-(1e-4 ** (1 - t)) * 20.0**t),
        (12.204, 11.935, 0.198),
    ),
]
IDS = [repr(s) for s, _, _ in TABLE]
SCHEDULES = [s for s, _, _ in TABLE]
# Schedules with α(0) = 1 and α(1) = 0 exactly.
EXACT_ENDS = [s for s in SCHEDULES if not isinstance(s, GeometricSchedule)]


@pytest.mark.parametrize(("schedule", "alpha", "weights"), TABLE, ids=IDS)
def test_weight_table_and_alpha_match_the_closed_forms(schedule, alpha, weights):
    assert isinstance(schedule, NoiseSchedule)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(schedule.weight(t), torch.tensor(weights, dtype=torch.float64), rtol=1e-3, atol=1e-3)
    want = torch.tensor([alpha(x) for x in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha(t), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.mask_rate(t), 1 - want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_closed_form_derivative_and_weight_agree_with_autograd(schedule):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(schedule.alpha(t).sum(), t)
    t = t.detach()
    torch.testing.assert_close(schedule.dalpha(t), grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(schedule.weight(t), -grad / (1 - schedule.alpha(t)), rtol=1e-8, atol=1e-12)
    derived = schedule_from_alpha(schedule.alpha)
    torch.testing.assert_close(derived.weight(t), schedule.weight(t), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(derived.t_at_rate(schedule.mask_rate(t)), t, rtol=0, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(t=st.floats(1e-4, 1.0), power=st.floats(0.2, 5.0), index=st.integers(0, len(SCHEDULES) - 1))
def test_t_at_rate_inverts_mask_rate(t, power, index):
    x = torch.tensor([t], dtype=torch.float64)
    for schedule in (SCHEDULES[index], PolynomialSchedule(power)):
        torch.testing.assert_close(schedule.t_at_rate(schedule.mask_rate(x)), x, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_ends_monotone_and_finite_weights(schedule):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a = schedule.alpha(t)
    assert bool((a[1:] < a[:-1]).all()), "alpha must decrease"
    assert bool(((a >= 0) & (a <= 1)).all())
    if schedule in EXACT_ENDS:
        assert a[0].item() == pytest.approx(1.0, abs=1e-15) and a[-1].item() == pytest.approx(0.0, abs=1e-15)
    for dtype in (torch.float32, torch.float64):
        w = schedule.weight(t.to(dtype))
        assert w.dtype == dtype and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    # The eps policy: weight(0) = weight(eps).
    torch.testing.assert_close(schedule.weight(torch.zeros(1)), schedule.weight(torch.full((1,), schedule.eps)))
    assert schedule.weight(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_float32_stays_accurate_near_both_ends(schedule):
    """Naive 1 − α(t) in float32 loses all digits near t = 0 (cosine forms); the stable forms do not."""
    t64 = torch.cat([torch.logspace(-6, -1, 30, dtype=torch.float64), 1 - torch.logspace(-6, -1, 30).double()])
    t32 = t64.float()
    ref = t32.double()  # the same points, so only the arithmetic differs
    for name in ("mask_rate", "weight", "alpha", "dalpha"):
        got, want = getattr(schedule, name)(t32).double(), getattr(schedule, name)(ref)
        if isinstance(schedule, GeometricSchedule) and name == "alpha":
            want = want.clamp_min(torch.finfo(torch.float32).tiny)  # e^{-20} is a float32 subnormal
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-30, msg=f"{name} of {schedule!r}")


# ---------------------------------------------------------------------------------------------------------------
# Schedule invariance of the ELBO, against brute force over every mask of a tiny sequence

L, V, MASK = 6, 5, 0


class TinyDenoiser(torch.nn.Module):
    """A fixed random network over the whole (partly masked) sequence; it never sees t."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.nn.Parameter(torch.randn(V, 4, generator=g))
        self.mix = torch.nn.Parameter(torch.randn(L * 4, L * V, generator=g) / 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.emb[ids].flatten(1) @ self.mix).view(-1, L, V)


DENOISER = TinyDenoiser().requires_grad_(False)
SEQ = torch.tensor([3, 1, 4, 1, 2, 4])  # ids 1..4; 0 is <mask>


def masked_ce_by_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """Every one of the 2^L masks ``[2^L, L]`` and the summed CE over its masked positions ``[2^L]``."""
    masks = torch.tensor(list(itertools.product([False, True], repeat=L)))
    ids = torch.where(masks, MASK, SEQ)
    logp = DENOISER(ids).log_softmax(-1).double()
    ce = -logp.gather(-1, SEQ.expand(len(masks), L)[..., None])[..., 0]
    return masks, (ce * masks).sum(1)


def exact_nelbo() -> float:
    """Σ_k (1/k)·E_{|M|=k}[Σ_{i∈M} CE_i], by enumeration."""
    masks, total = masked_ce_by_subset()
    k = masks.sum(1)
    return sum(total[k == j].mean().item() / j for j in range(1, L + 1))


def ce_given_rate(lam: torch.Tensor) -> torch.Tensor:
    """E[Σ_masked CE | each token masked independently with probability λ] ``[N]``, exactly."""
    masks, total = masked_ce_by_subset()
    k = masks.sum(1).double()
    prob = lam[:, None] ** k * (1 - lam[:, None]) ** (L - k)
    return prob @ total


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_continuous_elbo_is_schedule_invariant_by_quadrature(schedule):
    """∫ w(t)·E[Σ CE | λ(t)] dt equals the finite-length NELBO for every schedule (substitute λ = 1 − α)."""
    nodes, weights = np.polynomial.legendre.leggauss(200)
    s = torch.tensor((nodes + 1) / 2)
    t = s**4  # t = s⁴ smooths the t^{-1/2} behaviour of polynomial powers < 1 at 0
    jac = 4 * s**3 * torch.tensor(weights) / 2
    schedule = dataclasses.replace(schedule, eps=1e-300)  # no clamping: quadrature nodes reach t ~ 1e-18
    value = (jac * schedule.weight(t) * ce_given_rate(schedule.mask_rate(t))).sum().item()
    tol = 2e-4 if isinstance(schedule, GeometricSchedule) else 1e-6  # α(0) = e^{-σ_min} is not exactly 1
    assert value == pytest.approx(exact_nelbo(), rel=tol)


def md_rows(schedule, sampler, n: int, seed: int, t_min: float = 1e-4) -> torch.Tensor:
    """Per-row Monte-Carlo NELBO estimates ``[n]`` through MDObjective and the library's cross-entropy."""
    md = MDObjective(MASK, schedule=schedule, sampler=sampler, shift=False, exact=False, num_special=1, t_min=t_min)
    batch = md.prepare(SEQ.expand(n, L).clone(), generator=torch.Generator().manual_seed(seed))
    logits = DENOISER(batch.input_ids)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=-100, reduction="none")
    rows = (batch.weights * ce).sum(1).double()
    total = cross_entropy(logits, batch, normalize="none").total
    torch.testing.assert_close(total.double(), rows.sum(), rtol=1e-4, atol=1e-3)
    return rows


@pytest.mark.parametrize(
    ("schedule", "sampler"),
    [
        (LinearSchedule(), UniformSampler()),
        (LinearSchedule(), StratifiedSampler()),
        (CosineSchedule("1-sin"), StratifiedSampler()),
        (CosineSchedule("cos"), StratifiedSampler()),
        (CosineSchedule("cos^2"), UniformSampler()),
        (PolynomialSchedule(2), StratifiedSampler()),
        (LogSchedule(), StratifiedSampler(shared=True)),
        (GeometricSchedule(), StratifiedSampler()),
    ],
    ids=lambda x: repr(x),
)
def test_monte_carlo_elbo_through_md_objective_matches_brute_force(schedule, sampler):
    rows = md_rows(schedule, sampler, 40_000, seed=7)
    exact = exact_nelbo()
    se = rows.std().item() / math.sqrt(len(rows))
    assert abs(rows.mean().item() - exact) < 4.5 * se + 2e-3 * exact, (rows.mean().item(), exact, se)
    assert 4.5 * se < 0.05 * exact  # the check has power: a wrong weight moves the mean by far more


def test_monte_carlo_with_a_mismatched_weight_is_detected():
    """Negative control: masking with the 'cos' schedule but weighting with 1/t gives a different number."""

    class Mismatched(CosineSchedule):
        def _weight(self, t):
            return 1.0 / t

    rows = md_rows(Mismatched("cos"), StratifiedSampler(), 40_000, seed=7)
    se = rows.std().item() / math.sqrt(len(rows))
    assert abs(rows.mean().item() - exact_nelbo()) > 10 * se


def test_exact_count_estimator_is_unbiased():
    """k ~ U{1..n}, exactly k masked, weight n/k: the mean is the finite-length NELBO."""
    n_rows = 30_000
    n = torch.full((n_rows,), L)
    sample = sample_counts(n, stratified=True, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    mask = random_mask((n_rows, L), sample.rate, exact=True, rounding="round", generator=g)
    assert torch.equal(mask.sum(1), sample.count)
    _, total = masked_ce_by_subset()
    code = (mask.long() * (2 ** torch.arange(L - 1, -1, -1))).sum(1)  # index of each row's mask in `masks`
    rows = sample.weight.double() * total[code]
    se = rows.std().item() / math.sqrt(n_rows)
    assert abs(rows.mean().item() - exact_nelbo()) < 4.5 * se


# ---------------------------------------------------------------------------------------------------------------
# Time samplers


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 700),
    t_min=st.floats(0.0, 0.5),
    width=st.floats(1e-2, 0.5),
    shared=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_stratified_puts_exactly_one_draw_in_each_stratum(n, t_min, width, shared, seed):
    t_max = min(1.0, t_min + width)
    sample = StratifiedSampler(t_min, t_max, shared=shared)(n, generator=torch.Generator().manual_seed(seed))
    assert sample.t.shape == (n,) and sample.t.dtype == torch.float32
    edges = t_min + (t_max - t_min) * torch.arange(n + 1, dtype=torch.float64) / n
    stratum = torch.bucketize(sample.t.double(), edges, right=True) - 1
    assert torch.equal(torch.sort(stratum).values, torch.arange(n))
    assert torch.equal(sample.weight, torch.ones(n))


def test_stratified_marginal_is_uniform_and_reduces_variance():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([StratifiedSampler(0.0, 1.0)(8, generator=g).t for _ in range(4000)])  # [4000, 8]
    # Each row's marginal: uniform on its stratum, so the pooled draws are uniform on [0, 1).
    pooled = draws.flatten().sort().values.double()
    ks = (pooled - torch.arange(1, len(pooled) + 1) / len(pooled)).abs().max().item()
    assert ks < 1.63 / math.sqrt(len(pooled))  # 1% Kolmogorov-Smirnov critical value
    # Batch mean of g(t) = t²: stratified variance is far below the iid variance (1/n)·Var_U(t²) = (4/45)/8.
    var_iid = 4 / 45 / 8
    assert (draws.double() ** 2).mean(1).var().item() < var_iid / 20


@pytest.mark.parametrize("sampler", [UniformSampler(0.2, 0.7), StratifiedSampler(0.2, 0.7), KumaraswamySampler(2, 3)])
def test_samplers_are_seeded_ranged_and_protocol_conform(sampler):
    assert isinstance(sampler, TimeSampler)
    a = sampler(64, device="cpu", generator=torch.Generator().manual_seed(5))
    b = sampler(64, device="cpu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.t, b.t) and torch.equal(a.weight, b.weight)
    assert a.t.shape == a.weight.shape == (64,) and a.t.dtype == a.weight.dtype == torch.float32
    assert bool(((a.t >= sampler.t_min) & (a.t <= sampler.t_max)).all())
    assert sampler(0).t.shape == (0,)
    assert pickle.loads(pickle.dumps(sampler)) == sampler


@pytest.mark.parametrize(("a", "b", "t_min", "t_max"), [(2.0, 2.0, 1e-3, 1.0), (0.5, 1.5, 0.05, 0.9), (3.0, 1.0, 0, 1)])
def test_importance_sampler_is_unbiased(a, b, t_min, t_max):
    sample = KumaraswamySampler(a, b, t_min, t_max)(400_000, generator=torch.Generator().manual_seed(11))
    t, w = sample.t.double(), sample.weight.double()

    def g(x):
        return torch.exp(-3 * x) + x**2

    def antiderivative(x):
        return -math.exp(-3 * x) / 3 + x**3 / 3

    want = (antiderivative(t_max) - antiderivative(t_min)) / (t_max - t_min)
    for values, target in ((w * g(t), want), (w, 1.0)):
        se = values.std().item() / math.sqrt(len(values))
        assert abs(values.mean().item() - target) < 4.5 * se
    # The draws follow the truncated Kumaraswamy: compare the empirical CDF with the closed form.
    sampler = KumaraswamySampler(a, b, t_min, t_max)
    f = sampler.cdf(t.sort().values)
    f_lo, f_hi = sampler.cdf(torch.tensor([float(t_min), float(t_max)], dtype=torch.float64))
    expected = (f - f_lo) / (f_hi - f_lo)
    ks = (expected - torch.arange(1, len(t) + 1) / len(t)).abs().max().item()
    assert ks < 1.63 / math.sqrt(len(t))


def test_importance_sampler_with_a_equal_b_equal_one_is_uniform():
    sample = KumaraswamySampler(1.0, 1.0, 0.1, 0.6)(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample.weight, torch.ones(1000))


def test_importance_weights_reach_the_md_batch():
    sampler = KumaraswamySampler(2.0, 2.0)
    md = MDObjective(MASK, schedule=CosineSchedule("cos"), sampler=sampler, num_special=1, shift=False, exact=False)
    batch = md.prepare(SEQ.expand(16, L).clone(), generator=torch.Generator().manual_seed(0))
    sample = sampler(16, generator=torch.Generator().manual_seed(0))
    # Bernoulli estimator: t on [T(t_min), 1] (truncation on the mask rate), weight (1 − T(t_min))·w(t)·importance.
    t_lo = CosineSchedule("cos").t_at_rate(torch.tensor(1e-3, dtype=torch.float64))
    t = t_lo + (1 - t_lo) * sample.t.double()
    row = ((1 - t_lo) * CosineSchedule("cos").weight(t) * sample.weight.double()).float()
    masked = batch.input_ids == MASK
    torch.testing.assert_close(batch.weights, torch.where(masked, row[:, None], 0.0))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_sample_counts_stratified_covers_every_count_once(n, seed):
    s = sample_counts(torch.full((n,), n), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(s.count.sort().values, torch.arange(1, n + 1))
    torch.testing.assert_close(s.weight, n / s.count.float())
    torch.testing.assert_close(s.rate, s.count.float() / n)


def test_sample_counts_marginal_is_uniform_and_empty_rows_are_zero():
    n = torch.tensor([0, 1, 5, 7])
    for stratified in (True, False):
        g = torch.Generator().manual_seed(2)
        counts = torch.stack([sample_counts(n, stratified=stratified, generator=g).count for _ in range(7000)])
        assert bool((counts[:, 0] == 0).all()) and bool((counts[:, 1] == 1).all())
        for col, size in ((2, 5), (3, 7)):
            freq = torch.bincount(counts[:, col], minlength=size + 1)[1:].double() / len(counts)
            assert freq.sum().item() == 1.0
            assert (freq - 1 / size).abs().max().item() < 4 * math.sqrt((1 / size) / len(counts))
    s = sample_counts(n, generator=torch.Generator().manual_seed(0))
    assert s.weight[0].item() == 0 and s.rate[0].item() == 0


# ---------------------------------------------------------------------------------------------------------------
# Step schedules (objective weight α, mask rates)


@settings(max_examples=80, deadline=None)
@given(
    start=st.floats(0, 1),
    end=st.floats(0, 1),
    steps=st.integers(1, 1000),
    begin=st.integers(0, 100),
    step=st.integers(0, 2000),
)
def test_linear_and_cosine_match_interpolation(start, end, steps, begin, step):
    want = float(np.interp(step, [begin, begin + steps], [start, end]))
    assert linear_ramp(start, end, steps, begin=begin)(step) == pytest.approx(want, abs=1e-12)
    p = min(max((step - begin) / steps, 0), 1)
    assert cosine_ramp(start, end, steps, begin=begin)(step) == pytest.approx(
        end + (start - end) * (1 + math.cos(PI * p)) / 2, abs=1e-12
    )
    assert 0 <= linear_ramp(start, end, steps, begin=begin)(step) <= 1


def test_step_schedules_values_and_join_like_optax():
    assert constant(0.25)(0) == constant(0.25)(10**9) == 0.25
    w = warmup(0.5, 100, start=1.0)
    assert (w(0), w(50), w(100), w(10**6)) == (1.0, 0.75, 0.5, 0.5)
    c = cosine_ramp(1.0, 0.0, 10)
    assert (c(0), c(5), c(10)) == (1.0, pytest.approx(0.5), pytest.approx(0.0))
    parts = [constant(1.0), linear_ramp(1.0, 0.5, steps=10), cosine_ramp(0.5, 0.25, steps=4)]
    s = join(parts, [100, 200])

    def brute(step):  # each piece sees the steps since its boundary
        if step < 100:
            return parts[0](step)
        if step < 200:
            return parts[1](step - 100)
        return parts[2](step - 200)

    for step in [0, 99, 100, 105, 110, 199, 200, 202, 10_000]:
        assert s(step) == brute(step)


def test_step_schedules_are_pure_and_picklable():
    s = join([warmup(0.9, 50, start=1.0), cosine_ramp(0.9, 0.2, 300)], [50])
    forward = [s(i) for i in range(400)]
    resumed = [s(i) for i in range(399, -1, -1)][::-1]  # any order, any restart: same numbers
    assert forward == resumed
    clone = pickle.loads(pickle.dumps(s))
    assert clone == s and [clone(i) for i in range(400)] == forward
    assert repr(linear_ramp(0.3, 0.15, 10)) == "linear_ramp(0.3, 0.15, steps=10, begin=0)"


def test_repetition_rule_follows_the_paper():
    for r in (1, 2, 4, 8, 16):
        assert repetition_rule(r)(0) == 63 / 64
    assert repetition_rule(32)(123) == 0.5 and repetition_rule(64)(0) == 0.25 and repetition_rule(128)(0) == 1 / 8
    for r in (32, 64, 128, 256):
        assert repetition_alpha(r) * r == pytest.approx(16)
    assert repetition_alpha(128, effective_repetitions=8) == 1 / 16
    assert repetition_alpha(2, cap=0.5) == 0.5


def test_step_schedule_drives_the_dual_objective():
    md = MDObjective(MASK, num_special=1)
    dual = DualObjective(join([constant(1.0), repetition_rule(64)], [10]), md=md)
    assert dual.alpha_at(3) == 1.0 and dual.alpha_at(10) == 0.25


def test_mask_rate_schedule_feeds_random_mask():
    rate = linear_ramp(0.30, 0.15, steps=1000)
    for step, want in ((0, 30), (500, 22), (1000, 15)):  # 100 tokens: round(rate·100) masked
        mask = random_mask((4, 100), rate(step), rounding="floor", generator=torch.Generator().manual_seed(0))
        assert mask.sum(1).tolist() == [math.floor(rate(step) * 100)] * 4 == [want] * 4


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("bad", [-0.1, 1.1, math.nan])
def test_time_outside_unit_interval_is_rejected(schedule, bad):
    for method in ("alpha", "mask_rate", "weight", "dalpha"):
        with pytest.raises(DualObjError, match=r"t: expected values in \[0, 1\]"):
            getattr(schedule, method)(torch.tensor([0.5, bad]))
    with pytest.raises(DualObjError, match=r"rate: expected values in \[0, 1\]"):
        schedule.t_at_rate(torch.tensor([bad]))
    with pytest.raises(DualObjError, match="t: expected a floating-point tensor"):
        schedule.weight(torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: PolynomialSchedule(0), "power: expected a finite number > 0, got 0"),
        (lambda: PolynomialSchedule(-2.0), "power: expected a finite number > 0"),
        (lambda: PolynomialSchedule(math.inf), "power"),
        (lambda: GeometricSchedule(1.0, 1.0), r"\(sigma_min, sigma_max\): expected sigma_min < sigma_max, got \(1.0"),
        (lambda: GeometricSchedule(5.0, 1.0), "sigma_min < sigma_max"),
        (lambda: GeometricSchedule(0.0, 1.0), "sigma_min: expected a finite number > 0"),
        (lambda: CosineSchedule("cosine"), "form: expected one of '1-sin', 'cos', 'cos\\^2', got 'cosine'"),
        (lambda: LinearSchedule(eps=0), r"eps: expected a number in \(0, 1\)"),
        (lambda: schedule_from_alpha(3.0), "alpha_fn: expected a callable"),
        (lambda: schedule_from_alpha(lambda t: 2 - t).weight(torch.tensor([0.5])), r"alpha_fn\(t\): expected values"),
        (lambda: UniformSampler(0.5, 0.2), r"\(t_min, t_max\): expected 0 <= t_min < t_max <= 1, got \(0.5, 0.2\)"),
        (lambda: StratifiedSampler(-0.1, 1.0), r"\(t_min, t_max\)"),
        (lambda: StratifiedSampler()(-1), "n: expected an int >= 0, got -1"),
        (lambda: UniformSampler()(2.5), "n: expected an int >= 0"),
        (lambda: KumaraswamySampler(0, 1), "a: expected a number > 0, got 0"),
        (lambda: KumaraswamySampler(1, -1), "b: expected a number > 0"),
        (lambda: sample_counts(torch.tensor([3, -1])), "n: expected counts >= 0, got min -1"),
        (lambda: sample_counts(torch.tensor([3.0])), "n: expected an integer tensor"),
        (lambda: sample_counts(torch.tensor([[3]])), "n: expected a 1-D tensor"),
        (lambda: constant(1.5), r"value: expected a number in \[0, 1\], got 1.5"),
        (lambda: constant(-0.01), "value: expected a number in"),
        (lambda: linear_ramp(-0.1, 0.5, 10), r"start: expected a number in \[0, 1\]"),
        (lambda: cosine_ramp(0.5, 2.0, 10), "end: expected"),
        (lambda: warmup(1.2, 10), "end: expected"),
        (lambda: linear_ramp(0.1, 0.5, 0), "steps: expected an int >= 1, got 0"),
        (
            lambda: join([constant(1.0), lambda step: 2.0], [5])(7),
            r"schedules\[1\]\(2\): expected a number in \[0, 1\], got 2.0",
        ),
        (lambda: join([constant(1.0), constant(0.5)], []), "boundaries: expected 1 boundaries for 2 schedules"),
        (lambda: join([constant(1.0)] * 3, [5, 5]), "boundaries: expected strictly increasing ints"),
        (lambda: join([], []), "schedules: expected at least one schedule"),
        (lambda: join([0.5], []), r"schedules\[0\]: expected a callable"),
        (lambda: constant(0.5)(-1), "step: expected a finite number >= 0, got -1"),
        (lambda: linear_ramp(0.1, 0.5, 10)("3"), "step: expected"),
        (lambda: repetition_rule(0), "repetitions: expected a finite number > 0, got 0"),
        (lambda: repetition_rule(8, effective_repetitions=-1), "effective_repetitions"),
        (lambda: repetition_rule(8, cap=1.5), r"cap: expected a number in \[0, 1\]"),
    ],
)
def test_bad_arguments_raise_with_the_argument_expected_and_received(build, pattern):
    with pytest.raises(DualObjError, match=pattern):
        build()


def test_schedule_from_alpha_refuses_an_increasing_alpha():
    # α(t) = t rises: w(t) = −α'(t)/(1 − α(t)) = −1/(1 − t) would be negative everywhere.
    with pytest.raises(DualObjError, match=r"alpha_fn: expected a non-increasing α\(t\)"):
        schedule_from_alpha(lambda t: t)
    # a rise on (0.4, 0.5) only, values staying in [0, 1], is caught too
    with pytest.raises(DualObjError, match="non-increasing"):
        schedule_from_alpha(lambda t: torch.where((t > 0.4) & (t < 0.5), 0.6 + (t - 0.4), 1 - t))
    # a flat stretch is allowed (weight 0 there), and a decreasing α gives weights >= 0
    flat = schedule_from_alpha(lambda t: (1 - 2 * t).clamp(0, 1))
    assert (flat.weight(torch.tensor([0.25, 0.75])) >= 0).all()


def test_step_ramps_are_not_noise_schedules():
    # the two families have distinct names and kinds of argument: a step (int) versus a time tensor
    import dualobj.schedules as S

    assert not hasattr(S, "linear") and not hasattr(S, "cosine") and not hasattr(S, "AlphaSchedule")
    assert isinstance(LinearSchedule(), S.NoiseScheduleBase) and not isinstance(linear_ramp(0, 1, 2), NoiseSchedule)
    assert linear_ramp(0.0, 1.0, 4)(2) == 0.5
