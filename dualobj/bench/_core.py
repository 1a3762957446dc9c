"""The contract between benchmark suites and the runner.

A suite is a module ``dualobj.bench.<name>`` with a function ``cases(ctx: Context) -> list[Case]``. Each
:class:`Case` is one configuration measured with several implementations (ours and the baselines) on the same
inputs; the runner times every :class:`Impl`, optionally measures its peak extra memory, checks that the outputs
agree, and reports ratios of ours to each baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Context:
    """What the command line chose: ``device`` ("cpu" or "cuda"), ``dtype`` name, ``quick`` (smaller sizes)."""

    device: str = "cpu"
    dtype: str = "float32"
    quick: bool = False


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
