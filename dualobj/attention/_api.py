"""The one attention call and the report of which backends run on a device."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dualobj._errors import check_number, check_tensor, describe, fail, fail_type
from dualobj.attention._backends import BACKENDS, Backend
from dualobj.attention._spec import AttentionLayout, AttentionSpec


@dataclass(frozen=True)
class BackendStatus:
    """Whether one backend runs on a device, found by a tiny real call (mixed rows, two packed documents).

    Attributes:
        name: the backend's name.
        forward: the forward pass ran and matched ``"math"``.
        backward: the backward pass ran too (training works).
        reason: why it does not run (or runs forward only), ``None`` when it fully works.
    """

    name: str
    forward: bool
    backward: bool
    reason: str | None = None


def _device_key(device: torch.device | str | None) -> torch.device:
    if device is not None and not isinstance(device, (str, torch.device)):
        raise fail_type("device", "a torch.device, a device string or None", describe(device))
    try:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    except RuntimeError as err:
        raise fail("device", "a valid device such as 'cpu' or 'cuda:0'", repr(device)) from err
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _probe(backend: Backend, device: torch.device, dtype: torch.dtype) -> BackendStatus:
    reason = backend.unavailable(device, dtype)
    if reason is not None:
        return BackendStatus(backend.name, False, False, reason)
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 6, 2, 16
    try:
        q, k, v = (torch.randn(B, T, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        spec = AttentionSpec.build(
            B, T, torch.tensor([True, False]), torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]), device=device
        )
    except Exception as exc:  # the device itself is not usable from this torch
        return BackendStatus(backend.name, False, False, f"no {device} here: {type(exc).__name__}: {exc}")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        with torch.no_grad():
            out = backend(q, k, v, spec, D**-0.5)
            ref = BACKENDS["math"](q, k, v, spec, D**-0.5)
        if not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
            return BackendStatus(backend.name, False, False, "its output differs from the 'math' reference")
    except Exception as exc:  # any failure means "does not run here"; the message is reported
        return BackendStatus(backend.name, False, False, f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    try:
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
        backend(qg, kg, vg, spec, D**-0.5).float().square().sum().backward()
    except Exception as exc:
        return BackendStatus(backend.name, True, False, f"forward only: {type(exc).__name__}: {str(exc).strip()[:300]}")
    return BackendStatus(backend.name, True, True, None)


@functools.cache
def _status(device: torch.device, dtype: torch.dtype) -> dict[str, BackendStatus]:
    return {name: _probe(b, device, dtype) for name, b in BACKENDS.items()}


def available_backends(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, BackendStatus]:
    """Which attention backends really run on ``device`` (a tiny real forward and backward each, cached).

    Args:
        device: where to try (default the CPU).
        dtype: the data type to try.

    Returns:
        ``{name: BackendStatus}`` for every named backend, in preference order (xformers, sdpa, flex, math);
        a backend that does not run carries the reason (for xformers: the torch and CUDA build it was compiled
        for against the one installed, and what to install).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise fail_type("dtype", "a floating torch.dtype such as torch.float32", describe(dtype))
    return dict(_status(_device_key(device), dtype))


