"""What ``dualobj bench`` and ``dualobj info`` print: the environment, the result tables and the JSON document."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict
from importlib import metadata
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dualobj.bench._runner import DISAGREE, ERROR, MISSING, OK, SKIPPED, UNAVAILABLE, CaseResult, SuiteResult

SCHEMA_VERSION = 1
"""Version of the ``--json`` layout (bumped on any incompatible change)."""

PACKAGES = ("dualobj", "torch", "xformers", "transformers", "einops", "torchmetrics", "typer", "rich")


def versions() -> dict[str, str | None]:
    """Installed versions of Python and of :data:`PACKAGES` (``None`` when not installed); nothing is imported."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str = "cpu") -> dict[str, Any]:
    """The device the benchmarks run on, and what else this machine offers."""
    info: dict[str, Any] = {
        "type": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = props.name
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_bytes"] = props.total_memory
    info["name"] = info.get("gpu") if device.startswith("cuda") else info["cpu"]
    return info


def attention_backends(device: str = "cpu") -> tuple[dict[str, dict[str, Any]], str | None]:
    """Which attention backends run on ``device``, from ``dualobj.attention.available_backends(device)``.

    Returns:
        ``({backend: {"forward": bool, "backward": bool, "reason": str | None}}, note)``; the note is set (and
        the dict empty) when that function is missing or fails.
    """
    try:
        from dualobj.attention import available_backends
    except ImportError as exc:
        return {}, f"dualobj.attention.available_backends is not available in this build ({exc})"
    try:
        found = available_backends(device)
    except Exception as exc:
        return {}, f"dualobj.attention.available_backends() raised {type(exc).__name__}: {exc}"
    out: dict[str, dict[str, Any]] = {}
    for name, status in dict(found).items():
        if isinstance(status, bool):
            status_dict = {"forward": status, "backward": status, "reason": None if status else "does not run"}
        else:
            status_dict = {key: getattr(status, key, None) for key in ("forward", "backward", "reason")}
        out[str(name)] = status_dict
    return out, None


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    if n < 1024**2:
        return f"{n / 1024:.3g} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.4g} MiB"
    return f"{n / 1024**3:.3g} GiB"


def _fmt_rate(units: float | None, unit: str, seconds: float | None) -> str:
    if units is None or not seconds:
        return "—"
    rate = units / seconds
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.3g} {prefix}{unit}/s"
    return f"{rate:.3g} {unit}/s"


def _fmt_ratio(value: float | None, target: float | None, met: bool | None, judged: bool = True) -> str:
    if value is None:
        return "—"
    text = f"{value:.3g}×"
    if target is not None and not judged:
        text += f" (≤ {target:.3g} at full sizes: [dim]n/a at quick sizes[/])"
    elif target is not None:
        mark = "[green]met[/]" if met else "[yellow]missed[/]"
        text += f" (≤ {target:.3g}: {mark})"
    return text


_STATUS = {OK: "[green]agree[/]", DISAGREE: "[bold red]DISAGREE[/]", ERROR: "[bold red]error[/]", SKIPPED: "skipped"}


def suite_table(suite: SuiteResult) -> Table:
    """One table per suite: a row per implementation; ratios are ``ours / this baseline``."""
    table = Table(title=escape(f"{suite.name} ({suite.module}, {suite.seconds:.1f} s)"), title_justify="left")
    for column in ("case", "impl", "median", "throughput", "peak extra mem", "time ours/this", "mem ours/this",
                   "check"):
        justify = "left" if column in ("case", "impl", "check") else "right"
        table.add_column(column, justify=justify)
    for case in suite.cases:
        _case_rows(table, case)
        table.add_section()
    return table


def _case_rows(table: Table, case: CaseResult) -> None:
    ratios = {r.baseline: r for r in case.ratios}
    for i, impl in enumerate(case.impls):
        label = f"[bold]{escape(impl.name)}[/] (ours)" if impl.ours else escape(impl.name)
        if impl.status == UNAVAILABLE:
            cells = [f"[dim]not run: {escape(str(impl.reason))}[/]", "", "", "", ""]
        elif impl.status == ERROR:
            cells = [f"[red]error: {escape(str(impl.reason))}[/]", "", "", "", ""]
        else:
            r = ratios.get(impl.name)
            median = _fmt_time(impl.median_s)
            cells = [
                median,
                _fmt_rate(case.units, case.unit, impl.median_s),
                _fmt_bytes(impl.peak_bytes),
                _fmt_ratio(r.time, r.target, r.met, r.judged) if r else "",
                _fmt_ratio(r.memory, r.memory_target, r.memory_met, r.judged) if r else "",
            ]
        first = i == 0
        table.add_row(escape(case.name) if first else "", label, *cells, _STATUS.get(case.status, "") if first else "")
    if not case.impls and case.message:
        table.add_row(escape(case.name), "", "", "", "", "", "", _STATUS.get(case.status, ""))


def render(console: Console, suites: list[SuiteResult]) -> None:
    """Print every suite's table and, below it, what failed and why."""
    for suite in suites:
        if suite.status != OK:
            colour = "yellow" if suite.status == MISSING else "bold red"
            console.print(f"[{colour}]suite {escape(suite.name)}: {suite.status}[/] — {escape(str(suite.message))}")
            continue
        if not suite.cases:
            console.print(f"suite {escape(suite.name)}: no cases selected")
            continue
        console.print(suite_table(suite))
        for case in suite.cases:
            if case.message and case.status != OK:
                colour = "dim" if case.status == SKIPPED else "bold red"
                console.print(f"[{colour}]{escape(f'{suite.name} · {case.name}: {case.status}: {case.message}')}[/]")
            for impl in case.impls:
                if impl.peak_bytes is None and impl.memory_note and impl.status == OK:
                    where = f"{suite.name} · {case.name} · {impl.name}"
                    console.print(f"[yellow]{escape(f'{where}: {impl.memory_note}')}[/]")


def document(suites: list[SuiteResult], options: dict[str, Any], device: str, exit_code: int) -> dict[str, Any]:
    """The ``--json`` document (layout :data:`SCHEMA_VERSION`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "versions": versions(),
        "device": device_info(device),
        "exit_code": exit_code,
        "suites": [{**asdict(s), "failed": s.failed} for s in suites],
    }
