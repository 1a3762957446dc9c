"""Run benchmark suites: time every implementation, measure its memory, check agreement, compute ratios.

Timing uses torch.utils.benchmark's clock (it synchronises the accelerator before each reading) around blocks of
calls, with the process's usual thread count. Each implementation is called once untimed (its output is kept for the
agreement check, and it warms caches up), then timed in repeats until both a minimum time and a minimum number of
repeats are reached; the reported time is the median per call over the repeats.

Peak extra memory is read from the CUDA allocator on CUDA, and on the CPU from a fresh subprocess per
implementation (see :mod:`dualobj.bench._worker`): its peak resident set size during one call, over its resident
size after set-up and one warm-up call.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.benchmark.utils.timer import timer as synchronized_clock

from dualobj.bench._core import Case, Context

OK, UNAVAILABLE, ERROR, DISAGREE, SKIPPED, MISSING = "ok", "unavailable", "error", "disagree", "skipped", "missing"


@dataclass(frozen=True)
class RunOptions:
    """How hard to measure.

    Attributes:
        min_run_time: seconds of timed calls per implementation (at least).
        min_repeats: timed repeats per implementation (at least); the median is over these.
        max_repeats: stop after this many repeats even if ``min_run_time`` is not reached.
        block_time: a repeat runs the callable enough times to last about this long (keeps timer overhead small
            for microsecond-scale calls).
        memory: measure peak extra memory for cases that ask for it.
        memory_workers: CPU memory subprocesses run at once (each reports its own peak RSS, so running them
            side by side only shortens the wait; it needs that many set-ups' worth of RAM).
    """

    min_run_time: float = 1.0
    min_repeats: int = 5
    max_repeats: int = 200
    block_time: float = 0.02
    memory: bool = True
    memory_workers: int = 2

    @classmethod
    def for_context(cls, ctx: Context, *, memory: bool = True) -> RunOptions:
        """The defaults for ``ctx``: shorter runs under ``ctx.quick``."""
        if ctx.quick:
            return cls(min_run_time=0.15, min_repeats=3, max_repeats=50, block_time=0.01, memory=memory,
                       memory_workers=max(1, os.cpu_count() or 1))
        return cls(memory=memory)


@dataclass
class ImplResult:
    """One implementation's measurements (times in seconds per call, memory in bytes)."""

    name: str
    ours: bool
    status: str = OK
    reason: str | None = None
    median_s: float | None = None
    iqr_s: float | None = None
    repeats: int = 0
    calls_per_repeat: int = 0
    peak_bytes: int | None = None
    memory_note: str | None = None


@dataclass
class Ratio:
    """``ours / baseline`` for time and memory, with the targets (``None`` where not set or not measured).

    ``judged`` is False where the targets are stated for other sizes (``--quick``): ``met`` and ``memory_met``
    are then ``None``.
    """

    baseline: str
    time: float | None
    memory: float | None = None
    target: float | None = None
    met: bool | None = None
    memory_target: float | None = None
    memory_met: bool | None = None
    judged: bool = True


@dataclass
class CaseResult:
    """One case: the status (ok / disagree / error / skipped), the check message, each impl and the ratios."""

    name: str
    sizes: dict[str, Any]
    unit: str
    units: float | None
    status: str = OK
    message: str | None = None
    impls: list[ImplResult] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)


@dataclass
class SuiteResult:
    """One suite: ``status`` is ok, missing (no such module) or error (failed to import or to list its cases)."""

    name: str
    module: str
    status: str = OK
    message: str | None = None
    cases: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status != OK or any(c.status in (ERROR, DISAGREE) for c in self.cases)


def module_name(suite: str) -> str:
    """The module of a suite: ``"loss"`` → ``dualobj.bench.loss``; a dotted path is used as given."""
    return suite if "." in suite else f"dualobj.bench.{suite}"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__