def _auto(q: torch.Tensor, spec: AttentionSpec) -> Backend:
    """``"auto"``: xformers where its kernels run (not for prefixes or blocks), then Flex for document and
    block-diffusion masks on accelerators, then SDPA, else math. On the CPU: SDPA (no probing)."""
    if q.device.type == "cpu":
        return BACKENDS["sdpa"]
    status = _status(_device_key(q.device), q.dtype)
    if q.device.type == "cuda":
        if spec.prefix_lengths is None and spec.block_size is None and status["xformers"].backward:
            return BACKENDS["xformers"]
        if (spec.doc_ids is not None or spec.block_size is not None) and status["flex"].backward:
            return BACKENDS["flex"]
    return BACKENDS["sdpa"] if status["sdpa"].backward else BACKENDS["math"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: AttentionLayout | None = None,
    causal: bool | torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
    backend: str | Backend = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention that switches between causal and bidirectional per call or per row, with packed
    documents, prefix-LM rows or the block-diffusion layout.

    Query ``i`` of row ``b`` attends key ``j`` when both are in the same packed document and
    ``not causal[b] or j <= i or j < prefix_lengths[b]``; with a block-diffusion layout the rule is that of
    :func:`~dualobj.attention.block_diffusion_mask`. Give the layout either as one
    :class:`~dualobj.attention.AttentionLayout` (``layout=``, for example ``batch.layout``) or by the keywords
    ``causal`` / ``doc_ids`` / ``prefix_lengths``, not both.

    Args:
        q: ``[B, T, H, D]`` queries (floating point).
        k: ``[B, T, H, D]`` keys, same shape, dtype and device as ``q``.
        v: ``[B, T, H, D]`` values, same shape, dtype and device as ``q``.
        layout: the whole layout as one object (required for block diffusion).
        causal: a Python bool for every row, or a bool tensor ``[B]`` on any device (keep it on the CPU, as
            :class:`dualobj.objectives.Batch` does, so mixed rows can be grouped without a device sync).
        doc_ids: ``[B, T]`` integer ids of packed documents (a document is a maximal run of equal ids);
            attention never crosses a document boundary.
        prefix_lengths: ``[B]`` integers: prefix-LM rows (in causal rows, the first ``P`` positions are visible
            to all queries).
        backend: ``"auto"``, ``"xformers"``, ``"sdpa"``, ``"flex"``, ``"math"``, or any
            :class:`~dualobj.attention.Backend`. ``"auto"`` picks xformers where its CUDA kernels run (no
            prefixes or blocks), else Flex for document and block-diffusion masks on CUDA, else SDPA.
        scale: score scale, a finite number > 0; default ``D ** -0.5``.

    Returns:
        ``[B, T, H, D]`` in the dtype of ``q``.

    Raises:
        DualObjError: for a shape, dtype or device mismatch, a ``causal`` / ``doc_ids`` / ``prefix_lengths`` of
            the wrong shape or dtype, both or neither of ``layout`` and ``causal``, the ``causal`` tensor of a
            block-diffusion batch without its layout (named ``layout``), a bad ``scale``, an unknown backend, or
            a forced backend that cannot run here (the message says why and what to install).
    """
    check_tensor("q", q, ndim=4, floating=True)
    B, T, H, D = q.shape
    if min(B, T, H, D) == 0:
        raise fail("q", "a non-empty [B, T, H, D] tensor", describe(q))
    for name, x in (("k", k), ("v", v)):
        check_tensor(name, x, shape=(B, T, H, D))
        if x.dtype != q.dtype or x.device != q.device:
            raise fail(name, f"dtype {q.dtype} on {q.device} (those of q)", f"{x.dtype} on {x.device}")
    if layout is not None:
        if not isinstance(layout, AttentionLayout):
            raise fail_type("layout", "an AttentionLayout (for example batch.layout) or None", describe(layout))
        if causal is not None or doc_ids is not None or prefix_lengths is not None:
            raise fail("layout", "either layout= or the causal/doc_ids/prefix_lengths keywords",
                       "both")
        spec = layout.spec(B, T, device=q.device)
    else:
        if causal is None:
            raise fail("causal", "a bool or a [B] bool tensor (or pass layout=)", "None")
        spec = AttentionSpec.build(B, T, causal, doc_ids, prefix_lengths, device=q.device)
    scale = D**-0.5 if scale is None else check_number("scale", scale, low=0.0, low_open=True)
    if isinstance(backend, str):
        if backend == "auto":
            impl = _auto(q, spec)
            if impl is not BACKENDS["xformers"]:
                return impl(q, k, v, spec, scale)
            try:
                return impl(q, k, v, spec, scale)
            except NotImplementedError:  # no xformers kernel for these inputs (head dim, dtype, ...)
                return BACKENDS["sdpa"](q, k, v, spec, scale)
        if backend not in BACKENDS:
            raise fail("backend", "one of " + ", ".join(repr(n) for n in ("auto", *BACKENDS)), repr(backend))
        impl = BACKENDS[backend]
    elif isinstance(backend, Backend):
        impl = backend
    else:
        raise fail("backend", "a backend name or a Backend", describe(backend))
    reason = impl.unavailable(q.device, q.dtype)
    if reason is not None:
        raise fail("backend", f"a backend that runs on {q.device} with {q.dtype}", f"{impl.name!r}: {reason}")
    return impl(q, k, v, spec, scale)
