"""The contract between benchmark suites and the runner.

A suite is a module ``dualobj.bench.<name>`` with a function ``cases(ctx: Context) -> list[Case]``. Each
:class:`Case` is one configuration measured with several implementations (ours and the baselines) on the same
inputs; the runner times every :class:`Impl`, optionally measures its peak extra memory, checks that the outputs
agree, and reports ratios of ours to each baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Context:
    """What the command line chose: ``device`` ("cpu" or "cuda"), ``dtype`` name, ``quick`` (smaller sizes),
    ``compile`` (also measure ``torch.compile``-d variants where a suite has them: the ``step`` suite)."""

    device: str = "cpu"
    dtype: str = "float32"
    quick: bool = False
    compile: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype`` (``"bfloat16"`` → ``torch.bfloat16``)."""
        return getattr(torch, self.dtype)


@dataclass
class Impl:
    """One implementation of a case.

    ``make()`` does the untimed set-up and returns the callable that is timed; the value that callable returns is
    what ``Case.check`` compares across implementations. ``ours`` marks dualobj's own implementation (exactly one
    per case); the others are baselines named by ``name``. ``available`` is ``None`` when it can run, else the
    reason it cannot (for example an optional package that is not installed); it is then reported, not run.
    """

    name: str
    make: Callable[[], Callable[[], Any]]
    ours: bool = False
    available: str | None = None


@dataclass
class Case:
    """One configuration, measured with each of ``impls`` on the same inputs.

    Attributes:
        name: short label shown in the table (e.g. ``"exact-count 64x2048"``).
        impls: ours and the baselines.
        sizes: the sizes (written to JSON).
        units: work per call (e.g. tokens), for a throughput column; ``None`` for none.
        unit: name of the unit (``"tok"``).
        check: ``check(outputs) -> None | str`` given ``{impl name: output}``; a string says how they disagree.
        memory: measure peak extra memory of each impl (CUDA allocator, or a fresh subprocess's peak RSS on CPU).
        targets: ``{baseline name: max ratio}``: the documented goal for ``time(ours) / time(baseline)``
            (reported as met or missed, never an assertion). ``memory_targets`` likewise for memory.
        targets_judged: whether met / missed is decided at this case's sizes. ``None`` (the default): at the
            full sizes only, not under ``--quick``, because the documented targets are stated for the full sizes
            (the table then says "n/a at quick sizes").
    """

    name: str
    impls: list[Impl]
    sizes: dict[str, Any] = field(default_factory=dict)
    units: float | None = None
    unit: str = "tok"
    check: Callable[[dict[str, Any]], str | None] | None = None
    memory: bool = False
    targets: dict[str, float] = field(default_factory=dict)
    memory_targets: dict[str, float] = field(default_factory=dict)
    targets_judged: bool | None = None


def _flatten(value: Any) -> list[Any]:
    """The leaves of nested tuples / lists / dicts (dict leaves in key order)."""
    if isinstance(value, Mapping):
        return [leaf for key in sorted(value) for leaf in _flatten(value[key])]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def allclose(*, rtol: float = 1e-4, atol: float = 1e-5) -> Callable[[dict[str, Any]], str | None]:
    """A ready-made ``Case.check``: every output equals the first one within ``rtol``/``atol``.

    Outputs may be tensors (any shape, compared in float64 on the CPU), numbers, or nested tuples / lists / dicts
    of them; the structure and the shapes must match exactly.

    Args:
        rtol: relative tolerance, as in :func:`torch.allclose`.
        atol: absolute tolerance.

    Returns:
        ``check(outputs) -> None | str``: ``None`` when all agree, else a message naming the first disagreeing
        implementation, the leaf and the largest absolute difference.
    """

    def check(outputs: dict[str, Any]) -> str | None:
        if not outputs:
            return None
        names = list(outputs)
        ref_name = names[0]
        ref = _flatten(outputs[ref_name])
        for name in names[1:]:
            got = _flatten(outputs[name])
            if len(got) != len(ref):
                return f"{name} returned {len(got)} values, {ref_name} returned {len(ref)}"
            for i, (a, b) in enumerate(zip(ref, got)):
                ta = torch.as_tensor(a).detach().to("cpu", torch.float64)
                tb = torch.as_tensor(b).detach().to("cpu", torch.float64)
                if ta.shape != tb.shape:
                    return f"{name} value {i} has shape {list(tb.shape)}, {ref_name} has {list(ta.shape)}"
                if not torch.allclose(ta, tb, rtol=rtol, atol=atol, equal_nan=True):
                    diff = (ta - tb).abs().nan_to_num(math.inf).max().item()
                    return (f"{name} differs from {ref_name} in value {i}: max |diff| = {diff:.3g} "
                            f"(rtol={rtol}, atol={atol})")
        return None

    return check
