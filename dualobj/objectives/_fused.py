"""Scoring hidden states through the output layer without building the full ``[N, V]`` logits.

The core is one sweep over the labelled rows, ``chunk_size`` rows at a time. Each chunk's logits live only in a
reused ``[chunk, V]`` float32 buffer: the sweep takes the log-softmax, reads off the cross-entropy and the
log-sum-exp of every row, then turns the buffer into ``d total / d logits`` in place and multiplies it into the
gradients of the hidden states, the output weight and the bias. With ``reduction="sum"`` or ``"mean"`` this happens
inside the forward (the per-token weights are known then, so nothing is recomputed); the backward only rescales the
stored gradients by the incoming scalar. ``reduction="none"`` cannot do that (each row's upstream gradient is only
known in the backward), so it runs the sweep again there.

The sweep is registered as the custom operators ``dualobj::fused_linear_ce`` and ``dualobj::fused_linear_ce_backward``
(with fake implementations and an autograd formula), so ``torch.compile`` keeps it as one node of a full graph.
On the CPU the labelled rows are gathered first; on an accelerator every row is visited with weight 0 at ignored
ones, since gathering them has a data-dependent size (a device-to-host sync).
"""

from __future__ import annotations

import math

import torch

from dualobj._errors import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_number,
    check_tensor,
    fail,
    fail_type,
    validation_enabled,
)
from dualobj.objectives._batch import IGNORE_INDEX, Batch, LossOutput
from dualobj.objectives._ce import NORMALIZERS, check_batch_against, check_labels, finish

_HAS_NATIVE = hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
"""torch >= 2.13 has its own chunked linear cross-entropy (used where it does exactly our job; see the docs)."""

REDUCTIONS = ("sum", "mean", "none")
"""``linear_cross_entropy`` reductions: the weighted sum, that sum over the labelled count, or one value per row."""

_CHUNK_ELEMENTS = 1 << 25
"""Default logits-chunk budget in elements (128 MiB in float32): ``chunk_size`` is the power of two nearest
``_CHUNK_ELEMENTS / V`` (1024 rows at V = 32768)."""


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk when none is given: the power of two nearest ``2**25 / vocab_size``, at least 16."""
    return max(16, 1 << round(math.log2(max(1.0, _CHUNK_ELEMENTS / max(1, vocab_size)))))


def _sweep(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    w: torch.Tensor | None,
    z_loss: float,
    chunk: int,
    *,
    grad_h: torch.Tensor | None = None,
    grad_w: torch.Tensor | None = None,
    grad_b: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
    fresh_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunked pass over the rows ``h [M, H]`` with labels ``y [M]`` (all labelled) and weights ``w [M]``.

    Returns the float32 ``ce [M]`` and ``lse [M]``. When given, ``grad_h [M, H]`` (dtype of ``h``) is overwritten
    and ``grad_w [V, H]``, ``grad_b [V]`` (float32) are accumulated with the gradients of
    ``Σ w·(ce + z_loss·lse²)``; ``correct [M]`` (bool) receives ``argmax == y``. With ``fresh_w`` the first chunk
    overwrites ``grad_w`` (which may then start uninitialised) instead of adding to it.
    """
    M = h.shape[0]
    V = weight.shape[0]
    f32 = _acc_dtype(h.dtype)
    ce = torch.empty(M, dtype=f32, device=h.device)
    lse = torch.empty(M, dtype=f32, device=h.device)
    if M == 0:
        return ce, lse
    grads = grad_h is not None or grad_w is not None or grad_b is not None
    c = min(chunk, M)
    logits = torch.empty(c, V, dtype=f32, device=h.device)
    raw = logits if h.dtype == f32 else torch.empty(c, V, dtype=h.dtype, device=h.device)
    probs = torch.empty(c, V, dtype=f32, device=h.device)
    wt = weight.t()
    for start in range(0, M, c):
        stop = min(start + c, M)
        hc, yc = h[start:stop], y[start:stop]
        lo, rw, p = logits[: stop - start], raw[: stop - start], probs[: stop - start]
        if bias is None:
            torch.mm(hc, wt, out=rw)
        else:
            torch.addmm(bias, hc, wt, out=rw)
        if rw is not lo:
            lo.copy_(rw)
        top, arg = lo.max(dim=1)
        if correct is not None:
            correct[start:stop] = arg == yc
        torch.softmax(lo, dim=1, out=p)
        # lse = max − log p(argmax): p(argmax) ≥ 1/V never underflows, so no second pass over the chunk.
        lse_c = top - p.gather(1, arg.unsqueeze(1)).squeeze(1).log()
        lse[start:stop] = lse_c
        ce[start:stop] = lse_c - lo.gather(1, yc.unsqueeze(1)).squeeze(1)
        if not grads:
            continue
        # d/dlogits of w·(ce + z·lse²) = s·softmax − w·onehot(y), with s = w·(1 + 2z·lse).
        wc = w[start:stop] if w is not None else torch.ones(stop - start, dtype=f32, device=h.device)
        s_c = wc * (1.0 + 2.0 * z_loss * lse_c) if z_loss else wc
        if h.dtype == f32:
            _grads_folded(p, hc, weight, yc, wc, s_c, grad_h, grad_w, grad_b, start, fresh_w)
        else:
            _grads_rounded(p, rw, hc, weight, yc, wc, s_c, grad_h, grad_w, grad_b, start)
    return ce, lse


