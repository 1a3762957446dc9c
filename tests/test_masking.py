"""dualobj.masking against brute-force references, closed forms and statistical bounds."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualobj._errors import DualObjError
from dualobj.masking import (
    GeometricSpans,
    SpanLengths,
    T5Spans,
    UniformSpans,
    corrupt,
    inverse_cdf,
    maskable_positions,
    random_mask,
    span_mask,
)
from dualobj.masking._select import EXCLUDED, random_keys, smallest_k

FAST = settings(max_examples=40, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi2_upper(df: int) -> float:
    """A loose upper quantile of chi-square(df) (about p = 1e-4): mean + 6 standard deviations."""
    return df + 6 * math.sqrt(2 * df)


def runs(row: list[bool]) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of True."""
    out, start = [], None
    for i, v in enumerate([*row, False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


@st.composite
def batches(draw, max_b: int = 6, max_l: int = 40):
    """A ``[B, L]`` maskable pattern (random, padded rows of different lengths, or all True) and per-row rates."""
    B = draw(st.integers(1, max_b))
    L = draw(st.integers(1, max_l))
    seed = draw(st.integers(0, 2**31 - 1))
    g = gen(seed)
    kind = draw(st.sampled_from(["random", "padded", "all"]))
    if kind == "random":
        allowed = torch.rand(B, L, generator=g) < draw(st.floats(0.0, 1.0))
    elif kind == "padded":
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        allowed = torch.arange(L)[None, :] < lengths[:, None]
    else:
        allowed = torch.ones(B, L, dtype=torch.bool)
    rates = torch.rand(B, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        rates[0] = draw(st.sampled_from([0.0, 1.0]))
    return allowed, rates, seed


# ----------------------------------------------------------------------------------------------- selection core


@FAST
@given(batches(), st.sampled_from([0, 1, 3, 4097, 1 << 24]), st.data())
def test_smallest_k_matches_a_stable_sort(case, distinct, data):
    allowed, _, seed = case
    B, L = allowed.shape
    g = gen(seed)
    keys = random_keys((B, L), generator=g, device="cpu")
    if distinct < 1 << 24:  # few distinct keys (some one digit apart): ties must go leftmost first
        keys = torch.randint(0, max(distinct, 1), (B, L), generator=g) * ((1 << 24) // max(distinct, 1))
    keys = keys.masked_fill(~allowed, EXCLUDED)
    k = torch.tensor(data.draw(st.lists(st.integers(0, L + 2), min_size=B, max_size=B)))
    got = smallest_k(keys.clone(), k)
    for b in range(B):
        order = sorted((int(keys[b, i]), i) for i in range(L) if allowed[b, i])
        want = torch.zeros(L, dtype=torch.bool)
        for _, i in order[: int(k[b])]:
            want[i] = True
        assert torch.equal(got[b], want)


def test_smallest_k_finds_thresholds_in_every_digit():
    # One row per threshold position: the k-th smallest key sits in the first, a middle and the last bucket of
    # both digits, so both two-level searches are exercised at their edges.
    thresholds = [0, 1, 63, 64, 4095, 4096, (1 << 24) - 1, 0x7FF03F, 0x800FC0]
    L = 50
    keys = torch.full((len(thresholds), L), (1 << 24) - 1, dtype=torch.long)
    for row, t in enumerate(thresholds):  # ten keys just below t, then t, then keys >= t
        keys[row, :10] = max(t - 1, 0)
        keys[row, 10] = t
    k = torch.full((len(thresholds),), 11)
    got = smallest_k(keys.clone(), k)
    for row in range(len(thresholds)):
        order = sorted((int(keys[row, i]), i) for i in range(L))
        want = torch.zeros(L, dtype=torch.bool)
        want[[i for _, i in order[:11]]] = True
        assert torch.equal(got[row], want), thresholds[row]


# ----------------------------------------------------------------------------------------------- random_mask


def expected_count(rate: float, n: int, rounding: str, min_count: int) -> int:
    x = rate * n
    k = {"floor": math.floor(x), "ceil": math.ceil(x), "round": round(x)}[rounding]
    return min(max(k, min_count), n)


@FAST
@given(batches(), st.sampled_from(["floor", "ceil", "round", "stochastic"]), st.integers(0, 3))
def test_random_mask_exact_counts_inside_maskable(case, rounding, min_count):
    allowed, rates, seed = case
    mask = random_mask(allowed.shape, rates, maskable=allowed, rounding=rounding, min_count=min_count,
                       generator=gen(seed))
    assert mask.dtype == torch.bool and mask.shape == allowed.shape
    assert not (mask & ~allowed).any()
    n = allowed.sum(1).tolist()
    for b, count in enumerate(mask.sum(1).tolist()):
        if rounding == "stochastic":
            x = float(rates[b]) * n[b]
            lo = min(max(math.floor(x), min_count), n[b])
            hi = min(max(math.ceil(x), min_count), n[b])
            assert lo <= count <= hi
        else:
            assert count == expected_count(float(rates[b]), n[b], rounding, min_count)


@FAST
@given(batches())
def test_rate_zero_masks_nothing_and_rate_one_masks_every_maskable_position(case):
    allowed, _, seed = case
    for exact in (True, False):
        assert not random_mask(allowed.shape, 0.0, exact=exact, maskable=allowed, generator=gen(seed)).any()
        assert torch.equal(random_mask(allowed.shape, 1.0, exact=exact, maskable=allowed, generator=gen(seed)),
                           allowed)
    for lengths in (UniformSpans(3), GeometricSpans(0.3, 5)):
        assert not span_mask(allowed.shape, 0.0, lengths=lengths, maskable=allowed, generator=gen(seed)).any()
        full = span_mask(allowed.shape, 1.0, lengths=lengths, maskable=allowed, generator=gen(seed))
        assert torch.equal(full, allowed)


def test_stochastic_rounding_is_unbiased_and_min_count_applies():
    B, L = 4000, 10
    mask = random_mask((B, L), 0.23, generator=gen(0))
    counts = mask.sum(1).double()
    assert set(counts.unique().tolist()) <= {2.0, 3.0}
    # count = 2 + Bernoulli(0.3): mean within 5 standard errors
    assert abs(counts.mean().item() - 2.3) < 5 * math.sqrt(0.21 / B)
    small = random_mask((50, 10), 0.01, min_count=1, generator=gen(1))
    assert (small.sum(1) == 1).all()


def test_exact_mask_is_a_uniform_subset():
    """L = 5, k = 2: each of the 10 subsets equally likely (chi-square), over 20 000 rows in one call."""
    B = 20_000
    mask = random_mask((B, 5), 0.4, rounding="round", generator=gen(3))
    codes = (mask.long() * (2 ** torch.arange(5))).sum(1)
    subsets = [sum(2**i for i in c) for c in itertools.combinations(range(5), 2)]
    counts = torch.stack([(codes == s).sum() for s in subsets]).double()
    assert counts.sum() == B
    chi2 = ((counts - B / 10) ** 2 / (B / 10)).sum().item()
    assert chi2 < chi2_upper(9)


def test_exact_mask_marginals_with_unmaskable_positions():
    B, L = 8000, 12
    allowed = torch.ones(B, L, dtype=torch.bool)
    allowed[:, [0, 5, 11]] = False
    mask = random_mask((B, L), 1 / 3, maskable=allowed, rounding="round", generator=gen(4))  # k = 3 of 9
    freq = mask.double().mean(0)
    assert (freq[[0, 5, 11]] == 0).all()
    inside = freq[allowed[0]]
    assert (inside - 1 / 3).abs().max().item() < 6 * math.sqrt((1 / 3) * (2 / 3) / B)


def test_bernoulli_counts_are_binomial():
    B, L, p = 3000, 64, 0.15
    allowed = torch.ones(B, L, dtype=torch.bool)
    allowed[:, :4] = False
    counts = random_mask((B, L), p, exact=False, maskable=allowed, generator=gen(5)).sum(1).double()
    n = L - 4
    assert abs(counts.mean().item() - n * p) < 5 * math.sqrt(n * p * (1 - p) / B)
    assert abs(counts.var().item() / (n * p * (1 - p)) - 1) < 0.15


def test_tensor_input_uses_its_shape_and_per_row_rates():
    tokens = torch.randint(0, 100, (3, 50), generator=gen(6))
    mask = random_mask(tokens, torch.tensor([0.0, 0.5, 1.0]), rounding="round", generator=gen(7))
    assert mask.sum(1).tolist() == [0, 25, 50]
    assert torch.equal(random_mask(tokens, torch.tensor(0.2), generator=gen(8)),
                       random_mask(tokens, 0.2, generator=gen(8)))


# ----------------------------------------------------------------------------------------------- seeding


MASKERS = {
    "exact": lambda shape, g: random_mask(shape, 0.3, generator=g),
    "bernoulli": lambda shape, g: random_mask(shape, 0.3, exact=False, generator=g),
    "uniform spans": lambda shape, g: span_mask(shape, 0.3, generator=g),
    "geometric spans": lambda shape, g: span_mask(shape, 0.3, lengths="geometric", generator=g),
    "t5": lambda shape, g: span_mask(shape, 0.3, lengths=T5Spans(random_roll=True), generator=g),
    "corrupt": lambda shape, g: corrupt(torch.full(shape, 50), torch.ones(shape, dtype=torch.bool),
                                        mask_token_id=1, random_p=0.4, keep_p=0.3, vocab_range=(10, 1000),
                                        generator=g),
}


@pytest.mark.parametrize("name", list(MASKERS))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), noise=st.integers(0, 2**31 - 1))
def test_same_seed_same_mask_whatever_the_global_rng(name, seed, noise):
    fn = MASKERS[name]
    torch.manual_seed(noise)
    first = fn((4, 64), gen(seed))
    torch.manual_seed(noise + 1)
    torch.rand(17)
    second = fn((4, 64), gen(seed))
    assert torch.equal(first, second)
    assert not torch.equal(first, fn((4, 64), gen(seed + 1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_generator_gives_the_same_mask_on_cuda():
    tokens = torch.randint(0, 100, (4, 256), generator=gen(0))
    for fn in (lambda t, g: random_mask(t, 0.3, generator=g), lambda t, g: span_mask(t, 0.3, generator=g),
               lambda t, g: span_mask(t, 0.3, lengths="t5", generator=g)):
        assert torch.equal(fn(tokens, gen(1)), fn(tokens.cuda(), gen(1)).cpu())


# ----------------------------------------------------------------------------------------------- maskable_positions


@FAST
@given(st.integers(1, 5), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_maskable_positions_matches_a_loop(B, L, seed):
    g = gen(seed)
    tokens = torch.randint(0, 12, (B, L), generator=g)
    prompt = torch.randint(0, L + 1, (B,), generator=g)
    got = maskable_positions(tokens, special_ids=[7, 9], num_special=3, pad_id=11, prompt_lengths=prompt)
    for b in range(B):
        for i in range(L):
            t = int(tokens[b, i])
            assert bool(got[b, i]) == (t not in (7, 9) and t >= 3 and t != 11 and i >= int(prompt[b]))
    assert maskable_positions(tokens).all()


# ----------------------------------------------------------------------------------------------- tiled spans


def pmf_mean(lengths: SpanLengths) -> float:
    pmf = lengths.pmf()
    return float((pmf * torch.arange(1, len(pmf) + 1)).sum())


def test_span_length_distributions_closed_forms():
    assert torch.allclose(UniformSpans(3).pmf(), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert pmf_mean(UniformSpans(3)) == pytest.approx(2.0)
    # SpanBERT: geometric(0.2) truncated to [1, 10] and renormalised; Megatron clips instead.
    assert pmf_mean(GeometricSpans(0.2, 10)) == pytest.approx(3.80, abs=0.005)
    assert pmf_mean(GeometricSpans(0.2, 10, renormalize=False)) == pytest.approx(4.46, abs=0.005)
    for lengths in (GeometricSpans(0.2, 10), GeometricSpans(0.2, 10, renormalize=False)):
        assert lengths.pmf().sum().item() == pytest.approx(1.0)
        assert isinstance(lengths, SpanLengths)


@pytest.mark.parametrize("lengths", [UniformSpans(1), UniformSpans(3), GeometricSpans(0.2, 10), GeometricSpans(0.7, 3),
                                     GeometricSpans(0.2, 10, renormalize=False)])
def test_closed_form_lengths_equal_the_generic_inverse_cdf(lengths):
    u = torch.rand(200_000, generator=gen(30))
    u[:3] = torch.tensor([0.0, 0.5, 1.0 - 2**-24])
    assert torch.equal(lengths.lengths(u), inverse_cdf(lengths.pmf(), u))


def test_a_user_defined_span_length_distribution():
    class TwoOrFive:
        max_length = 5
        rounding = "round"

        def pmf(self):
            return torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5], dtype=torch.float64)

        def lengths(self, u):
            return inverse_cdf(self.pmf(), u)

    assert isinstance(TwoOrFive(), SpanLengths)
    mask, ids = span_mask((30, 100), 1.0, lengths=TwoOrFive(), return_spans=True, generator=gen(31))
    for row in tiles(ids, mask):
        assert {length for _, length in row[:-1]} <= {2, 5}
    assert (span_mask((30, 100), 0.25, lengths=TwoOrFive(), generator=gen(32)).sum(1) == 25).all()


def tiles(ids: torch.Tensor, mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, (id, length) of each masked span, from the ids."""
    out = []
    for row_ids, row_mask in zip(ids.tolist(), mask.tolist()):
        counts: dict[int, int] = {}
        for i, m in zip(row_ids, row_mask):
            assert (i >= 0) == m
            if m:
                counts[i] = counts.get(i, 0) + 1
        out.append(sorted(counts.items()))
    return out


@FAST
@given(batches(max_l=60), st.sampled_from([UniformSpans(1), UniformSpans(3), GeometricSpans(0.3, 6),
                                           GeometricSpans(0.5, 4, renormalize=False)]))
def test_tiled_spans_exact_count_inside_maskable_runs(case, lengths):
    allowed, rates, seed = case
    mask, ids = span_mask(allowed.shape, rates, lengths=lengths, maskable=allowed, return_spans=True,
                          generator=gen(seed))
    assert not (mask & ~allowed).any()
    n = allowed.sum(1)
    for b in range(allowed.shape[0]):
        x = float(rates[b]) * int(n[b])
        assert math.floor(x) <= int(mask[b].sum()) <= math.ceil(x)
    for row_ids, row_mask in zip(ids, mask):
        positions = {}
        for i, (s, m) in enumerate(zip(row_ids.tolist(), row_mask.tolist())):
            if m:
                positions.setdefault(s, []).append(i)
        for pos in positions.values():  # a span is contiguous and no longer than the support allows
            assert pos == list(range(pos[0], pos[0] + len(pos)))
            assert len(pos) <= lengths.max_length


def test_tiled_spans_are_whole_except_one_cut_span_per_row():
    B, L = 200, 300
    mask, ids = span_mask((B, L), 0.2, lengths=UniformSpans(3), return_spans=True, generator=gen(9))
    _, all_ids = span_mask((B, L), 1.0, lengths=UniformSpans(3), return_spans=True, generator=gen(9))
    # rate 1 takes every span, so all_ids is the tiling; with the same seed the tiling is the same draw.
    for row_tiles, row_all in zip(tiles(ids, mask), tiles(all_ids, torch.ones(B, L, dtype=torch.bool))):
        full = dict(row_all)
        partial = [i for i, length in row_tiles if length != full[i]]
        assert len(partial) <= 1


@pytest.mark.parametrize("lengths", [UniformSpans(3), GeometricSpans(0.2, 10),
                                     GeometricSpans(0.2, 10, renormalize=False)])
def test_drawn_span_lengths_follow_the_declared_distribution(lengths):
    B, L = 400, 256
    mask, ids = span_mask((B, L), 1.0, lengths=lengths, return_spans=True, generator=gen(10))
    observed = torch.zeros(lengths.max_length, dtype=torch.float64)
    for row in tiles(ids, mask):
        for _, length in row[:-1]:  # the last span is cut by the row end
            assert 1 <= length <= lengths.max_length
            observed[length - 1] += 1
    total = observed.sum()
    expected = lengths.pmf() * total
    keep = expected > 0
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < chi2_upper(int(keep.sum()) - 1)
    sizes = torch.arange(1, lengths.max_length + 1, dtype=torch.float64)
    mean, var = pmf_mean(lengths), float((lengths.pmf() * sizes**2).sum()) - pmf_mean(lengths) ** 2
    assert abs((observed * sizes).sum().item() / total.item() - mean) < 5 * math.sqrt(var / total.item())


def test_spans_restart_at_unmaskable_positions():
    allowed = torch.ones(50, 40, dtype=torch.bool)
    allowed[:, [0, 7, 8, 20]] = False
    mask, ids = span_mask(allowed.shape, 0.6, lengths=UniformSpans(4), maskable=allowed, return_spans=True,
                          generator=gen(11))
    assert not (mask & ~allowed).any()
    for row in ids.tolist():
        for left, right in ((6, 9), (19, 21)):
            if row[left] >= 0 and row[right] >= 0:
                assert row[left] != row[right]


def custom_lengths(probs: list[float], lengths=None, rounding: str = "stochastic"):
    """A user-defined SpanLengths with the pmf ``probs``; ``lengths(u)`` defaults to its inverse CDF."""
    table = torch.tensor(probs, dtype=torch.float64)
    draw = (lambda u: inverse_cdf(table, u)) if lengths is None else lengths

    class Custom:
        max_length = len(probs)

        def pmf(self):
            return table.clone()

        def lengths(self, u):
            return draw(u)

    Custom.rounding = rounding
    return Custom()


def test_rows_are_tiled_to_the_end_even_when_the_pmf_understates_the_span_count():
    """On the host span_mask first draws about L / mean lengths; lengths shorter than the pmf promises must still
    tile every row (the rest of the draws is taken), so rate 1 masks everything and ids count every position."""
    claims_three_draws_one = custom_lengths([0.0, 0.0, 1.0], lambda u: torch.ones_like(u, dtype=torch.long), "floor")
    mask, ids = span_mask((4, 90), 1.0, lengths=claims_three_draws_one, return_spans=True, generator=gen(13))
    assert mask.all()
    assert torch.equal(ids, torch.arange(90).expand(4, 90))
    assert (span_mask((4, 90), 0.5, lengths=claims_three_draws_one, generator=gen(14)).sum(1) == 45).all()


@pytest.mark.parametrize("bad", [lambda u: u * 3, lambda u: torch.zeros_like(u, dtype=torch.long),
                                 lambda u: torch.ones(u.shape[0], dtype=torch.long)], ids=["float", "zero", "shape"])
def test_span_lengths_that_are_not_positive_integers_are_rejected(bad):
    with pytest.raises(DualObjError, match="lengths"):
        span_mask((2, 16), 0.5, lengths=custom_lengths([0.5, 0.25, 0.25], bad), generator=gen(15))


def test_pieces_of_a_span_around_unmaskable_positions_go_together():
    three = custom_lengths([0.0, 0.0, 1.0])  # every span has length 3, so the tiling is known: [0, 3), [3, 6), ...
    B, L = 300, 60
    allowed = torch.ones(B, L, dtype=torch.bool)
    allowed[:, 1::3] = False  # the middle of every span: each span is two pieces
    mask, ids = span_mask(allowed.shape, 0.3, lengths=three, maskable=allowed, return_spans=True,
                          generator=gen(12))
    assert not (mask & ~allowed).any()
    left, right = mask[:, 0::3], mask[:, 2::3]
    assert not (right & ~left).any()  # a right piece is never taken without its left piece
    assert ((left & ~right).sum(1) <= 1).all()  # only the cut span is taken in part
    assert (left & right).any()
    both = left & right
    assert (ids[:, 0::3][both] != ids[:, 2::3][both]).all()  # but the pieces have their own ids


# ----------------------------------------------------------------------------------------------- T5 spans


def t5_counts(n: int, rate: float, mu: float) -> tuple[int, int]:
    noise = min(max(round(n * rate), 1), n - 1) if n > 0 else 0  # T5: at least one noise token
    spans = min(max(round(noise / mu), 1), n - noise) if noise > 0 else 0
    return noise, spans


@FAST
@given(st.integers(1, 6), st.integers(2, 80), st.floats(0.01, 0.99), st.sampled_from([1.0, 2.5, 3.0, 8.0]),
       st.integers(0, 2**31 - 1))
def test_t5_noise_and_span_counts(B, L, rate, mu, seed):
    mask, ids = span_mask((B, L), rate, lengths=T5Spans(mu), return_spans=True, generator=gen(seed))
    noise, spans = t5_counts(L, rate, mu)
    for row, row_ids in zip(mask.tolist(), ids.tolist()):
        found = runs(row)
        assert sum(row) == noise
        assert len(found) == spans  # runs never touch
        if noise:
            assert not row[0] and row[-1]
        assert sorted({i for i in row_ids if i >= 0}) == list(range(spans))


@FAST
@given(st.integers(1, 5), st.integers(2, 80), st.floats(0.0, 1.0), st.integers(0, 6),
       st.sampled_from(["floor", "round", "ceil"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_t5_noise_counts_hold_whatever_the_rate_form_rounding_and_min_count(B, L, rate, min_count, rounding,
                                                                          as_tensor, seed):
    # The noise composition is only as wide as a bound computed from the rate and min_count: every count must fit.
    given_rate = torch.full((B,), rate, dtype=torch.float64) if as_tensor else rate
    mask = span_mask((B, L), given_rate, lengths=T5Spans(2.0), rounding=rounding, min_count=min_count,
                     generator=gen(seed))
    x = rate * L
    k = {"floor": math.floor(x), "ceil": math.ceil(x), "round": round(x)}[rounding]
    assert (mask.sum(1) == min(max(k, min_count, 1), L - 1)).all()  # T5 forces at least one noise token


def test_t5_counts_at_2048_and_the_more_spans_than_gaps_guard():
    mask = span_mask((8, 2048), 0.15, lengths="t5", generator=gen(12))
    assert (mask.sum(1) == 307).all()
    assert all(len(runs(r)) == 102 for r in mask.tolist())
    # μ = 1 and r = 0.55 asks for more spans than non-noise tokens (transformers #22246): capped, no crash.
    mask = span_mask((4, 20), 0.55, lengths=T5Spans(1.0), generator=gen(13))
    assert (mask.sum(1) == 11).all()
    assert all(len(runs(r)) == 9 for r in mask.tolist())


def test_t5_span_lengths_are_a_uniform_composition():
    """n noise tokens in k spans: P(len = j) = C(n-j-1, k-2) / C(n-1, k-1)."""
    B, L = 3000, 40
    mask = span_mask((B, L), 0.25, lengths=T5Spans(2.5), generator=gen(14))
    noise, spans = t5_counts(L, 0.25, 2.5)  # 10 noise tokens, 4 spans
    observed = torch.zeros(noise, dtype=torch.float64)
    for row in mask.tolist():
        for _, length in runs(row):
            observed[length - 1] += 1
    probs = torch.tensor([math.comb(max(noise - j - 1, 0), spans - 2) / math.comb(noise - 1, spans - 1)
                          if j <= noise - spans + 1 else 0.0 for j in range(1, noise + 1)], dtype=torch.float64)
    assert probs.sum().item() == pytest.approx(1.0)
    expected = probs * observed.sum()
    keep = expected > 5
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < chi2_upper(int(keep.sum()))


def test_t5_over_padded_rows_and_roll():
    lengths = torch.tensor([40, 25, 10, 1, 0])
    allowed = torch.arange(40)[None, :] < lengths[:, None]
    for roll in (False, True):
        mask = span_mask(allowed.shape, 0.3, lengths=T5Spans(3.0, random_roll=roll), maskable=allowed,
                         generator=gen(15))
        assert not (mask & ~allowed).any()
        for b, n in enumerate(lengths.tolist()):
            noise, spans = t5_counts(n, 0.3, 3.0)
            assert int(mask[b].sum()) == noise
            found = runs(mask[b, :n].tolist())
            if roll:  # a span may wrap around the row end
                wrapped = n > 0 and mask[b, 0] and mask[b, n - 1]
                assert len(found) == spans + int(bool(wrapped))
            else:
                assert len(found) == spans


# ----------------------------------------------------------------------------------------------- corrupt


def test_corrupt_proportions_and_ranges():
    B, L = 200, 500
    tokens = torch.randint(20, 1000, (B, L), generator=gen(16))
    mask = random_mask(tokens, 0.5, generator=gen(17))
    out = corrupt(tokens, mask, mask_token_id=3, random_p=0.1, keep_p=0.1, vocab_range=(20, 1000),
                  generator=gen(18))
    assert out.dtype == tokens.dtype
    assert torch.equal(out[~mask], tokens[~mask])
    m = int(mask.sum())
    to_mask = int((out == 3).sum())
    changed = int(((out != 3) & (out != tokens) & mask).sum())
    # a random id can equal the original (probability 1/980); count those with the keeps
    for observed, p in ((to_mask, 0.8), (changed, 0.1 * (1 - 1 / 980)), (m - to_mask - changed, 0.1 + 0.1 / 980)):
        assert abs(observed / m - p) < 5 * math.sqrt(p * (1 - p) / m)
    randoms = out[(out != 3) & mask]
    assert randoms.min() >= 20 and randoms.max() < 1000
    hist = torch.bincount(out[(out != tokens) & (out != 3)] - 20, minlength=980).double()
    assert ((hist - hist.mean()) ** 2 / hist.mean()).sum().item() < chi2_upper(979)


def test_corrupt_never_draws_special_ids_and_defaults_to_the_mask_id():
    tokens = torch.randint(16, 60, (50, 100), generator=gen(19))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    out = corrupt(tokens, mask, mask_token_id=4, random_p=1.0, vocab_range=(16, 60), generator=gen(20))
    assert out.min() >= 16
    assert (corrupt(tokens, mask, mask_token_id=4) == 4).all()


def test_corrupt_per_span_category_is_constant_within_a_span():
    tokens = torch.randint(100, 200, (100, 200), generator=gen(21))
    mask, ids = span_mask(tokens, 0.5, lengths=UniformSpans(5), return_spans=True, generator=gen(22))
    out = corrupt(tokens, mask, mask_token_id=1, random_p=0.3, keep_p=0.3, vocab_range=(2, 1000), spans=ids,
                  generator=gen(23))
    category = torch.where(out == 1, 0, torch.where(out == tokens, 1, 2))
    seen_mixed = False
    for row_ids, row_cat, row_mask in zip(ids.tolist(), category.tolist(), mask.tolist()):
        by_span: dict[int, set[int]] = {}
        for s, c, m in zip(row_ids, row_cat, row_mask):
            if m:
                by_span.setdefault(s, set()).add(c)
        # a random id equal to the original reads as "keep": allow that one confusion only
        for cats in by_span.values():
            assert cats in ({0}, {1}, {2}, {1, 2})
        seen_mixed |= len({min(c) for c in by_span.values()}) > 1
    assert seen_mixed


# ----------------------------------------------------------------------------------------------- bad input


BAD = [
    (lambda: random_mask((2, 5), 1.5), "rate"),
    (lambda: random_mask((2, 5), -0.1), "rate"),
    (lambda: random_mask((2, 5), float("nan")), "rate"),
    (lambda: random_mask((2, 5), torch.tensor([0.5, 1.2])), "rate"),
    (lambda: random_mask((2, 5), torch.tensor([0.5, 0.2, 0.1])), "rate"),
    (lambda: random_mask((2, 5), torch.tensor([1, 0])), "rate"),
    (lambda: random_mask((2, 5, 3), 0.5), "tokens_or_shape"),
    (lambda: random_mask(torch.zeros(5, dtype=torch.long), 0.5), "tokens_or_shape"),
    (lambda: random_mask((2, 5), 0.5, maskable=torch.ones(2, 5)), "maskable"),
    (lambda: random_mask((2, 5), 0.5, maskable=torch.ones(2, 4, dtype=torch.bool)), "maskable"),
    (lambda: random_mask((2, 5), 0.5, rounding="nearest"), "rounding"),
    (lambda: random_mask((2, 5), 0.5, min_count=-1), "min_count"),
    (lambda: span_mask((2, 5), 0.5, lengths="poisson"), "lengths"),
    (lambda: span_mask((2, 5), 0.5, lengths=3), "lengths"),
    (lambda: span_mask((2, 5), 2.0), "rate"),
    (lambda: span_mask((2, 5), 0.5, rounding="up"), "rounding"),
    (lambda: GeometricSpans(0.0), "p"),
    (lambda: GeometricSpans(1.0), "p"),
    (lambda: GeometricSpans(-0.2), "p"),
    (lambda: GeometricSpans(0.2, 0), "max_length"),
    (lambda: UniformSpans(0), "max_length"),
    (lambda: T5Spans(0.5), "mean_length"),
    (lambda: maskable_positions(torch.zeros(2, 3)), "tokens"),
    (lambda: maskable_positions(torch.zeros(2, 3, dtype=torch.long), num_special=-1), "num_special"),
    (lambda: maskable_positions(torch.zeros(2, 3, dtype=torch.long), prompt_lengths=torch.zeros(3)), "prompt"),
    (lambda: corrupt(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), mask_token_id=5,
                     random_p=0.1, vocab_range=(0, 10)), "mask_token_id"),
    (lambda: corrupt(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), mask_token_id=5,
                     random_p=0.1), "vocab_range"),
    (lambda: corrupt(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), mask_token_id=5,
                     random_p=0.6, keep_p=0.6, vocab_range=(6, 10)), "random_p + keep_p"),
    (lambda: corrupt(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), mask_token_id=5,
                     keep_p=1.5), "keep_p"),
    (lambda: corrupt(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), mask_token_id=5), "mask"),
    (lambda: corrupt(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), mask_token_id=5),
     "mask"),
    (lambda: corrupt(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), mask_token_id=5), "tokens"),
    (lambda: corrupt(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), mask_token_id=5,
                     random_p=0.1, vocab_range=(10, 6)), "vocab_range"),
]


@pytest.mark.parametrize(("call", "argument"), BAD)
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(DualObjError, match=argument.replace("+", r"\+")) as info:
        call()
    assert "expected" in str(info.value) and "got" in str(info.value)


# ----------------------------------------------------------------------------------------------- tracing


def test_masks_trace_as_one_graph():
    """No host sync or data-dependent branch: the masks trace with fullgraph=True (global RNG: dynamo does not take
    a Generator argument). Traced, span masks draw full rows of lengths and keys (eager CPU code draws only what
    the rows need), so they are held to their invariants; the random mask must equal eager."""
    allowed = torch.ones(3, 32, dtype=torch.bool)
    allowed[:, 0] = False
    rates = torch.tensor([0.1, 0.5, 0.9])

    def fn(allowed, rates):
        return (random_mask(allowed, rates, maskable=allowed),
                span_mask(allowed, rates, lengths="t5", maskable=allowed),
                span_mask(allowed, rates, maskable=allowed, return_spans=True))

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    eager = fn(allowed, rates)
    torch.manual_seed(0)
    traced = compiled(allowed, rates)
    assert torch.equal(eager[0], traced[0])
    t5 = traced[1]
    assert not (t5 & ~allowed).any()
    for b, rate in enumerate(rates.tolist()):
        noise, spans = t5_counts(31, rate, 3.0)
        assert int(t5[b].sum()) == noise and len(runs(t5[b].tolist())) == spans
    mask, ids = traced[2]
    assert not (mask & ~allowed).any()
    counts = mask.sum(1)
    assert ((counts >= (rates * 31).floor()) & (counts <= (rates * 31).ceil())).all()
    assert torch.equal(ids >= 0, mask)


# ----------------------------------------------------------------------------------------------- bench suite


def test_bench_suite_outputs_pass_their_checks():
    """The masking suite's implementations (Hugging Face's aside: a slow import) keep their stated promises."""
    from dualobj.bench import Context
    from dualobj.bench.masking import cases

    for case in cases(Context(quick=True)):
        outputs = {impl.name: impl.make()() for impl in case.impls if impl.name != "HF collator"}
        assert sum(impl.ours for impl in case.impls) == 1
        assert case.check(outputs) is None, case.name
        assert all(out.shape == (8, 256) and out.dtype == torch.bool for out in outputs.values())
        ours = next(impl.name for impl in case.impls if impl.ours)
        broken = outputs[ours].clone()
        broken[:, 0] = True  # position 0 holds BOS (T5 case: a noise token more than promised)
        assert case.check({**outputs, ours: broken}) is not None, case.name