def load_cases(suite: str, ctx: Context) -> tuple[str, str | None, list[Case]]:
    """Import a suite and list its cases.

    Returns:
        ``(status, message, cases)``: ``status`` is ``"ok"``, ``"missing"`` (the suite module itself does not
        exist) or ``"error"`` (it exists but failed to import, has no ``cases``, or ``cases(ctx)`` raised).
    """
    name = module_name(suite)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            return MISSING, f"no module {name} (suite not written yet)", []
        return ERROR, f"{name} failed to import: {_one_line(exc)}", []
    except Exception as exc:
        return ERROR, f"{name} failed to import: {_one_line(exc)}", []
    make_cases = getattr(module, "cases", None)
    if not callable(make_cases):
        return ERROR, f"{name} has no function cases(ctx)", []
    try:
        cases = list(make_cases(ctx))
    except Exception as exc:
        return ERROR, f"{name}.cases(ctx) raised {_one_line(exc)}", []
    bad = [c for c in cases if not isinstance(c, Case)]
    if bad:
        return ERROR, f"{name}.cases(ctx) returned {type(bad[0]).__name__}, expected Case", []
    return OK, None, cases


def _synchronize(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


class _Timed:
    """Repeated timing of one callable; each block is bracketed by torch.utils.benchmark's accelerator-synchronised
    clock (``torch.accelerator.synchronize()`` before reading ``timeit.default_timer``)."""

    def __init__(self, fn: Callable[[], Any], first_call_s: float, options: RunOptions) -> None:
        self.fn = fn
        self.options = options
        number = max(1, math.ceil(options.block_time / max(first_call_s, 1e-9)))
        # A second estimate after the first call, which often pays one-time costs; it is a warm-up too.
        probe = self._block(number) / number
        self.number = max(1, math.ceil(options.block_time / max(probe, 1e-9)))
        self.times: list[float] = []
        self.total = 0.0

    def _block(self, number: int) -> float:
        fn = self.fn
        gc_was_enabled = gc.isenabled()
        gc.disable()  # as timeit does: a collection inside a block is noise, not the function's cost
        try:
            start = synchronized_clock()
            for _ in range(number):
                fn()
            return synchronized_clock() - start
        finally:
            if gc_was_enabled:
                gc.enable()

    @property
    def done(self) -> bool:
        o = self.options
        return len(self.times) >= o.max_repeats or (self.total >= o.min_run_time and len(self.times) >= o.min_repeats)

    def repeat(self) -> None:
        block = self._block(self.number)
        self.times.append(block / self.number)
        self.total += block

    def summary(self) -> tuple[float, float, int, int]:
        """``(median_s, iqr_s, repeats, calls_per_repeat)`` over the repeats so far."""
        times = self.times
        iqr = 0.0
        if len(times) >= 2:
            q = statistics.quantiles(times, n=4, method="inclusive")
            iqr = q[2] - q[0]
        return statistics.median(times), iqr, len(times), self.number


def time_callables(
    fns: dict[str, tuple[Callable[[], Any], float]], options: RunOptions
) -> dict[str, tuple[float, float, int, int]]:
    """Time several callables side by side, each already called once (``{name: (fn, first_call_s)}``).

    Repeats are interleaved (one repeat of each in turn), so a change of machine load during the run affects
    every implementation alike and their ratios stay fair.

    Returns:
        ``{name: (median_s, iqr_s, repeats, calls_per_repeat)}``: median and interquartile range of the time
        per call over the repeats.
    """
    timed = {name: _Timed(fn, first, options) for name, (fn, first) in fns.items()}
    while not all(t.done for t in timed.values()):
        for t in timed.values():
            if not t.done:
                t.repeat()
    return {name: t.summary() for name, t in timed.items()}


def time_callable(fn: Callable[[], Any], first_call_s: float, options: RunOptions) -> tuple[float, float, int, int]:
    """Median and IQR of the per-call time of one callable; see :func:`time_callables`."""
    return time_callables({"fn": (fn, first_call_s)}, options)["fn"]


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak CUDA memory allocated during one call of ``fn``, over what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


class MemoryWorkerError(RuntimeError):
    """The memory subprocess failed: the implementation or the suite raised there, or it timed out. Not a bad
    argument (so not a ``DualObjError``): the runner reports it as that implementation's error."""


def subprocess_peak_bytes(
    module: str, case_index: int, impl: str, ctx: Context, *, timeout: float = 600.0
) -> tuple[int | None, str | None]:
    """Peak extra RSS of one implementation, measured in a fresh Python process.

    Returns:
        ``(bytes, note)``: how it was measured; ``bytes`` is ``None`` (and the note says why) where this system
        cannot report peak RSS.

    Raises:
        MemoryWorkerError: the subprocess failed (the implementation or the suite raised there, or it timed out).
    """
    env = dict(os.environ)
    # The child sees the same modules as this process (a suite may live outside the package).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    # A fixed mmap threshold: freed large blocks go back to the system instead of staying in the heap, so the
    # warm-up call does not pre-fund the measured one.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    request = json.dumps({"module": module, "case": case_index, "impl": impl, "ctx": asdict(ctx),
                          "threads": torch.get_num_threads()})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dualobj.bench._worker", request],
            capture_output=True, text=True, env=env, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise MemoryWorkerError(f"memory subprocess timed out after {timeout:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MemoryWorkerError(f"memory subprocess failed (exit {proc.returncode}): {tail}")
    answer = json.loads(lines[-1])
    if answer.get("error"):
        raise MemoryWorkerError(f"in the memory subprocess: {answer['error']}")
    return answer.get("peak_bytes"), answer.get("note")


def _check_contract(case: Case) -> str | None:
    ours = [impl for impl in case.impls if impl.ours]
    if len(ours) != 1:
        return f"case {case.name!r} must mark exactly one Impl ours=True, found {len(ours)}"
    names = [impl.name for impl in case.impls]
    if len(set(names)) != len(names):
        return f"case {case.name!r} has duplicate Impl names {names}"
    unknown = sorted((set(case.targets) | set(case.memory_targets)) - set(names))
    if unknown:
        return f"case {case.name!r} has targets for unknown baselines {unknown}"
    return None


def _ratios(case: Case, results: list[ImplResult], judged: bool = True) -> list[Ratio]:
    ours = next((r for r in results if r.ours), None)
    if ours is None or ours.status != OK:
        return []
    out = []
    for res in results:
        if res.ours or res.status != OK:
            continue
        t = ours.median_s / res.median_s if ours.median_s and res.median_s else None
        m = None
        if ours.peak_bytes is not None and res.peak_bytes:
            m = ours.peak_bytes / res.peak_bytes
        target = case.targets.get(res.name)
        mtarget = case.memory_targets.get(res.name)
        out.append(Ratio(
            baseline=res.name, time=t, memory=m,
            target=target, met=None if target is None or t is None or not judged else t <= target,
            memory_target=mtarget,
            memory_met=None if mtarget is None or m is None or not judged else m <= mtarget,
            judged=judged,
        ))
    return out


def run_case(
    case: Case,
    index: int,
    module: str,
    ctx: Context,
    options: RunOptions,
    progress: Callable[[str], None] = lambda _: None,
) -> CaseResult:
    """Measure every implementation of ``case`` (index ``index`` in its suite's list), check and compare them."""
    result = CaseResult(name=case.name, sizes=dict(case.sizes), unit=case.unit, units=case.units)
    problem = _check_contract(case)
    if problem:
        result.status, result.message = ERROR, problem
        return result
    outputs: dict[str, Any] = {}
    errors: list[str] = []
    ready: dict[str, tuple[Callable[[], Any], float]] = {}
    results: dict[str, ImplResult] = {}

    def failed(res: ImplResult, exc: Exception) -> None:
        res.status, res.reason = ERROR, _one_line(exc)
        errors.append(f"{res.name} raised {_one_line(exc)}")
        progress(traceback.format_exc(limit=-3).rstrip())

    for impl in case.impls:  # set up every implementation and call it once (the output that is checked)
        res = results[impl.name] = ImplResult(name=impl.name, ours=impl.ours)
        result.impls.append(res)
        if impl.available is not None:
            res.status, res.reason = UNAVAILABLE, impl.available
            progress(f"{case.name} · {impl.name}: not run ({impl.available})")
            continue
        progress(f"{case.name} · {impl.name}: set-up and first call")
        try:
            fn = impl.make()
            start = time.perf_counter()
            outputs[impl.name] = fn()
            _synchronize(ctx.device)
            ready[impl.name] = (fn, time.perf_counter() - start)
        except Exception as exc:
            failed(res, exc)
    if ready:
        progress(f"{case.name}: timing {', '.join(ready)}")
        try:
            for name, summary in time_callables(ready, options).items():
                res = results[name]
                res.median_s, res.iqr_s, res.repeats, res.calls_per_repeat = summary
        except Exception as exc:
            failed(ImplResult(name="timing", ours=False), exc)
    if options.memory and case.memory and ready:
        on_cuda = ctx.device.startswith("cuda") and torch.cuda.is_available()
        if on_cuda:
            for name, (fn, _) in ready.items():
                try:
                    results[name].peak_bytes, results[name].memory_note = cuda_peak_bytes(fn), "CUDA allocator"
                except Exception as exc:
                    failed(results[name], exc)
        else:
            ready.clear()  # free this process's set-ups before the subprocesses allocate theirs
            names = [r.name for r in result.impls if r.status == OK]
            progress(f"{case.name}: memory of {', '.join(names)} (a fresh process each)")
            # Each subprocess's peak RSS is its own, so running them side by side does not change the figures.
            workers = max(1, min(len(names), options.memory_workers))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {name: pool.submit(subprocess_peak_bytes, module, index, name, ctx) for name in names}
            for name, future in futures.items():
                try:
                    results[name].peak_bytes, results[name].memory_note = future.result()
                except Exception as exc:
                    failed(results[name], exc)
    ready.clear()
    if errors:
        result.status, result.message = ERROR, "; ".join(errors)
    elif results[next(i.name for i in case.impls if i.ours)].status != OK:
        result.status = SKIPPED
        result.message = "ours cannot run here" if outputs else "no implementation can run here"
    elif case.check is not None:
        try:
            verdict = case.check(outputs)
        except Exception as exc:
            verdict = f"check raised {_one_line(exc)}"
        if verdict:
            result.status, result.message = DISAGREE, str(verdict)
    judged = case.targets_judged if case.targets_judged is not None else not ctx.quick
    result.ratios = _ratios(case, result.impls, judged)
    return result


_HOST_ALLOCATOR_STEADY = False


def steady_host_allocator() -> None:
    """Bring glibc's allocator to the state a training process is in, once per process.

    glibc serves a request above its mmap threshold (128 KiB at start) with a fresh mapping, and raises the
    threshold to the size of the largest such block freed so far (up to 32 MiB). A process that has only freed
    small blocks keeps mapping, page-faulting and unmapping every 1 MiB temporary, while a training step, which frees
    large activations, has long since raised the threshold. Allocating and freeing one 24 MiB block here does the
    same, so that the timings do not depend on the order of the first allocations (about 10% for the masking
    suite on the CPU). It affects every implementation alike; other allocators ignore it.
    """
    global _HOST_ALLOCATOR_STEADY
    if not _HOST_ALLOCATOR_STEADY:
        block = torch.empty(24 << 20, dtype=torch.uint8)
        del block
        _HOST_ALLOCATOR_STEADY = True


def run_suite(
    suite: str,
    ctx: Context,
    options: RunOptions,
    *,
    select: Sequence[str] = (),
    progress: Callable[[str], None] = lambda _: None,
) -> SuiteResult:
    """Load one suite and run each of its cases (only those whose name contains one of ``select``, if given)."""
    start = time.perf_counter()
    steady_host_allocator()
    module = module_name(suite)
    result = SuiteResult(name=suite, module=module)
    status, message, cases = load_cases(suite, ctx)
    result.status, result.message = status, message
    if status == OK:
        for index, case in enumerate(cases):
            if select and not any(s in case.name for s in select):
                continue
            result.cases.append(run_case(case, index, module, ctx, options, lambda m: progress(f"{suite} · {m}")))
    result.seconds = time.perf_counter() - start
    return result