def _grads_folded(
    p: torch.Tensor,
    hc: torch.Tensor,
    weight: torch.Tensor,
    yc: torch.Tensor,
    wc: torch.Tensor,
    s_c: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    start: int,
    fresh_w: bool,
) -> None:
    """Full-precision inputs: the row scale ``s`` goes into the ``[chunk, H]`` side of each product and the
    one-hot part is a row gather / scatter, so the ``[chunk, V]`` softmax ``p`` is only read by the products."""
    if grad_b is not None:
        grad_b.add_(p.t().mv(s_c)).index_add_(0, yc, -wc)
    if grad_h is not None:
        gh = torch.mm(p, weight, out=grad_h[start : start + p.shape[0]])
        gh.mul_(s_c.unsqueeze(1)).sub_(weight.index_select(0, yc) * wc.unsqueeze(1))
    if grad_w is not None:
        scaled = hc * s_c.unsqueeze(1)
        if start == 0 and fresh_w:
            torch.mm(p.t(), scaled, out=grad_w)
        else:
            grad_w.addmm_(p.t(), scaled)
        grad_w.index_add_(0, yc, hc * -wc.unsqueeze(1))


def _grads_rounded(
    p: torch.Tensor,
    rw: torch.Tensor,
    hc: torch.Tensor,
    weight: torch.Tensor,
    yc: torch.Tensor,
    wc: torch.Tensor,
    s_c: torch.Tensor,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    start: int,
) -> None:
    """Low-precision inputs: form ``d = s·p − w·onehot`` in float32 first (no cancellation after rounding), round
    it once to the input dtype in ``rw`` and multiply in that dtype, as autograd on the naive graph does."""
    d = p.mul_(s_c.unsqueeze(1))
    d.scatter_add_(1, yc.unsqueeze(1), -wc.unsqueeze(1))
    if grad_b is not None:
        grad_b.add_(d.sum(dim=0))
    dm = rw.copy_(d)
    if grad_h is not None:
        torch.mm(dm, weight, out=grad_h[start : start + p.shape[0]])
    if grad_w is not None:
        grad_w.add_(dm.t() @ hc)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (so ``gradcheck`` works), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weight_grad_buffer(weight: torch.Tensor, dtype: torch.dtype, fresh: bool) -> torch.Tensor:
    """The ``[V, H]`` accumulator of the output-weight gradient: uninitialised when the sweep's first chunk
    overwrites it (``fresh``), else zeros."""
    make = torch.empty if fresh else torch.zeros
    return make(weight.shape, dtype=dtype, device=weight.device)


