"""The library's one exception type and the small validation helpers every module uses.

Every message names the argument, what was expected and what was received, for example::

    DualObjError: labels: expected shape [B, L] = [4, 128] (the shape of input_ids), got [4, 127]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DualObjError(ValueError):
    """Raised for bad input anywhere in dualobj. A ``ValueError``, so existing handlers keep working."""


def fail(argument: str, expected: str, got: object) -> DualObjError:
    """Build the error for ``argument``: ``"<argument>: expected <expected>, got <got>"``."""
    return DualObjError(f"{argument}: expected {expected}, got {got}")


def describe(x: object) -> str:
    """A short description of a received value for error messages (shape and dtype for tensors)."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return repr(x)


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    floating: bool = False,
    integer: bool = False,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of the stated rank, shape (``None`` = any size) and dtype kind."""
    if not isinstance(x, torch.Tensor):
        raise fail(name, "a torch.Tensor", describe(x))
    if ndim is not None and x.ndim != ndim:
        raise fail(name, f"a {ndim}-D tensor", describe(x))
    if shape is not None:
        want = list(shape)
        ok = x.ndim == len(want) and all(w is None or w == s for w, s in zip(want, x.shape))
        if not ok:
            shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            raise fail(name, f"shape {shown}", f"shape {list(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise fail(name, "dtype in " + ", ".join(str(d) for d in dtypes), str(x.dtype))
    if floating and not x.is_floating_point():
        raise fail(name, "a floating-point tensor", str(x.dtype))
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise fail(name, "an integer tensor", str(x.dtype))
    return x


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise fail(name, "one of " + ", ".join(repr(c) for c in choices), repr(value))


def check_probability(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """Check a Python number in [0, 1] (with open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, "a number in [0, 1]", describe(value))
    v = float(value)
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (lo_ok and hi_ok) or v != v:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise fail(name, f"a number in {interval}", repr(value))
    return v
