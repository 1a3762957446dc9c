"""The library's exception types, its validation switch, and the checks every module uses.

Every message names the argument, what was expected and what was received, for example::

    DualObjError: labels: expected shape [B, L] = [4, 128] (the shape of input_ids), got [4, 127]

Error policy (``docs/architecture.md``):

- Every public entry point refuses bad arguments with :class:`DualObjError`. A value of the wrong *type* raises
  :class:`DualObjTypeError`, which is both a ``DualObjError`` and a ``TypeError``, so ``except TypeError`` and
  ``except ValueError`` both keep working.
- Structural checks (types, shapes, dtypes, choices, ranges of Python scalars) always run.
- Checks that read tensor *values* (id ranges, NaN/inf) run while validation is on (the default) and are skipped
  when it is off (:func:`set_validation` / :func:`validation`) and while ``torch.compile`` traces. On an accelerator
  such a check is a device→host sync; turn validation off for the last few percent of speed once a run is known
  good.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence

import torch


class DualObjError(ValueError):
    """Raised for bad input anywhere in dualobj. A ``ValueError``, so existing handlers keep working."""


class DualObjTypeError(DualObjError, TypeError):
    """Raised when an argument has the wrong type: both a :class:`DualObjError` and a ``TypeError``."""


def fail(argument: str, expected: str, got: object) -> DualObjError:
    """Build the error for ``argument``: ``"<argument>: expected <expected>, got <got>"``."""
    return DualObjError(f"{argument}: expected {expected}, got {got}")


def fail_type(argument: str, expected: str, got: object) -> DualObjTypeError:
    """Like :func:`fail`, for a value of the wrong type (also a ``TypeError``)."""
    return DualObjTypeError(f"{argument}: expected {expected}, got {got}")


def describe(x: object) -> str:
    """A short description of a received value for error messages (shape and dtype for tensors)."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return repr(x)


# --------------------------------------------------------------------------------------------------------------
# The validation switch.

_VALIDATE = True


def set_validation(enabled: bool) -> None:
    """Turn the value checks (id ranges, NaN/inf: those that read tensor values) on or off, process-wide.

    Structural checks (types, shapes, dtypes, choices) always run. Default: on.
    """
    global _VALIDATE
    if not isinstance(enabled, bool):
        raise fail_type("enabled", "a bool", describe(enabled))
    _VALIDATE = enabled