SELECT_ROWS_ON = {"cpu"}
"""Device types on which the sweep first gathers the labelled rows. Finding them (``nonzero``) has a
data-dependent size, which on an accelerator is a device-to-host sync; there the sweep instead runs over every row
with weight 0 at ignored ones (no sync, at the cost of projecting the ignored rows too)."""


class _Rows:
    """Which rows the sweep visits: ``index`` (the labelled rows; ``None`` for all) and, when every row is visited
    although some are ignored, ``keep`` (``[N]`` bool) to zero the ignored ones."""

    def __init__(self, labels: torch.Tensor, ignore_index: int) -> None:
        self.n = labels.shape[0]
        keep = labels != ignore_index
        self.index: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        if labels.device.type not in SELECT_ROWS_ON:
            self.keep = keep
            return
        rows = keep.nonzero().squeeze(1)
        if rows.numel() != self.n:
            self.index = rows

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The visited rows' labels (0 at ignored rows, so that they index the vocabulary)."""
        if self.keep is not None:
            return torch.where(self.keep, labels, 0)
        return _gathered(labels, self.index)

    def weights(self, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The visited rows' weights in ``dtype`` (0 at ignored rows)."""
        if self.keep is not None:
            if weights is None:
                return self.keep.to(dtype)
            return torch.where(self.keep, weights.to(dtype), 0.0)
        return None if weights is None else _gathered(weights, self.index).to(dtype)

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """Per-visited-row values back at all ``n`` rows, 0 (or False) at ignored rows."""
        if self.keep is not None:
            mask = self.keep.view(-1, *([1] * (values.ndim - 1)))
            return values & mask if values.dtype == torch.bool else torch.where(mask, values, 0)
        return _spread(values, self.index, self.n)


def _gathered(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    if x is None or rows is None:
        return x
    return x.index_select(0, rows)


def _spread(values: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """Values of the labelled rows back at their positions among ``n`` rows (0 elsewhere)."""
    if rows is None:
        return values
    out = torch.zeros((n, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows, values)


def _fresh(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors, each cloned if it shares storage with an earlier one (a custom op's outputs must not alias)."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen or id(t) in seen:
            t = t.clone()
        seen.update((key, id(t)))
        out.append(t)
    return out


# The fused sweep is one opaque operator for autograd and torch.compile: its row selection (``nonzero``) has a
# data-dependent size, so it cannot be traced, but as a custom op with a fake implementation (output shapes from
# the input shapes alone) and an autograd formula it is a single node that ``torch.compile(fullgraph=True)`` keeps.
# Gradients that are not built come back as empty tensors (an op returns tensors, not None).


@torch.library.custom_op(
    "dualobj::fused_linear_ce",
    mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor? weights, Tensor labels, float z_loss, "
    "int ignore_index, int chunk, bool want_correct, bool per_row, bool[] need) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _fused_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weights: torch.Tensor | None,
    labels: torch.Tensor,
    z_loss: float,
    ignore_index: int,
    chunk: int,
    want_correct: bool,
    per_row: bool,
    need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """``(out, ce [N], lse [N], correct [N], grad_h, grad_w, grad_b, per [N])``.

    ``out`` is ``Σ_labelled w·(ce + z·lse²)`` (``per_row=False``) or its per-row values (``per_row=True``).
    ``ce``, ``lse`` (float32) and ``correct`` (bool) are 0 / False at ignored rows. With ``per_row=False`` the
    gradients of the inputs flagged in ``need = (hidden, weight, bias, weights)`` are built here and the backward
    only rescales them; ``per`` (the per-row ``ce + z·lse²``) is returned when the weights need a gradient.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return _fused_forward(hidden, weight, bias, weights, labels, z_loss, ignore_index, chunk, want_correct,
                              per_row, need)


def _fused_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weights: torch.Tensor | None,
    labels: torch.Tensor,
    z_loss: float,
    ignore_index: int,
    chunk: int,
    want_correct: bool,
    per_row: bool,
    need: list[bool],
) -> tuple[torch.Tensor, ...]:
    N = hidden.shape[0]
    f32 = _acc_dtype(hidden.dtype)
    rows = _Rows(labels, ignore_index)
    h = _gathered(hidden, rows.index)
    y = rows.labels(labels)
    w = rows.weights(weights, f32)
    M = h.shape[0]
    need_h, need_w, need_b, need_weights = need
    build = not per_row
    grad_h = torch.empty_like(h) if build and need_h else None
    fresh_w = M > 0 and hidden.dtype == f32
    grad_w = _weight_grad_buffer(weight, f32, fresh_w) if build and need_w else None
    grad_b = torch.zeros(bias.shape, dtype=f32, device=bias.device) if build and need_b and bias is not None else None
    correct = torch.zeros(M, dtype=torch.bool, device=hidden.device) if want_correct else None
    ce, lse = _sweep(h, weight, bias, y, w, z_loss, chunk, grad_h=grad_h, grad_w=grad_w, grad_b=grad_b,
                     correct=correct, fresh_w=fresh_w)
    per = ce + z_loss * lse.square() if z_loss else ce
    weighted = per if w is None else per * w
    empty = hidden.new_empty(0)
    out = rows.spread(weighted) if per_row else weighted.sum()
    return tuple(_fresh(
        out,
        rows.spread(ce),
        rows.spread(lse),
        rows.spread(correct) if correct is not None else torch.zeros(N, dtype=torch.bool, device=hidden.device),
        empty if grad_h is None else rows.spread(grad_h),
        empty if grad_w is None else grad_w.to(weight.dtype),
        empty if grad_b is None else grad_b.to(bias.dtype),
        rows.spread(per) if need_weights else empty.to(f32),
    ))


@_fused_op.register_fake
def _fused_fake(hidden, weight, bias, weights, labels, z_loss, ignore_index, chunk, want_correct, per_row, need):
    N, H = hidden.shape
    f32 = _acc_dtype(hidden.dtype)
    need_h, need_w, need_b, need_weights = need
    build = not per_row

    def empty(dtype: torch.dtype = hidden.dtype) -> torch.Tensor:  # a new one each time: outputs never alias
        return hidden.new_empty(0, dtype=dtype)

    return (
        hidden.new_empty((N,) if per_row else (), dtype=f32),
        hidden.new_empty(N, dtype=f32),
        hidden.new_empty(N, dtype=f32),
        hidden.new_empty(N, dtype=torch.bool),
        hidden.new_empty(N, H) if build and need_h else empty(),
        weight.new_empty(weight.shape) if build and need_w else empty(),
        bias.new_empty(bias.shape) if build and need_b and bias is not None else empty(),
        hidden.new_empty(N, dtype=f32) if need_weights else empty(f32),
    )


def _fused_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, weights, labels, z_loss, ignore_index, chunk, _, per_row, _ = inputs
    _, _, _, _, grad_h, grad_w, grad_b, per = output
    ctx.per_row = per_row
    ctx.settings = (z_loss, ignore_index, chunk)
    ctx.has_bias = bias is not None
    ctx.has_weights = weights is not None
    if per_row:
        ctx.save_for_backward(hidden, weight, bias, weights, labels, per)
    else:
        ctx.save_for_backward(grad_h, grad_w, grad_b, per)
    ctx.mark_non_differentiable(*output[1:])


def _fused_backward(ctx, grad_out, *_):
    need_h, need_w, need_b, need_weights = ctx.needs_input_grad[:4]
    tail = (None,) * 7
    if not ctx.per_row:
        gh, gw, gb, per = ctx.saved_tensors
        # Out of place, so a retained graph can be differentiated again (gradcheck does).
        return (
            gh * grad_out.to(gh.dtype) if need_h and gh.numel() else None,
            gw * grad_out.to(gw.dtype) if need_w and gw.numel() else None,
            gb * grad_out.to(gb.dtype) if need_b and ctx.has_bias and gb.numel() else None,
            per * grad_out if need_weights and ctx.has_weights else None,
            *tail,
        )
    hidden, weight, bias, weights, labels, per = ctx.saved_tensors
    z_loss, ignore_index, chunk = ctx.settings
    g = grad_out.to(_acc_dtype(hidden.dtype))
    w = g if weights is None else g * weights.to(g.dtype)
    gh, gw, gb = torch.ops.dualobj.fused_linear_ce_backward(
        hidden, weight, bias, w, labels, z_loss, ignore_index, chunk, [need_h, need_w, need_b and bias is not None])
    return (
        gh if need_h else None,
        gw if need_w else None,
        gb if need_b and bias is not None else None,
        (per * g).to(weights.dtype) if need_weights and weights is not None else None,
        *tail,
    )


@torch.library.custom_op(
    "dualobj::fused_linear_ce_backward",
    mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor row_weights, Tensor labels, float z_loss, "
    "int ignore_index, int chunk, bool[] need) -> (Tensor, Tensor, Tensor)",
)
def _fused_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_weights: torch.Tensor,
    labels: torch.Tensor,
    z_loss: float,
    ignore_index: int,
    chunk: int,
    need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sweep again, with the upstream per-row gradient folded into ``row_weights``: ``(gh, gw, gb)``."""
    with torch.autocast(hidden.device.type, enabled=False):
        acc = _acc_dtype(hidden.dtype)
        rows = _Rows(labels, ignore_index)
        h = _gathered(hidden, rows.index)
        need_h, need_w, need_b = need
        grad_h = torch.empty_like(h) if need_h else None
        fresh_w = h.shape[0] > 0 and hidden.dtype == acc
        grad_w = _weight_grad_buffer(weight, acc, fresh_w) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b and bias is not None else None
        _sweep(h, weight, bias, rows.labels(labels), rows.weights(row_weights, acc), z_loss, chunk,
               grad_h=grad_h, grad_w=grad_w, grad_b=grad_b, fresh_w=fresh_w)
        empty = hidden.new_empty(0)
        return tuple(_fresh(
            empty if grad_h is None else rows.spread(grad_h),
            empty if grad_w is None else grad_w.to(weight.dtype),
            empty if grad_b is None else grad_b.to(bias.dtype),
        ))


@_fused_backward_op.register_fake
def _fused_backward_fake(hidden, weight, bias, row_weights, labels, z_loss, ignore_index, chunk, need):
    need_h, need_w, need_b = need
    return (
        hidden.new_empty(hidden.shape) if need_h else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_w else hidden.new_empty(0),
        bias.new_empty(bias.shape) if need_b and bias is not None else hidden.new_empty(0),
    )


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def _fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weights: torch.Tensor | None,
    labels: torch.Tensor,
    z_loss: float,
    ignore_index: int,
    chunk: int,
    want_correct: bool,
    per_row: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused op: ``(out, ce [N], lse [N], correct [N])``, autocast applied to the output layer as autograd
    would have applied it to ``F.linear``."""
    grad_on = torch.is_grad_enabled()

    def wants(x: torch.Tensor | None) -> bool:
        return grad_on and x is not None and x.requires_grad

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast would have run the output layer in its low-precision dtype: do the same, explicitly.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    need = [wants(hidden), wants(weight), wants(bias), wants(weights)]
    out, ce, lse, correct, *_ = torch.ops.dualobj.fused_linear_ce(
        hidden, weight, bias, weights, labels, float(z_loss), int(ignore_index), int(chunk), want_correct, per_row,
        need)
    return out, ce, lse, correct


def _native_does_it(
    hidden: torch.Tensor, weights: torch.Tensor | None, z_loss: float, reduction: str, return_accuracy: bool
) -> bool:
    """Whether torch's own chunked ``F.linear_cross_entropy`` (torch >= 2.13) computes exactly what was asked:
    no per-token weights, no z-loss, a scalar reduction, no accuracy, float32 or lower outside autocast. Inside
    ``torch.compile`` the library's op is used instead (torch's op would break the graph)."""
    return (
        _HAS_NATIVE
        and weights is None
        and not z_loss
        and reduction != "none"
        and not return_accuracy
        and hidden.dtype != torch.float64
        and not torch.is_autocast_enabled(hidden.device.type)
        and not torch.compiler.is_compiling()
    )


def _native_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    chunk: int,
) -> torch.Tensor:
    """The unweighted CE sum through torch's chunked op (which also builds its gradients in the forward)."""
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
    total = torch.nn.functional.linear_cross_entropy(hidden, weight, labels, linear_bias=bias, reduction="sum",
                                                     ignore_index=ignore_index, options=options)
    return total.float()


def _check_common(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z_loss: float,
    chunk_size: int | None,
    head_name: str = "weight",
) -> int:
    """Validate the arguments shared by the two entry points; return the chunk size to use.

    Structural checks always run; the NaN/inf checks of ``hidden``, the head and the bias only while validation is
    on (:func:`dualobj.set_validation`), since on an accelerator they read values back to the host.
    """
    H = hidden.shape[-1]
    check_tensor(head_name, weight, ndim=2, floating=True)
    if _is_dtensor(weight):
        raise fail(head_name, "an unsharded weight (under FSDP2 pass the fully_shard-ed output module itself as "
                   "head=, or run the loss inside a module whose forward FSDP hooks)", "a sharded DTensor")
    if weight.shape[1] != H:
        raise fail(head_name, f"an output-layer weight of shape [V, H={H}]", f"shape {list(weight.shape)}")
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if weight.dtype != hidden.dtype and not autocast:
        raise fail(head_name, f"dtype {hidden.dtype} (the dtype of hidden)", str(weight.dtype))
    if weight.device != hidden.device:
        raise fail(head_name, f"a tensor on {hidden.device} (the device of hidden)", str(weight.device))
    V = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, shape=(V,), floating=True)
        if bias.dtype != hidden.dtype and not autocast:
            raise fail("bias", f"dtype {hidden.dtype} (the dtype of hidden)", str(bias.dtype))
    check_number("z_loss", z_loss, low=0)
    if validation_enabled():
        check_finite("hidden", hidden)
        check_finite(head_name, weight)
        if bias is not None:
            check_finite("bias", bias)
    if chunk_size is None:
        return default_chunk_size(V)
    return check_int("chunk_size", chunk_size, low=1)


def _is_dtensor(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``DTensor`` (a sharded FSDP2 parameter outside its module's forward)."""
    return type(x).__name__ == "DTensor" and hasattr(x, "placements")


def resolve_head(
    head: torch.Tensor | torch.nn.Module, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(weight, bias)`` of an output layer given as a weight tensor or an ``nn.Linear``.

    Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a module's parameters are sharded ``DTensor`` s except
    inside that module's forward. When ``head`` is itself an FSDP2 unit (``fully_shard(model.lm_head)``), its
    parameters are gathered here with ``head.unshard()``: the loss then reads the full weight, its gradient lands on
    the unsharded parameter, and FSDP reduce-scatters it and reshards the unit at the end of the backward, as it
    does for any unit that ran without its own forward. A head that belongs to a larger unit (tied embeddings, or
    an output layer sharded with the root module) is already unsharded after the model's forward.

    Args:
        head: ``[V, H]`` weight, an ``nn.Linear``, or an ``nn.Embedding`` whose weight is tied to the output
            (either possibly ``fully_shard``-ed).
        bias: ``[V]`` bias; taken from the ``nn.Linear`` when ``None``.

    Returns:
        The weight and the bias to use.
    """
    if isinstance(head, torch.nn.Module):
        if not isinstance(head, (torch.nn.Linear, torch.nn.Embedding)):
            raise fail_type("head", "an output-layer weight [V, H], an nn.Linear or a tied nn.Embedding",
                            type(head).__name__)
        unshard = getattr(head, "unshard", None)
        if callable(unshard) and _is_dtensor(head.weight):
            unshard()
        if isinstance(head, torch.nn.Linear):
            bias = head.bias if bias is None else bias
        head = head.weight
    return head, bias


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    z_loss: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    reduction: str = "sum",
    return_accuracy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Weighted cross-entropy of the output layer applied to ``hidden``, without building the ``[N, V]`` logits.

    .. math::
        \ell_n = x_n W^\top + b, \qquad
        \text{total} = \sum_{n:\,y_n \ne \text{ignore}} w_n\big(\mathrm{CE}(\ell_n, y_n)
            + \zeta\,\mathrm{lse}(\ell_n)^2\big)

    Only the labelled rows go through the output layer, ``chunk_size`` rows at a time, so the extra memory is one
    ``[chunk_size, V]`` float32 buffer pair plus the gradients. The per-token weights enter the fused computation:
    for ``"sum"`` and ``"mean"`` the gradients of ``hidden``, ``weight`` and ``bias`` are computed during the
    forward and the backward only rescales them (no second pass over the vocabulary). Double backward is not
    supported. The CE, the log-sum-exp and the gradient of the logits are computed in float32 whatever the input
    dtype; the matrix products run in the input dtype. The sweep is one custom operator (``dualobj::
    fused_linear_ce``, with a fake implementation and an autograd formula), so ``torch.compile(fullgraph=True)``
    traces through it as a single node. Without weights, z-loss or accuracy, with a scalar reduction, torch's own
    chunked ``F.linear_cross_entropy`` (torch >= 2.13) does exactly this job and is used instead (in eager mode).
    While validation is on (the default) NaN/inf in ``hidden``, ``weight``, ``bias`` or ``weights`` and labels
    outside ``[0, V)`` are refused; these checks read values, so turn validation off
    (:func:`dualobj.set_validation`) to avoid their device-to-host syncs on an accelerator.

    Args:
        hidden: ``[N, H]`` hidden states (float32, bfloat16 or float16).
        weight: ``[V, H]`` output-layer weight, same dtype and device as ``hidden``.
        labels: ``[N]`` int64 targets in ``[0, V)``, or ``ignore_index`` for rows with no loss.
        weights: ``[N]`` per-token weights (any float dtype, used in float32), or ``None`` for 1. Weights may
            require grad: their gradient is the per-row ``CE + ζ·lse²``.
        bias: ``[V]`` output-layer bias or ``None``.
        z_loss: ``ζ``, coefficient of the ``logsumexp²`` penalty (PaLM), weighted like the CE.
        ignore_index: label value of rows with no loss.
        chunk_size: rows per chunk; ``None`` picks the power of two nearest ``2**25 / V``.
        reduction: ``"sum"`` (the weighted total), ``"mean"`` (the total over the number of labelled rows, 0 when
            there are none) or ``"none"`` (``[N]`` per-row weighted values, 0 at ignored rows; its backward
            recomputes the chunks, since each row's upstream gradient is known only then).
        return_accuracy: also return the detached fraction of labelled rows whose arg-max logit is the label.

    Returns:
        The loss (float32 scalar, or ``[N]`` for ``"none"``), or ``(loss, accuracy)`` with ``return_accuracy``.
        An all-ignored input gives 0 with zero gradients.

    Example:
        >>> import torch
        >>> from dualobj.objectives import linear_cross_entropy
        >>> h, W = torch.randn(6, 4), torch.randn(10, 4)
        >>> y = torch.tensor([1, 2, -100, 3, 4, -100])
        >>> naive = torch.nn.functional.cross_entropy(h @ W.T, y, reduction="sum")
        >>> torch.allclose(linear_cross_entropy(h, W, y, chunk_size=2), naive, atol=1e-5)
        True
    """
    check_tensor("hidden", hidden, ndim=2, floating=True)
    N = hidden.shape[0]
    check_tensor("labels", labels, shape=(N,), integer=True)
    if weights is not None:
        check_tensor("weights", weights, shape=(N,), floating=True)
    check_choice("reduction", reduction, REDUCTIONS)
    ignore_index = check_int("ignore_index", ignore_index)
    check_bool("return_accuracy", return_accuracy)
    chunk = _check_common(hidden, weight, bias, z_loss, chunk_size)
    check_labels(labels, weight.shape[0], ignore_index=ignore_index)
    if weights is not None:
        check_finite("weights", weights)
    if _native_does_it(hidden, weights, z_loss, reduction, return_accuracy):
        out = _native_sum(hidden, weight, labels, bias, ignore_index, chunk)
    else:
        out, _, _, correct = _fused(hidden, weight, bias, weights, labels, z_loss, ignore_index, chunk,
                                    return_accuracy, reduction == "none")
    count = (labels != ignore_index).sum(dtype=torch.float32)
    if reduction == "mean":
        out = out / count.clamp_min(1.0)
    if not return_accuracy:
        return out
    return out, correct.sum(dtype=torch.float32) / count.clamp_min(1.0)


def score_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: Batch,
    *,
    bias: torch.Tensor | None = None,
    z_loss: float = 0.0,
    normalize: str = "valid",
    chunk_size: int | None = None,
) -> LossOutput:
    """Score hidden states ``[B, L, H]`` against ``batch`` through the output layer ``weight [V, H]`` (+ ``bias [V]``).

    Gives the same :class:`LossOutput` (loss, total, count and metrics) as
    ``cross_entropy(hidden @ weight.T + bias, batch, z_loss=z_loss, normalize=normalize)``, through
    :func:`linear_cross_entropy`'s fused path: only labelled positions are projected, so an MD batch with half its
    positions masked costs about half, and the ``[B, L, V]`` logits are never built.

    Args:
        hidden: ``[B, L, H]`` final hidden states.
        weight: ``[V, H]`` output-layer weight (same dtype as ``hidden``).
        batch: from an objective's ``prepare``; ``labels`` and ``weights`` are ``[B, L]``.
        bias: ``[V]`` output-layer bias or ``None``.
        z_loss: coefficient of the ``logsumexp²`` penalty.
        normalize: the loss denominator (see :data:`dualobj.objectives.NORMALIZERS`).
        chunk_size: rows per chunk (``None``: chosen from ``V``).

    Returns:
        :class:`LossOutput`.
    """
    check_tensor("hidden", hidden, floating=True)
    check_batch_against(hidden.shape, batch, "hidden", "hidden states")
    chunk = _check_common(hidden, weight, bias, z_loss, chunk_size, head_name="head")
    check_choice("normalize", normalize, NORMALIZERS)
    check_labels(batch.labels, weight.shape[0])
    check_finite("batch.weights", batch.weights)
    B, L = batch.shape
    total, ce, lse, correct = _fused(hidden.reshape(B * L, -1), weight, bias, batch.weights.reshape(-1),
                                     batch.labels.reshape(-1), z_loss, IGNORE_INDEX, chunk, True, False)
    lse_sq = lse.square().view(B, L) if z_loss > 0 else None
    return finish(total, ce.view(B, L), correct.view(B, L), lse_sq, batch, normalize)
