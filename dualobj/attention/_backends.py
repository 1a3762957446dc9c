"""The attention backends: plain softmax (``math``), PyTorch SDPA, FlexAttention and xformers.

Each backend is a callable ``backend(q, k, v, spec, scale) -> out`` with q, k, v and out ``[B, T, H, D]``
and ``spec`` an :class:`~dualobj.attention.AttentionSpec`; ``backend.unavailable(device, dtype)`` gives the reason it
cannot run on a device (``None`` when nothing rules it out before a real call). All give the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from dualobj._errors import fail
from dualobj.attention._spec import AttentionSpec

INSTALL_XFORMERS = (
    "install the xformers wheel built for this torch and CUDA: pip install xformers --index-url "
    "https://download.pytorch.org/whl/cuXYZ, with XYZ from torch.version.cuda (12.8 gives cu128)"
)


@runtime_checkable
class Backend(Protocol):
    """What :func:`dualobj.attention.attention` needs of a backend.

    Attributes:
        name: short name used in messages and by ``backend=`` (e.g. ``"sdpa"``).
    """

    name: str

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run on ``device`` with ``dtype``, or ``None`` if nothing rules it out."""
        ...

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float
    ) -> torch.Tensor:
        """Attention of ``q, k, v`` ``[B, T, H, D]`` under ``spec``; returns ``[B, T, H, D]``."""
        ...


RowRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, torch.Tensor], torch.Tensor]


def split_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: torch.Tensor, run: RowRun) -> torch.Tensor:
    """Run mixed causal/bidirectional rows as one call per row group, then put the rows back in order.

    Rows already grouped (all causal rows before all bidirectional ones, or after) are split as views, with no
    copy; otherwise the rows are gathered causal-first once and the output scattered back once.

    Args:
        q, k, v: ``[B, T, H, D]``.
        causal: ``[B]`` CPU bool with both values present.
        run: ``run(q_g, k_g, v_g, is_causal, rows)`` for one group; ``rows`` are the group's original row
            indices (CPU int64).

    Returns:
        ``[B, T, H, D]``.
    """
    B = causal.shape[0]
    n = int(causal.sum())
    rows_all = torch.arange(B)
    if bool(causal[:n].all()):
        order, sizes, flags = None, [n, B - n], [True, False]
    elif bool(causal[B - n :].all()):
        order, sizes, flags = None, [B - n, n], [False, True]
    else:
        order = torch.argsort((~causal).to(torch.int8), stable=True)
        sizes, flags = [n, B - n], [True, False]
    if order is not None:
        idx = order.to(q.device)
        q, k, v = (x.index_select(0, idx) for x in (q, k, v))
        rows_all = order
    qs, ks, vs, rs = (x.split(sizes) for x in (q, k, v, rows_all))
    out = torch.cat([run(qg, kg, vg, flag, rg) for qg, kg, vg, rg, flag in zip(qs, ks, vs, rs, flags)])
    if order is not None:
        out = out.index_select(0, torch.argsort(order).to(q.device))
    return out


