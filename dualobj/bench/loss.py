"""``dualobj bench loss``: the fused linear + cross-entropy against the full-logits computation.

Every implementation runs the forward and the backward of a per-token-weighted cross-entropy of an output layer
(``hidden [N, H] @ weight[V, H].T``) and returns ``(loss, grad of hidden, grad of weight)``. Baselines:

- ``naive``: ``F.linear`` then ``F.cross_entropy(reduction="none") · weights``, building the ``[N, V]`` logits;
- ``torch-native``: torch's own chunked ``F.linear_cross_entropy`` (torch ≥ 2.13). Per-token weights can only be
  applied to its ``reduction="none"`` output, whose backward recomputes the chunks; the unweighted case uses its
  ``"sum"`` path, which does not;
- ``ours-sweep-unweighted`` / ``ours-AR-batch``: our own sweep without weights, or on a batch with every position
  labelled, for the weighted-vs-unweighted and MD-vs-AR ratios. The unweighted baseline calls dualobj's own sweep
  directly: ``linear_cross_entropy`` without weights hands off to torch's op, so timing it would compare torch's
  code with ours instead of measuring what the weights cost in ours.

Sizes: N=8192, H=512, V=32768 (``--quick``: N=512, H=64, V=2048); on CUDA N=16384, H=1024, V=50304.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dualobj.bench._core import Case, Context, Impl
from dualobj.objectives import IGNORE_INDEX, linear_cross_entropy

NATIVE_CHUNK = 1024
"""Rows per chunk given to torch's ``F.linear_cross_entropy`` (its CPU auto choice for float32, 64, is slower)."""


def _native_missing() -> str | None:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (added in 2.13)"
    return None


def sizes(ctx: Context) -> tuple[int, int, int]:
    """``(N, H, V)`` for ``ctx``."""
    if ctx.quick:
        return 512, 64, 2048
    if ctx.device.startswith("cuda"):
        return 16384, 1024, 50304
    return 8192, 512, 32768


@functools.lru_cache(maxsize=2)
def _inputs(ctx: Context, labelled: float) -> dict[str, torch.Tensor]:
    """Seeded inputs, shared by the implementations of a case within one process.

    ``labelled`` is the fraction of rows with a label (the others are ``-100``); weights are in ``[0.1, 1.1)`` on
    labelled rows and 0 elsewhere, as an objective's ``prepare`` gives them.
    """
    N, H, V = sizes(ctx)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, ctx.dtype)
    hidden = torch.randn(N, H, generator=g).to(ctx.device, dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(ctx.device, dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if labelled < 1.0:
        labels[torch.randperm(N, generator=g)[: round(N * (1.0 - labelled))]] = IGNORE_INDEX
    weights = (torch.rand(N, generator=g) + 0.1) * (labels != IGNORE_INDEX)
    return {
        "hidden": hidden.requires_grad_(),
        "weight": weight.requires_grad_(),
        "labels": labels.to(ctx.device),
        "weights": weights.to(ctx.device),
    }


Step = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _step(loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], ctx: Context, labelled: float) -> Step:
    x = _inputs(ctx, labelled)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss = loss_fn(x)
        grad_h, grad_w = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
        return loss.detach().float(), grad_h, grad_w

    return run


def _ours(weighted: bool) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    return lambda x: linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["weights"] if weighted else None)


def _own_sweep_unweighted(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """dualobj's chunked sweep with no per-token weights (what ``linear_cross_entropy`` runs when it does not hand
    off to torch's op)."""
    from dualobj.objectives._fused import _fused, default_chunk_size

    chunk = default_chunk_size(x["weight"].shape[0])
    return _fused(x["hidden"], x["weight"], None, None, x["labels"], 0.0, IGNORE_INDEX, chunk, False, False)[0]


def _naive(weighted: bool) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    def loss(x: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = F.linear(x["hidden"], x["weight"]).float()
        if not weighted:
            return F.cross_entropy(logits, x["labels"], reduction="sum")
        return (F.cross_entropy(logits, x["labels"], reduction="none") * x["weights"]).sum()

    return loss


def _native(weighted: bool) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    def loss(x: dict[str, torch.Tensor]) -> torch.Tensor:
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=NATIVE_CHUNK)
        if not weighted:
            return F.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="sum", options=options)
        per_row = F.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="none", options=options)
        return (per_row.float() * x["weights"]).sum()

    return loss


