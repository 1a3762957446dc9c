"""dualobj.attention: every backend against a brute-force reference, the xformers mask translation, RoPE, errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualobj import DualObjError
from dualobj.attention import (
    BACKENDS,
    AttentionSpec,
    SelfAttention,
    apply_rope,
    attention,
    available_backends,
    document_positions,
    document_segments,
)
from dualobj.attention._backends import import_xformers, xformers_bias

CPU_STATUS = available_backends("cpu")
TRAINING_BACKENDS = [name for name, s in CPU_STATUS.items() if s.backward]
FORWARD_BACKENDS = [name for name, s in CPU_STATUS.items() if s.forward and not s.backward]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


# ----------------------------------------------------------------------------------------------- references


def brute_allowed(B, T, causal, doc_ids=None, prefix=None) -> torch.Tensor:
    """[B, T, T] bool, straight from the rule, with loops (documents = runs of equal ids)."""
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        c = bool(causal[b]) if isinstance(causal, torch.Tensor) else causal
        run = [0] * T
        for t in range(1, T):
            run[t] = run[t - 1] + int(doc_ids is not None and int(doc_ids[b, t]) != int(doc_ids[b, t - 1]))
        for i in range(T):
            for j in range(T):
                visible = (not c) or j <= i or (prefix is not None and j < int(prefix[b]))
                out[b, i, j] = visible and run[i] == run[j]
    return out


def brute_attention(q, k, v, allowed, scale) -> torch.Tensor:
    """Per-row, per-head, per-query softmax attention in float64."""
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = allowed[b, i].nonzero().flatten()
                s = (k[b, keys, h].double() @ q[b, i, h].double()) * scale
                out[b, i, h] = torch.softmax(s, 0) @ v[b, keys, h].double()
    return out


def make_inputs(B, T, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]


def run_fwd_bwd(backend, q, k, v, **layout):
    qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = attention(qs, ks, vs, backend=backend, **layout)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return out.detach(), qs.grad, ks.grad, vs.grad


def docs_from_lengths(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    change = torch.rand(B, T, generator=g) < 0.2
    change[:, 0] = False
    return change.long().cumsum(1) * 3 + 7  # ids need not start at 0 or be consecutive


LAYOUTS = {
    "causal": lambda B, T: dict(causal=True),
    "bidirectional": lambda B, T: dict(causal=False),
    "mixed-grouped": lambda B, T: dict(causal=torch.arange(B) < (B + 1) // 2),
    "mixed-interleaved": lambda B, T: dict(causal=torch.arange(B) % 2 == 1),
    "documents": lambda B, T: dict(causal=torch.arange(B) % 2 == 0, doc_ids=docs_from_lengths(B, T, 3)),
    "documents-causal": lambda B, T: dict(causal=True, doc_ids=docs_from_lengths(B, T, 4)),
    "prefix": lambda B, T: dict(causal=torch.arange(B) != 1, prefix_lengths=torch.arange(B) * (T // 3 + 1)),
    "prefix-documents": lambda B, T: dict(
        causal=True, prefix_lengths=torch.full((B,), T // 2), doc_ids=docs_from_lengths(B, T, 5)
    ),
}


# ----------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mask_matches_rule(layout):
    B, T = 4, 13
    kw = LAYOUTS[layout](B, T)
    spec = AttentionSpec.build(B, T, kw["causal"], kw.get("doc_ids"), kw.get("prefix_lengths"))
    mask = spec.mask("cpu")
    want = brute_allowed(B, T, kw["causal"], kw.get("doc_ids"), kw.get("prefix_lengths"))
    if mask is None:
        assert want.all()
    else:
        assert mask.shape == (B, 1, T, T)
        assert torch.equal(mask[:, 0], want)


def test_documents_are_runs_and_positions_restart():
    doc = torch.tensor([[5, 5, 2, 2, 2, 5, 5], [0, 0, 0, 0, 0, 0, 0]])
    assert document_segments(doc).tolist() == [[0, 0, 1, 1, 1, 2, 2], [0] * 7]
    assert document_positions(doc).tolist() == [[0, 1, 0, 1, 2, 0, 1], list(range(7))]


# ----------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_math_matches_brute_force(layout):
    B, T, H, D = 3, 11, 2, 8
    q, k, v = make_inputs(B, T, H, D)
    kw = LAYOUTS[layout](B, T)
    allowed = brute_allowed(B, T, kw["causal"], kw.get("doc_ids"), kw.get("prefix_lengths"))
    got = attention(q, k, v, backend="math", scale=0.3, **kw)
    torch.testing.assert_close(got.double(), brute_attention(q, k, v, allowed, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("B", "T", "H", "D"), [(4, 37, 2, 32), (2, 1, 1, 64), (3, 64, 1, 128)])
def test_backend_matches_math_fwd_bwd(backend, layout, B, T, H, D):
    q, k, v = make_inputs(B, T, H, D)
    kw = LAYOUTS[layout](B, T)
    want = run_fwd_bwd("math", q, k, v, **kw)
    got = run_fwd_bwd(backend, q, k, v, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("layout", ["causal", "mixed-interleaved", "documents", "prefix"])
def test_backend_matches_math_bf16(backend, layout):
    B, T, H, D = 4, 33, 2, 64
    q, k, v = make_inputs(B, T, H, D, dtype=torch.bfloat16)
    kw = LAYOUTS[layout](B, T)
    want = run_fwd_bwd("math", q, k, v, **kw)
    got = run_fwd_bwd(backend, q, k, v, **kw)
    assert got[0].dtype == torch.bfloat16
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", FORWARD_BACKENDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_forward_only_backend_matches_math(backend, layout):
    B, T, H, D = 3, 21, 2, 32
    q, k, v = (x.detach() for x in make_inputs(B, T, H, D))
    kw = LAYOUTS[layout](B, T)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, backend=backend, **kw), attention(q, k, v, backend="math", **kw))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 24),
    H=st.integers(1, 3),
    D=st.sampled_from([8, 16, 32]),
    data=st.data(),
)
def test_sdpa_matches_math_over_random_layouts(B, T, H, D, data):
    causal = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    kw: dict = dict(causal=causal if data.draw(st.booleans()) else bool(causal[0]))
    if data.draw(st.booleans()):
        kw["doc_ids"] = torch.tensor(
            data.draw(st.lists(st.lists(st.integers(0, 2), min_size=T, max_size=T), min_size=B, max_size=B))
        )
    if data.draw(st.booleans()):
        kw["prefix_lengths"] = torch.tensor(data.draw(st.lists(st.integers(0, T + 1), min_size=B, max_size=B)))
    q, k, v = make_inputs(B, T, H, D, seed=data.draw(st.integers(0, 1000)))
    spec = AttentionSpec.build(B, T, kw["causal"], kw.get("doc_ids"), kw.get("prefix_lengths"))
    mask = spec.mask("cpu")
    want_mask = brute_allowed(B, T, kw["causal"], kw.get("doc_ids"), kw.get("prefix_lengths"))
    assert (mask is None and bool(want_mask.all())) or torch.equal(mask[:, 0], want_mask)
    want = run_fwd_bwd("math", q, k, v, **kw)
    got = run_fwd_bwd("sdpa", q, k, v, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_auto_on_cpu_is_sdpa_and_matches():
    q, k, v = make_inputs(4, 16, 2, 16)
    kw = LAYOUTS["mixed-interleaved"](4, 16)
    assert torch.equal(attention(q, k, v, **kw), attention(q, k, v, backend="sdpa", **kw))


def test_mixed_rows_equal_separate_calls():
    """A mixed batch gives each row exactly what a uniform call on that row alone gives."""
    q, k, v = make_inputs(5, 19, 2, 16)
    causal = torch.tensor([False, True, True, False, True])
    out = attention(q, k, v, causal=causal)
    for b in range(5):
        alone = attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], causal=bool(causal[b]), backend="math")
        torch.testing.assert_close(out[b : b + 1], alone, **TOL[torch.float32])


def test_traced_path_uses_mask_and_agrees(monkeypatch):
    """While torch.compile traces, causal values cannot steer Python: the mask path must give the same numbers."""
    q, k, v = make_inputs(4, 12, 2, 16)
    kw = LAYOUTS["mixed-interleaved"](4, 12)
    eager = run_fwd_bwd("sdpa", q, k, v, **kw)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert AttentionSpec.build(4, 12, kw["causal"]).host_causal() is None
    traced = run_fwd_bwd("sdpa", q, k, v, **kw)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------- availability


def test_available_backends_report():
    status = available_backends()
    assert list(status) == list(BACKENDS)
    assert status["sdpa"].backward and status["math"].backward
    assert status["flex"].forward and not status["flex"].backward
    assert "backward" in status["flex"].reason and "CUDA" in status["flex"].reason
    if not status["xformers"].forward:
        assert status["xformers"].reason


def test_xformers_reason_names_builds_and_fix():
    try:
        _, _, load_reason = import_xformers()
    except ImportError:
        pytest.skip("xformers is not installed")
    reason = CPU_STATUS["xformers"].reason
    if load_reason is not None:
        assert "built for torch" in reason and torch.__version__ in reason and "install" in reason
    else:
        assert "CUDA" in reason


def test_importing_and_probing_prints_nothing():
    code = "import dualobj.attention as a; a.available_backends()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""


def test_flex_training_on_cpu_explains():
    q, k, v = make_inputs(2, 8, 1, 16)
    with pytest.raises(DualObjError, match=r"^backend: expected .*sdpa.*forward only"):
        attention(q, k, v, causal=True, backend="flex")


# ----------------------------------------------------------------------------------------------- xformers


def _dense_bias(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("docs", [False, True])
def test_xformers_mask_translation(causal, docs):
    try:
        _, attn_bias, _ = import_xformers()
    except ImportError:
        pytest.skip("xformers is not installed")
    n, T = 3, 10
    doc_ids = docs_from_lengths(n, T, 9) if docs else None
    bias, flatten = xformers_bias(attn_bias, causal, doc_ids)
    ours = AttentionSpec.build(n, T, causal, doc_ids).mask("cpu")
    ours = torch.ones(n, 1, T, T, dtype=torch.bool) if ours is None else ours
    if not flatten:
        assert not docs
        got = torch.zeros(T, T) if bias is None else bias.materialize((T, T))
        assert torch.equal(got.expand(n, T, T), _dense_bias(ours[:, 0]))
        return
    # flattened batch: one block-diagonal [n·T, n·T] mask; rows never see each other
    want = torch.full((n * T, n * T), float("-inf"))
    for b in range(n):
        want[b * T : (b + 1) * T, b * T : (b + 1) * T] = _dense_bias(ours[b, 0])
    assert torch.equal(bias.materialize((n * T, n * T)), want)


@pytest.mark.skipif(not CPU_STATUS["xformers"].backward and not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["causal", "bidirectional", "mixed-interleaved", "documents", "documents-causal"])
def test_xformers_kernels_match_math(layout):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = available_backends(device)["xformers"]
    if not status.backward:
        pytest.skip(f"xformers kernels do not run here: {status.reason}")
    q, k, v = (x.detach().to(device).requires_grad_(True) for x in make_inputs(4, 40, 2, 64))
    kw = {
        key: val.to(device) if key != "causal" and isinstance(val, torch.Tensor) else val
        for key, val in LAYOUTS[layout](4, 40).items()
    }
    for g, w in zip(run_fwd_bwd("xformers", q, k, v, **kw), run_fwd_bwd("math", q, k, v, **kw)):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------------------------- RoPE and module


def test_rope_matches_complex_rotation():
    B, T, H, D = 2, 9, 3, 16
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    pos = torch.randint(0, 50, (B, T))
    got = apply_rope(x.float(), pos).double()
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    freqs = torch.tensor([10000.0 ** (-2 * m / D) for m in range(D // 2)], dtype=torch.float64)
    rot = torch.polar(torch.ones_like(freqs), pos[..., None, None].double() * freqs)  # [B, T, 1, D/2]
    zr = z * rot
    torch.testing.assert_close(got, torch.cat([zr.real, zr.imag], -1), atol=1e-4, rtol=1e-4)


def test_rope_scores_depend_on_relative_position():
    q, k = torch.randn(2, 1, 1, 1, 32).unbind(0)
    s1 = (apply_rope(q, torch.tensor([7])) * apply_rope(k, torch.tensor([3]))).sum()
    s2 = (apply_rope(q, torch.tensor([104])) * apply_rope(k, torch.tensor([100]))).sum()
    assert math.isclose(float(s1), float(s2), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_self_attention_packed_document_reads_as_if_alone(causal):
    torch.manual_seed(0)
    m = SelfAttention(32, 4)
    a, b = torch.randn(1, 5, 32), torch.randn(1, 8, 32)
    packed = m(torch.cat([a, b], 1), causal=causal, doc_ids=torch.tensor([[0] * 5 + [1] * 8]))
    torch.testing.assert_close(packed[:, :5], m(a, causal=causal), **TOL[torch.float32])
    torch.testing.assert_close(packed[:, 5:], m(b, causal=causal), **TOL[torch.float32])


def test_self_attention_backends_agree_and_train():
    torch.manual_seed(0)
    m_auto, m_math = SelfAttention(48, 3), SelfAttention(48, 3, backend="math")
    m_math.load_state_dict(m_auto.state_dict())
    x = torch.randn(4, 10, 48)
    kw = dict(causal=torch.tensor([True, False, True, False]), prefix_lengths=torch.tensor([0, 0, 4, 0]))
    ya, ym = m_auto(x, **kw), m_math(x, **kw)
    torch.testing.assert_close(ya, ym, **TOL[torch.float32])
    ya.square().sum().backward()
    ym.square().sum().backward()
    torch.testing.assert_close(m_auto.qkv.weight.grad, m_math.qkv.weight.grad, atol=1e-4, rtol=1e-4)
    # without rope the module is permutation-equivariant in bidirectional mode
    plain = SelfAttention(48, 3, rope=False)
    perm = torch.randperm(10)
    torch.testing.assert_close(plain(x, causal=False)[:, perm], plain(x[:, perm], causal=False), **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(k=torch.randn(2, 5, 2, 8)), r"k: expected shape \[2, 6, 2, 8\]"),
        (dict(v=torch.randn(2, 6, 2, 8, dtype=torch.float64)), "v: expected dtype torch.float32"),
        (dict(q=torch.randn(2, 6, 16)), "q: expected a 4-D tensor"),
        (dict(causal=torch.tensor([True, False, True])), r"causal: expected shape \[2\]"),
        (dict(causal=torch.tensor([1, 0])), "causal: expected dtype in torch.bool"),
        (dict(causal=[True, False]), "causal: expected a Python bool or a bool tensor"),
        (dict(causal=1), "causal: expected a Python bool"),
        (dict(doc_ids=torch.zeros(2, 5, dtype=torch.long)), r"doc_ids: expected shape \[2, 6\]"),
        (dict(doc_ids=torch.zeros(2, 6)), "doc_ids: expected an integer tensor"),
        (dict(prefix_lengths=torch.zeros(3, dtype=torch.long)), r"prefix_lengths: expected shape \[2\]"),
        (dict(backend="flash"), "backend: expected one of 'auto', 'xformers'"),
        (dict(backend=3), "backend: expected a backend name"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(q=torch.randn(2, 6, 2, 8), k=torch.randn(2, 6, 2, 8), v=torch.randn(2, 6, 2, 8), causal=True)
    args.update(kwargs)
    with pytest.raises(DualObjError, match=match):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_forced_backend_that_cannot_run_says_why():
    if CPU_STATUS["xformers"].backward:
        pytest.skip("xformers runs here")
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(DualObjError, match=r"backend: .*'xformers'.*install"):
        attention(q, q, q, causal=True, backend="xformers")


def test_xformers_rejects_prefix_rows():
    q = torch.randn(1, 4, 1, 8)
    spec = AttentionSpec.build(1, 4, True, prefix_lengths=torch.tensor([2]))
    with pytest.raises(DualObjError, match=r"prefix_lengths: .*xformers"):
        BACKENDS["xformers"](q, q, q, spec, 1.0)


@pytest.mark.parametrize(
    ("args", "match"),
    [((30, 4), "dim: expected a multiple of heads=4"), ((35, 5), "even head dimension"), ((0, 1), "dim: expected")],
)
def test_self_attention_bad_config(args, match):
    with pytest.raises(DualObjError, match=match):
        SelfAttention(*args)


def test_self_attention_bad_input():
    m = SelfAttention(16, 2)
    with pytest.raises(DualObjError, match=r"x: expected shape \[B, T, 16\]"):
        m(torch.randn(2, 3, 8), causal=True)
    with pytest.raises(DualObjError, match=r"doc_ids: expected shape \[2, 3\]"):
        m(torch.randn(2, 3, 16), causal=True, doc_ids=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report on a machine without CUDA")
def test_available_backends_without_the_device():
    status = available_backends("cuda")
    assert not any(s.forward for s in status.values())
    assert all(s.reason for s in status.values())


def test_bad_scale_and_rope_base():
    q = torch.randn(1, 4, 1, 4)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(DualObjError, match=r"^scale: "):
            attention(q, q, q, causal=True, scale=bad)
    with pytest.raises(DualObjError, match=r"^scale: "):
        attention(q, q, q, causal=True, scale="0.5")
    for bad in (0, 0.0, -2.0, float("nan")):
        with pytest.raises(DualObjError, match=r"^rope_base: "):
            SelfAttention(8, 2, rope_base=bad)
    SelfAttention(8, 2, rope=False, rope_base=0)  # no rotary embedding: the base is unused
    with pytest.raises(DualObjError, match=r"^heads: "):
        SelfAttention(8, True)
    with pytest.raises(DualObjError, match=r"^base: "):
        apply_rope(q, torch.arange(4), base=0.0)


def test_float64_self_attention():
    torch.manual_seed(0)
    layer = SelfAttention(16, 2, backend="math")
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with pytest.raises(DualObjError, match=r"^x: .*float32"):
        layer(x, causal=True)
    ref = layer(x.float(), causal=True)
    layer64 = layer.double()
    for backend in ("math", "sdpa"):
        layer64.backend = backend
        out = layer64(x, causal=True)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
    layer64.backend = "math"
    a = layer64(x, causal=True)
    layer64.backend = "sdpa"
    torch.testing.assert_close(a, layer64(x, causal=True), atol=1e-12, rtol=1e-12)  # float64 end to end
