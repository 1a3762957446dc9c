"""The ``attention`` suite: :func:`dualobj.attention.attention` (``backend="auto"``) beside its baselines.

Every implementation runs forward and backward (``torch.autograd.grad`` with a fixed upstream gradient) on the
same ``[B, T, H, D]`` q, k, v and returns the output and the three gradients, which the check compares.

Baselines:

- ``naive``: ``softmax(Q·Kᵀ·scale + mask) · V`` with an additive ``-inf`` mask, written out in plain torch.
- ``sdpa``: ``F.scaled_dot_product_attention`` called directly on transposed views: ``is_causal`` for
  uniform causal rows, no mask for bidirectional rows, and one boolean ``[B, 1, T, T]`` mask for mixed rows or
  packed documents (the obvious one-call way).
- ``blocked matmul`` (bidirectional case only): the flash algorithm written with batched matrix products over
  tiles of 4 heads × 256 queries, probabilities recomputed in backward; whether plain BLAS calls beat SDPA's fused
  kernel.

Cases: all causal, all bidirectional, mixed (half the rows causal, AR rows first as
``DualObjective(split="rows")`` builds them), packed documents with mixed rows, and the mixed batch against the
all-bidirectional batch (both through ``attention``; the outputs differ by design, so that case has no check).
Targets: ``auto`` ≤ 0.4× the time and ≤ 0.3× the extra memory of ``naive``; mixed ≤ 1.05× all-bidirectional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dualobj.bench._core import Case, Context, Impl, allclose

FULL = {"batch": 8, "heads": 8, "length": 1024, "head_dim": 64}
QUICK = {"batch": 4, "heads": 4, "length": 256, "head_dim": 64}

Layout = dict[str, Any]


LAYOUTS = ("causal", "bidirectional", "mixed", "documents")
"""The attention layouts this suite times (see :func:`layout`)."""


def layout(kind: str, B: int, T: int, device: str) -> Layout:
    """``attention`` keyword arguments for one of :data:`LAYOUTS` with ``B`` rows of ``T`` positions.

    ``"causal"`` and ``"bidirectional"`` are one flag for every row; ``"mixed"`` makes the first half of the rows
    causal and the rest bidirectional; ``"documents"`` adds four equal documents per row to the mixed layout.
    ``causal`` stays on the CPU, as ``Batch`` keeps it; ``doc_ids`` go to ``device``.
    """
    half = torch.arange(B) < B // 2
    if kind == "causal":
        return {"causal": True}
    if kind == "bidirectional":
        return {"causal": False}
    if kind == "mixed":
        return {"causal": half}
    if kind == "documents":
        doc = (torch.arange(T) * 4 // T).expand(B, T).contiguous()  # four equal documents per row
        return {"causal": half, "doc_ids": doc.to(device)}
    raise KeyError(kind)


def _inputs(sizes: dict[str, int], ctx: Context, seed: int = 0) -> tuple[torch.Tensor, ...]:
    B, H, T, D = sizes["batch"], sizes["heads"], sizes["length"], sizes["head_dim"]
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, T, H, D, generator=g).to(ctx.device, ctx.torch_dtype) for _ in range(4))
    return q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), grad


def _fwd_bwd(forward: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             grad: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
    def call() -> tuple[torch.Tensor, ...]:
        out = forward(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        return out.detach(), dq, dk, dv

    return call


def _mask(layout: Layout, B: int, T: int, device: str) -> torch.Tensor | None:
    """The boolean ``[B, 1, T, T]`` mask of a layout, built here in plain torch (``None``: nothing masked)."""
    causal = layout["causal"]
    if causal is False and "doc_ids" not in layout:
        return None
    pos = torch.arange(T, device=device)
    lower = pos[None, :] <= pos[:, None]
    if isinstance(causal, bool):
        rows = torch.full((B,), causal, device=device)
    else:
        rows = causal.to(device)
    allowed = lower[None] | ~rows[:, None, None]
    if "doc_ids" in layout:
        doc = layout["doc_ids"]
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    return allowed[:, None]


def _naive(layout: Layout, sizes: dict[str, int], ctx: Context) -> Callable[[], Any]:
    q, k, v, grad = _inputs(sizes, ctx)
    mask = _mask(layout, sizes["batch"], sizes["length"], ctx.device)
    bias = None if mask is None else torch.zeros(mask.shape, device=ctx.device, dtype=q.dtype).masked_fill(
        ~mask, float("-inf"))
    scale = sizes["head_dim"] ** -0.5

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        scores = qt @ kt.transpose(-2, -1) * scale
        if bias is not None:
            scores = scores + bias
        return (scores.softmax(dim=-1) @ vt).transpose(1, 2)

    return _fwd_bwd(forward, q, k, v, grad)


def _sdpa(layout: Layout, sizes: dict[str, int], ctx: Context) -> Callable[[], Any]:
    q, k, v, grad = _inputs(sizes, ctx)
    uniform = isinstance(layout["causal"], bool) and "doc_ids" not in layout
    mask = None if uniform else _mask(layout, sizes["batch"], sizes["length"], ctx.device)
    is_causal = layout["causal"] is True and uniform

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal).transpose(1, 2)

    return _fwd_bwd(forward, q, k, v, grad)


class _BlockedAttention(torch.autograd.Function):
    """Bidirectional attention in tiles of (heads, queries), from batched matrix products: the flash algorithm in
    torch ops, on ``[B·H, T, D]`` tensors.

    Forward keeps only the output and each query's log-sum-exp; backward recomputes each tile's probabilities.
    Tiles of 4 heads × 256 queries keep a score tile at 4 MiB for T = 1024 (1024-query tiles of one head and
    8 × 256 measured within 7% of it). It is the obvious way to beat naive attention's memory without a fused
    kernel, and the test of whether plain BLAS calls can beat SDPA's CPU kernel on time.
    """

    HEADS, QUERIES = 4, 256

    @staticmethod
    def _tiles(q: torch.Tensor) -> list[tuple[slice, slice]]:
        H, Q = _BlockedAttention.HEADS, _BlockedAttention.QUERIES
        return [(slice(h, h + H), slice(i, i + Q)) for h in range(0, q.shape[0], H) for i in range(0, q.shape[1], Q)]

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1])
        kt = k.transpose(-2, -1)
        for hs, rows in _BlockedAttention._tiles(q):
            scores = torch.matmul(q[hs, rows], kt[hs]).mul_(scale)
            lse[hs, rows] = torch.logsumexp(scores, dim=-1)
            torch.matmul(scores.sub_(lse[hs, rows, None]).exp_(), v[hs], out=out[hs, rows])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (grad * out).sum(-1, keepdim=True)
        kt, vt = k.transpose(-2, -1), v.transpose(-2, -1)
        for hs, rows in _BlockedAttention._tiles(q):
            probs = torch.matmul(q[hs, rows], kt[hs]).mul_(ctx.scale).sub_(lse[hs, rows, None]).exp_()
            dv[hs].baddbmm_(probs.transpose(-2, -1), grad[hs, rows])
            dscores = torch.matmul(grad[hs, rows], vt[hs]).sub_(delta[hs, rows]).mul_(probs).mul_(ctx.scale)
            torch.matmul(dscores, k[hs], out=dq[hs, rows])
            dk[hs].baddbmm_(dscores.transpose(-2, -1), q[hs, rows])
        return dq, dk, dv, None


def _blocked(sizes: dict[str, int], ctx: Context) -> Callable[[], Any]:
    q, k, v, grad = _inputs(sizes, ctx)
    scale = sizes["head_dim"] ** -0.5

    B, T, H, D = q.shape

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qt, kt, vt = (x.transpose(1, 2).reshape(B * H, T, D) for x in (q, k, v))
        return _BlockedAttention.apply(qt, kt, vt, scale).view(B, H, T, D).transpose(1, 2)

    return _fwd_bwd(forward, q, k, v, grad)


def _ours(layout: Layout, sizes: dict[str, int], ctx: Context, backend: str = "auto") -> Callable[[], Any]:
    from dualobj.attention import attention

    q, k, v, grad = _inputs(sizes, ctx)

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, backend=backend, **layout)

    return _fwd_bwd(forward, q, k, v, grad)


def cases(ctx: Context) -> list[Case]:
    """Causal, bidirectional, mixed, packed-document and mixed-vs-bidirectional cases (smaller under ``quick``)."""
    sizes = dict(QUICK if ctx.quick else FULL)
    B, H, T, D = sizes["batch"], sizes["heads"], sizes["length"], sizes["head_dim"]
    label = f"B{B} H{H} T{T} D{D}"
    tol = 2e-4 if ctx.dtype == "float32" else 3e-2
    check = allclose(rtol=tol, atol=tol)
    layouts = {kind: layout(kind, B, T, ctx.device) for kind in LAYOUTS}

    def impls(kind: str) -> list[Impl]:
        lay = layouts[kind]
        out = [
            Impl("auto", lambda: _ours(lay, sizes, ctx), ours=True),
            Impl("naive", lambda: _naive(lay, sizes, ctx)),
            Impl("sdpa", lambda: _sdpa(lay, sizes, ctx)),
        ]
        if kind == "bidirectional":
            out.append(Impl("blocked matmul", lambda: _blocked(sizes, ctx)))
        return out

    common: dict[str, Any] = {"sizes": sizes, "units": B * T, "unit": "tok", "memory": True}
    out = [
        Case(f"{kind} {label}", impls(kind), check=check, targets={"naive": 0.4}, memory_targets={"naive": 0.3},
             **common)
        for kind in ("causal", "bidirectional", "mixed")
    ]
    out.append(Case(f"documents (4/row, mixed) {label}", impls("documents"), check=check, **common))
    out.append(Case(
        f"mixed vs bidirectional {label}",
        [Impl("mixed", lambda: _ours(layouts["mixed"], sizes, ctx), ours=True),
         Impl("bidirectional", lambda: _ours(layouts["bidirectional"], sizes, ctx))],
        targets={"bidirectional": 1.05}, **{**common, "memory": False},
    ))
    return out