def validation_enabled() -> bool:
    """Whether value checks run now: the switch is on and ``torch.compile`` is not tracing."""
    return _VALIDATE and not torch.compiler.is_compiling()


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_validation`; restores the previous setting on exit.

    Example:
        >>> import dualobj
        >>> with dualobj.validation(False):
        ...     dualobj.validation_enabled()
        False
        >>> dualobj.validation_enabled()
        True
    """
    global _VALIDATE
    if not isinstance(enabled, bool):
        raise fail_type("enabled", "a bool", describe(enabled))
    previous = _VALIDATE
    _VALIDATE = enabled
    try:
        yield
    finally:
        _VALIDATE = previous


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Refuse NaN/inf in a floating tensor (a value check: only while validation is on)."""
    if validation_enabled() and x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise fail(name, "finite values", f"{bad} NaN/inf of {x.numel()} ({describe(x)})")
    return x


def check_ids(name: str, x: torch.Tensor, *, high: int | None = None, allow: Sequence[int] = ()) -> torch.Tensor:
    """Refuse integer ids ``< 0`` (except those in ``allow``, e.g. ``-100``) or ``>= high`` (a value check)."""
    if not validation_enabled() or x.numel() == 0:
        return x
    ok = x >= 0
    for value in allow:
        ok = ok | (x == value)
    if high is not None:
        ok = ok & (x < high)
    if not bool(ok.all()):
        bad = x[~ok]
        lo, hi = int(bad.min()), int(bad.max())
        allowed = "" if not allow else " (or " + ", ".join(str(a) for a in allow) + ")"
        rng = f"ids in [0, {high})" if high is not None else "ids >= 0"
        raise fail(name, rng + allowed, f"values in [{lo}, {hi}]")
    return x


# --------------------------------------------------------------------------------------------------------------
# Structural checks: Python scalars, tensors, choices.


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """Check a real Python number (not a bool; NaN never passes; inf only with ``finite=False``) in a range.

    Returns it as a ``float``. A wrong type raises :class:`DualObjTypeError`; a value out of range
    :class:`DualObjError`.

    Example:
        >>> check_number("z_loss", 1e-4, low=0)
        0.0001
        >>> check_number("z_loss", True, low=0)
        Traceback (most recent call last):
        ...
        dualobj._errors.DualObjTypeError: z_loss: expected a number >= 0, got True
    """
    expected = "a number" + _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, torch.Tensor):
        raise fail_type(name, expected, describe(value))
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise fail(name, ("a finite number" if finite else "a number") + _interval(low, high, low_open, high_open),
                   repr(value))
    if low is not None and (v < low or (low_open and v == low)):
        raise fail(name, expected, repr(value))
    if high is not None and (v > high or (high_open and v == high)):
        raise fail(name, expected, repr(value))
    return v


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Check a Python integer (not a bool) in ``[low, high]``; returns it as an ``int``.

    Example:
        >>> check_int("block_size", 4, low=1)
        4
        >>> check_int("block_size", 0, low=1)
        Traceback (most recent call last):
        ...
        dualobj._errors.DualObjError: block_size: expected an int >= 1, got 0
    """
    expected = "an int" + _interval(low, high, False, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or isinstance(value, torch.Tensor):
        raise fail_type(name, expected, describe(value))
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise fail(name, expected, repr(value))
    return v


def check_bool(name: str, value: object) -> bool:
    """Check a Python ``bool``."""
    if not isinstance(value, bool):
        raise fail_type(name, "a bool", describe(value))
    return value


def check_generator(name: str, value: object) -> torch.Generator | None:
    """Check a ``torch.Generator`` or ``None``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise fail_type(name, "a torch.Generator or None", describe(value))
    return value


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
        raise fail_type(name, "a torch.Tensor", describe(x))
    if ndim is not None and x.ndim != ndim:
        raise fail(name, f"a {ndim}-D tensor", describe(x))
    if shape is not None:
        want = list(shape)
        ok = x.ndim == len(want) and all(w is None or w == s for w, s in zip(want, x.shape))
        if not ok:
            shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            raise fail(name, f"shape {shown}", f"shape {list(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise fail_type(name, "dtype in " + ", ".join(str(d) for d in dtypes), str(x.dtype))
    if floating and not x.is_floating_point():
        raise fail_type(name, "a floating-point tensor", str(x.dtype))
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise fail_type(name, "an integer tensor", str(x.dtype))
    return x


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Check that ``value`` is one of ``choices``."""
    try:
        ok = value in choices
    except TypeError:  # unhashable or incomparable values are simply not among the choices
        ok = False
    if not ok:
        raise fail(name, "one of " + ", ".join(repr(c) for c in choices), repr(value))


def check_probability(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """Check a Python number in [0, 1] (with open ends where asked)."""
    return check_number(name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


# --------------------------------------------------------------------------------------------------------------
# Files.

import os  # noqa: E402 (kept with the file checks)
import pathlib  # noqa: E402


def check_output_file(name: str, path: str | os.PathLike) -> pathlib.Path:
    """Check now that a file can be written at ``path`` (before a long run that ends by writing it).

    The folder must exist and ``path`` must not be a folder; the file is opened for appending (created and removed
    again when it did not exist), so permissions and read-only file systems are tested for real.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise fail_type(name, "a file path", describe(path))
    p = pathlib.Path(path)
    if p.is_dir():
        raise fail(name, "a file path, not a folder", repr(str(p)))
    if not p.parent.is_dir():
        raise fail(name, "a file in an existing folder", f"{str(p)!r}, whose folder {str(p.parent)!r} is not one")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as err:
        raise fail(name, "a writable file", f"{str(p)!r} ({err.strerror or err})") from err
    if not existed:
        p.unlink(missing_ok=True)
    return p
