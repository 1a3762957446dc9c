"""Rotary position embeddings (RoPE), "rotate-half" layout (GPT-NeoX / Llama in Hugging Face).

The head dimension ``D`` is split into two halves ``x1 = x[..., :D/2]`` and ``x2 = x[..., D/2:]``; pair
``(x1[m], x2[m])`` is rotated by the angle ``position · base^(-2m/D)``. Angles and the rotation are computed in
float32 (float64 for float64 inputs) and cast back to the input dtype.
"""

from __future__ import annotations

import torch

from dualobj._errors import check_int, check_number, check_tensor, describe, fail


def rope_frequencies(dim: int, base: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies ``base^(-2m/dim)`` for ``m = 0 .. dim/2 - 1``.

    Args:
        dim: head dimension ``D`` (even).
        base: the RoPE base θ.
        device: where to put the result.

    Returns:
        ``[dim // 2]`` float32.
    """
    if check_int("dim", dim, low=1) % 2:
        raise fail("dim", "a positive even head dimension", describe(dim))
    check_number("base", base, low=0.0, low_open=True)
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, *, base: float = 10000.0, inv_freq: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate queries or keys by their positions.

    Args:
        x: ``[B, T, H, D]`` with ``D`` even.
        positions: ``[T]`` (shared by all rows) or ``[B, T]`` integer or float positions (for example
            :func:`dualobj.attention.document_positions`, which restarts at every packed document).
        base: the RoPE base θ (ignored when ``inv_freq`` is given).
        inv_freq: precomputed :func:`rope_frequencies` ``[D // 2]``.

    Returns:
        ``[B, T, H, D]``, same dtype as ``x``.
    """
    check_tensor("x", x, ndim=4, floating=True)
    B, T, _H, D = x.shape
    if D % 2:
        raise fail("x", "an even head dimension D", describe(x))
    check_tensor("positions", positions)
    if positions.shape not in (torch.Size([T]), torch.Size([B, T])):
        raise fail("positions", f"shape [{T}] or [{B}, {T}]", f"shape {list(positions.shape)}")
    if inv_freq is None:
        inv_freq = rope_frequencies(D, base, device=x.device)
    work = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
    angles = positions.to(device=x.device, dtype=work)[..., None] * inv_freq.to(work)  # [(B,) T, D/2]
    cos, sin = angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)  # [(B,) T, 1, D/2]
    xf = x.to(work)
    x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
