"""Seeded random draws that give the same numbers whatever device the data lives on.

Every random function in dualobj takes ``generator: torch.Generator | None``. Draws are made on the generator's
own device and then moved to the data's device, so one CPU generator seeded the same way yields the same masks
for CPU and CUDA batches, independently of the global RNG state. Passing a CUDA generator keeps the draw on the
GPU (fastest; reproducible on that device). With ``generator=None`` the global RNG of ``device`` is used.
"""

from __future__ import annotations

import torch


def draw_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    """The device a draw is made on: the generator's own, else ``device``."""
    return torch.device(generator.device) if generator is not None else torch.device(device)


def rand(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` on ``device``, made on the generator's device."""
    out = torch.rand(tuple(shape), generator=generator, device=draw_device(generator, device), dtype=dtype)
    return out.to(device, non_blocking=True)


def randint(
    low: int,
    high: int,
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Integer draws in [low, high) of ``shape`` and ``dtype`` on ``device``, made on the generator's device."""
    out = torch.randint(low, high, tuple(shape), generator=generator, device=draw_device(generator, device),
                        dtype=dtype)
    return out.to(device, non_blocking=True)