class MathBackend:
    """Plain softmax attention, computed in float32 (float64 for float64 inputs) and cast back: the reference
    every backend is tested against.

    Materialises the ``[B, H, T, T]`` scores, so it costs O(B·H·T²) memory.
    """

    name = "math"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float
    ) -> torch.Tensor:
        work = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
        scores = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
        mask = spec.mask(q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(work)).to(q.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kw: Any) -> torch.Tensor:
    """SDPA on ``[B, T, H, D]`` inputs through transposed views; the output comes back as ``[B, T, H, D]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, **kw)
    return out.transpose(1, 2)


class SDPABackend:
    """``torch.nn.functional.scaled_dot_product_attention``.

    Uniform rows use ``is_causal`` or no mask (flash kernels, which skip fully masked blocks); mixed rows run as
    one call per row group (causal rows keep the ``is_causal`` skip); documents, prefixes and the block-diffusion
    layout use a boolean ``[B, 1, T, T]`` mask in one call. While ``torch.compile`` traces, a causal tensor goes
    into the mask too.
    """

    name = "sdpa"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float
    ) -> torch.Tensor:
        causal = spec.host_causal() if spec.dense else None
        if isinstance(causal, bool):
            return _sdpa(q, k, v, scale, is_causal=causal)
        if causal is not None:
            return split_rows(q, k, v, causal, lambda q, k, v, flag, rows: _sdpa(q, k, v, scale, is_causal=flag))
        return _sdpa(q, k, v, scale, attn_mask=spec.mask(q.device))


def block_diffusion_mask_mod(length: int, block_size: int, segments: torch.Tensor | None) -> Callable[..., Any]:
    """The FlexAttention ``mask_mod`` of :func:`~dualobj.attention.block_diffusion_mask` (``segments``: the
    ``[B, L]`` document segments, or ``None``)."""

    def mask_mod(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        qn, kn = qi < length, ki < length
        qp = torch.where(qn, qi, qi - length)
        kp = torch.where(kn, ki, ki - length)
        qb, kb = qp // block_size, kp // block_size
        ok = (qn & kn & (qb == kb)) | (qn & ~kn & (kb < qb)) | (~qn & ~kn & (kb <= qb))
        if segments is not None:
            ok = ok & (segments[b, qp] == segments[b, kp])
        return ok

    return mask_mod


@functools.lru_cache(maxsize=64)
def block_diffusion_block_mask(length: int, block_size: int, device: torch.device) -> Any:
    """The FlexAttention ``BlockMask`` of the block-diffusion layout without documents, cached per
    ``(L, block_size, device)``: building it can cost more than the attention it serves."""
    from torch.nn.attention.flex_attention import create_block_mask

    mod = block_diffusion_mask_mod(length, block_size, None)
    return create_block_mask(mod, None, None, 2 * length, 2 * length, device=device)


class FlexBackend:
    """FlexAttention with one ``mask_mod`` holding the per-row causal flag, the documents and the prefixes, or
    the block-diffusion rule (its ``BlockMask`` cached per ``(L, block_size, device)`` when there are no documents).

    Compiled with ``torch.compile`` on accelerators (block-sparse kernel, trains). On the CPU, torch runs it
    forward only, eagerly (the full score matrix is materialised): useful to check numbers, not to train.
    """

    name = "flex"

    def __init__(self) -> None:
        self._compiled: Callable[..., torch.Tensor] | None = None

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            import torch.nn.attention.flex_attention
        except ImportError as exc:  # pragma: no cover - torch < 2.5
            return f"torch {torch.__version__} has no FlexAttention ({exc}); upgrade torch to 2.5 or later"
        return None

    def _kernel(self, device: torch.device) -> Callable[..., torch.Tensor]:
        from torch.nn.attention.flex_attention import flex_attention

        if device.type == "cpu":
            return flex_attention
        if self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float
    ) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask

        if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise fail(
                "backend",
                "'sdpa' or 'math' for training on the CPU, or 'flex' on CUDA",
                f"'flex', which runs forward only on the CPU in torch {torch.__version__} (FlexAttention has no "
                "CPU backward)",
            )
        B, T = spec.batch, spec.length
        if spec.block_size is not None:
            if spec.doc_ids is None:
                block_mask = block_diffusion_block_mask(T // 2, spec.block_size, _cache_device(q.device))
            else:
                from dualobj.attention._spec import document_segments

                mod = block_diffusion_mask_mod(T // 2, spec.block_size, document_segments(spec.doc_ids))
                block_mask = create_block_mask(mod, B, None, T, T, device=q.device)
            return self._run(q, k, v, block_mask, scale)
        c = spec.causal
        causal_t = c.to(q.device, non_blocking=True) if isinstance(c, torch.Tensor) else None
        seg = None
        if spec.doc_ids is not None:
            from dualobj.attention._spec import document_segments

            seg = document_segments(spec.doc_ids)
        prefix = spec.prefix_lengths
        if spec.dense and c is False:
            block_mask = None
        else:

            def mask_mod(b: Any, h: Any, qi: Any, ki: Any) -> Any:
                ok = ki <= qi
                if causal_t is not None:
                    ok = ok | ~causal_t[b]
                elif c is False:
                    ok = ok | (qi >= 0)
                if prefix is not None:
                    ok = ok | (ki < prefix[b])
                if seg is not None:
                    ok = ok & (seg[b, qi] == seg[b, ki])
                return ok

            block_mask = create_block_mask(mask_mod, B, None, T, T, device=q.device)
        return self._run(q, k, v, block_mask, scale)

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, scale: float) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = self._kernel(q.device)(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale
            )
        return out.transpose(1, 2)


def _cache_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=1)
def import_xformers() -> tuple[Any, Any, str | None]:
    """Import xformers quietly (it logs warnings at import when its kernels do not load).

    Returns:
        ``(xformers.ops, attn_bias module, reason)`` where ``reason`` says why its compiled kernels did not load
        (``None`` when they did). Raises ``ImportError`` when xformers is not installed.
    """
    logger = logging.getLogger("xformers")
    sink = io.StringIO()
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            import xformers
            import xformers._cpp_lib as cpp_lib
            import xformers.ops as xops
            from xformers.ops.fmha import attn_bias
    finally:
        logger.disabled = was_disabled
    reason = None
    exc = getattr(cpp_lib, "_cpp_library_load_exception", None)
    if exc is not None:
        built = "an unknown torch build"
        try:
            with open(os.path.join(os.path.dirname(xformers.__file__), "cpp_lib.json")) as fh:
                meta = json.load(fh)["version"]
            cuda = meta.get("cuda")
            cuda_txt = f"CUDA {cuda // 100}.{cuda % 100}" if cuda else "no CUDA"
            built = f"torch {meta.get('torch')} with {cuda_txt}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        here = f"torch {torch.__version__} with " + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA")
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        reason = (
            f"xformers {getattr(xformers, '__version__', '?')} kernels did not load: built for {built}, "
            f"installed {here} ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); "
            + INSTALL_XFORMERS
        )
    return xops, attn_bias, reason


def xformers_bias(attn_bias: Any, causal: bool, doc_ids: torch.Tensor | None) -> tuple[Any, bool]:
    """The xformers attention bias for one group of rows that share one causal flag.

    Args:
        attn_bias: the ``xformers.ops.fmha.attn_bias`` module.
        causal: the group's causality.
        doc_ids: ``[n, T]`` document ids of the group's rows, or ``None``.

    Returns:
        ``(bias, flatten)``: ``LowerTriangularMask()`` / ``None`` without documents (``flatten=False``); with
        documents a ``BlockDiagonal[Causal]Mask`` over the documents of all rows in order, which needs the
        batch flattened to ``[1, n·T, H, D]`` (``flatten=True``). Reads the document lengths on the host.
    """
    if doc_ids is None:
        return (attn_bias.LowerTriangularMask() if causal else None), False
    n, T = doc_ids.shape
    start = torch.ones(n, T, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:].cpu() != doc_ids[:, :-1].cpu()
    starts = start.flatten().nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([n * T])).tolist()
    cls = attn_bias.BlockDiagonalCausalMask if causal else attn_bias.BlockDiagonalMask
    return cls.from_seqlens(lengths), True


class XFormersBackend:
    """xformers ``memory_efficient_attention`` (imported lazily, only where its CUDA kernels load).

    Uniform rows: ``LowerTriangularMask`` or no bias. Packed documents: ``BlockDiagonalMask`` /
    ``BlockDiagonalCausalMask`` from the document lengths, with the batch flattened as xformers requires. Mixed
    rows: one call per row group. Prefix-LM rows and the block-diffusion layout cannot be written with its
    structured biases and raise.
    """

    name = "xformers"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            _, _, reason = import_xformers()
        except ImportError:
            return "xformers is not installed; " + INSTALL_XFORMERS
        if reason is not None:
            return reason
        if device.type != "cuda":
            return f"xformers kernels run on CUDA devices only, the data is on {device.type}"
        return None

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float
    ) -> torch.Tensor:
        if spec.block_size is not None:
            raise fail(
                "backend",
                "a backend that runs the block-diffusion layout ('flex', 'sdpa' or 'math')",
                "'xformers' (its structured biases cannot express it)",
            )
        if spec.prefix_lengths is not None:
            raise fail(
                "prefix_lengths",
                "None with backend='xformers' (its structured biases cannot express prefix-LM rows; use "
                "backend='sdpa' or 'flex')",
                "a tensor",
            )
        xops, attn_bias, _ = import_xformers()
        causal = spec.host_causal()
        if causal is None:
            causal = spec.causal.cpu()  # type: ignore[union-attr]
        doc_ids = spec.doc_ids

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flag: bool, rows: torch.Tensor) -> torch.Tensor:
            docs = None if doc_ids is None else doc_ids.index_select(0, rows.to(doc_ids.device))
            bias, flatten = xformers_bias(attn_bias, flag, docs)
            if not flatten:
                return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
            n, T, H, _D = q.shape
            flat = [x.reshape(1, n * T, H, x.shape[-1]) for x in (q, k, v)]
            return xops.memory_efficient_attention(*flat, attn_bias=bias, scale=scale).reshape(n, T, H, -1)

        if isinstance(causal, bool):
            return run(q, k, v, causal, torch.arange(spec.batch))
        return split_rows(q, k, v, causal, run)


BACKENDS: dict[str, Backend] = {
    "xformers": XFormersBackend(),
    "sdpa": SDPABackend(),
    "flex": FlexBackend(),
    "math": MathBackend(),
}
"""The named backends (``backend="auto"`` chooses among them; see :func:`dualobj.attention.attention`)."""