def _agree(names: tuple[str, ...], rtol: float, atol: float) -> Callable[[dict[str, Any]], str | None]:
    """``Case.check`` comparing the outputs of the implementations in ``names`` (the others compute other things).

    Gradients are compared relative to their largest magnitude, the loss relative to itself.
    """

    def check(outputs: dict[str, Any]) -> str | None:
        present = [n for n in names if n in outputs]
        if len(present) < 2:
            return None
        ref = outputs[present[0]]
        for name in present[1:]:
            for i, (a, b) in enumerate(zip(ref, outputs[name])):
                a64 = a.detach().to("cpu", torch.float64)
                b64 = b.detach().to("cpu", torch.float64)
                scale = a64.abs().max().clamp_min(1e-30)
                err = ((a64 - b64).abs().max() / scale).item()
                if not err <= rtol + atol / scale.item():
                    what = ("loss", "grad of hidden", "grad of weight")[i]
                    return f"{name} differs from {present[0]} in the {what}: max relative error {err:.3g}"
        return None

    return check


def cases(ctx: Context) -> list[Case]:
    """The three cases: weighted AR batch, MD batch (half the positions labelled), unweighted AR batch.

    In the unweighted case ``ours`` is what ``linear_cross_entropy`` runs there (torch's op where it exists) and
    ``ours-sweep`` is dualobj's own sweep, checked against the others since it is the weighted case's baseline.
    """
    N, H, V = sizes(ctx)
    low = ctx.dtype in ("bfloat16", "float16")
    rtol, atol = (3e-2, 1e-3) if low else (1e-4, 1e-6)
    native_missing = _native_missing()
    shape = {"N": N, "H": H, "V": V, "dtype": ctx.dtype}

    weighted = Case(
        name=f"weighted {N}x{H}x{V}",
        impls=[
            Impl("ours", lambda: _step(_ours(True), ctx, 1.0), ours=True),
            Impl("naive", lambda: _step(_naive(True), ctx, 1.0)),
            Impl("torch-native", lambda: _step(_native(True), ctx, 1.0), available=native_missing),
            Impl("ours-sweep-unweighted", lambda: _step(_own_sweep_unweighted, ctx, 1.0)),
        ],
        sizes={**shape, "labelled": 1.0, "weights": True},
        units=N,
        check=_agree(("ours", "naive", "torch-native"), rtol, atol),
        memory=True,
        targets={"naive": 0.9, "ours-sweep-unweighted": 1.1},
        memory_targets={"naive": 0.2},
    )
    md = Case(
        name=f"MD half labelled {N}x{H}x{V}",
        impls=[
            Impl("ours", lambda: _step(_ours(True), ctx, 0.5), ours=True),
            Impl("naive", lambda: _step(_naive(True), ctx, 0.5)),
            Impl("ours-AR-batch", lambda: _step(_ours(True), ctx, 1.0)),
        ],
        sizes={**shape, "labelled": 0.5, "weights": True},
        units=N,
        check=_agree(("ours", "naive"), rtol, atol),
        memory=True,
        targets={"ours-AR-batch": 0.6},
    )
    unweighted = Case(
        name=f"unweighted {N}x{H}x{V}",
        impls=[
            Impl("ours", lambda: _step(_ours(False), ctx, 1.0), ours=True),
            Impl("naive", lambda: _step(_naive(False), ctx, 1.0)),
            Impl("torch-native", lambda: _step(_native(False), ctx, 1.0), available=native_missing),
            Impl("ours-sweep", lambda: _step(_own_sweep_unweighted, ctx, 1.0)),
        ],
        sizes={**shape, "labelled": 1.0, "weights": False},
        units=N,
        check=_agree(("ours", "naive", "torch-native", "ours-sweep"), rtol, atol),
        memory=True,
    )
    return [weighted, md, unweighted]
