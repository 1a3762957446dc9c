"""Which positions of a batch may be corrupted at all."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dualobj._errors import check_ids, check_int, check_tensor, describe, fail


def maskable_positions(
    tokens: torch.Tensor,
    *,
    special_ids: Sequence[int] | torch.Tensor | None = None,
    num_special: int | None = None,
    pad_id: int | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions that may be masked: not a special id, not padding, not inside a prompt.

    Args:
        tokens: ``[B, L]`` integer ids.
        special_ids: ids never masked (for example BOS, EOS, ``<mask>`` itself).
        num_special: ids ``< num_special`` are special (the paper's tokenizer reserves the first 16).
        pad_id: the padding id, never masked.
        prompt_lengths: ``[B]`` integers; positions ``< prompt_lengths[b]`` of row ``b`` are never masked.

    Returns:
        ``[B, L]`` bool, ``True`` where masking is allowed.
    """
    check_tensor("tokens", tokens, ndim=2, integer=True)
    B, L = tokens.shape
    conditions = []
    if special_ids is not None:
        ids = torch.as_tensor(special_ids, device=tokens.device).reshape(-1)
        if ids.is_floating_point():
            raise fail("special_ids", "integer ids", describe(special_ids))
        if ids.numel():
            conditions.append(~torch.isin(tokens, ids))
    if num_special is not None:
        check_int("num_special", num_special, low=0)
        conditions.append(tokens >= num_special)
    if pad_id is not None:
        check_int("pad_id", pad_id)
        conditions.append(tokens != pad_id)
    if prompt_lengths is not None:
        check_tensor("prompt_lengths", prompt_lengths, shape=(B,), integer=True)
        check_ids("prompt_lengths", prompt_lengths)  # no negative length (a value check)
        positions = torch.arange(L, device=tokens.device)
        conditions.append(positions[None, :] >= prompt_lengths.to(tokens.device)[:, None])
    if not conditions:
        return torch.ones(B, L, dtype=torch.bool, device=tokens.device)
    out = conditions[0]
    for condition in conditions[1:]:
        out &= condition
    return out
