"""``dualobj bench`` (suites of micro-benchmarks against baselines) and ``dualobj info`` (versions, device, backends).

Exit codes of ``dualobj bench``: 0 when everything ran and agreed (missed performance targets are reported, never
an error); 1 when an implementation disagreed with the others (``Case.check``); 3 when a suite is missing, failed
to import, or an implementation raised (a missing suite is tolerated with ``--allow-missing``); 2 for bad usage.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from dualobj.bench import SUITES

EXIT_DISAGREE = 1
EXIT_ERROR = 3


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


class DType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def exit_code(suites: list, *, allow_missing: bool) -> int:
    """1 if any case disagreed, else 3 if any suite or implementation failed, else 0."""
    from dualobj.bench._runner import DISAGREE, ERROR, MISSING, OK

    if any(c.status == DISAGREE for s in suites for c in s.cases):
        return EXIT_DISAGREE
    for s in suites:
        if s.status == MISSING and allow_missing:
            continue
        if s.status != OK or any(c.status == ERROR for c in s.cases):
            return EXIT_ERROR
    return 0


def register(app: typer.Typer) -> None:
    """Add the ``bench`` and ``info`` commands to ``app``."""

    @app.command()
    def bench(
        suite: Annotated[str, typer.Argument(
            help=f"One of {', '.join(SUITES)}, 'all', or the dotted path of a module defining cases(ctx).",
        )] = "all",
        device: Annotated[Device, typer.Option(help="Where to run.")] = Device.cpu,
        dtype: Annotated[DType, typer.Option(help="Floating dtype of the inputs (losses stay float32).")] = (
            DType.float32),
        quick: Annotated[bool, typer.Option(help="Small sizes and short timing runs (CI).")] = False,
        json_path: Annotated[Path | None, typer.Option(
            "--json", help="Write the results as JSON to this file ('-': stdout, the tables then go to stderr).",
        )] = None,
        memory: Annotated[bool, typer.Option(help="Measure peak extra memory where a case asks for it.")] = True,
        allow_missing: Annotated[bool, typer.Option(
            help="Do not fail when a suite module does not exist yet (it is still reported).",
        )] = False,
        threads: Annotated[int | None, typer.Option(
            min=1, help="CPU threads for torch (default: torch's own choice); recorded in the JSON.",
        )] = None,
        compile_: Annotated[bool, typer.Option(
            "--compile", help="Also time torch.compile-d training steps against eager ones (the step suite).",
        )] = False,
        case: Annotated[list[str] | None, typer.Option(
            "--case", "-k", help="Only cases whose name contains this text (repeatable).",
        )] = None,
    ) -> None:
        """Time dualobj beside its baselines on the same inputs, check they agree, and report ours/baseline."""
        import torch

        from dualobj.bench._core import Context
        from dualobj.bench._report import document, render
        from dualobj.bench._runner import RunOptions, run_suite

        if suite != "all" and suite not in SUITES and "." not in suite:
            raise typer.BadParameter(
                f"expected one of {', '.join(SUITES)}, 'all' or a dotted module path, got {suite!r}", param_hint="SUITE"
            )
        if device is Device.cuda and not torch.cuda.is_available():
            raise typer.BadParameter("expected a machine with CUDA, got torch.cuda.is_available() == False",
                                     param_hint="--device")
        to_stdout = json_path is not None and str(json_path) == "-"
        if json_path is not None and not to_stdout:  # fail now, not after the whole run
            from dualobj._errors import check_output_file
            check_output_file("--json", json_path)
        if threads is not None:
            torch.set_num_threads(threads)
        out, err = _console(stderr=to_stdout), _console(stderr=True)
        ctx = Context(device=device.value, dtype=dtype.value, quick=quick, compile=compile_)
        options = RunOptions.for_context(ctx, memory=memory)
        names = list(SUITES) if suite == "all" else [suite]
        results = []
        for name in names:
            flags = (", quick" if quick else "") + (", compile" if compile_ else "")
            err.print(f"[bold]bench {name}[/] ({ctx.device}, {ctx.dtype}{flags})")

            def progress(message: str) -> None:
                err.print(f"  {message}", markup=False, highlight=False)

            result = run_suite(name, ctx, options, select=case or (), progress=progress)
            err.print(f"  {name}: {'failed' if result.failed else 'ok'} in {result.seconds:.1f} s")
            results.append(result)
        render(out, results)
        code = exit_code(results, allow_missing=allow_missing)
        if json_path is not None:
            opts = {"suite": suite, "device": ctx.device, "dtype": ctx.dtype, "quick": quick, "compile": compile_,
                    "memory": memory,
                    "allow_missing": allow_missing, "case": list(case or []),
                    "threads": torch.get_num_threads(),
                    "timing": {k: getattr(options, k) for k in ("min_run_time", "min_repeats", "max_repeats",
                                                                 "block_time")}}
            text = json.dumps(document(results, opts, ctx.device, code), indent=2, allow_nan=False, default=str)
            if to_stdout:
                sys.stdout.write(text + "\n")
            else:
                try:
                    json_path.write_text(text + "\n")
                except OSError as exc:
                    err.print(f"[bold red]dualobj bench: cannot write --json {json_path}: {exc.strerror}[/]")
                    raise typer.Exit(EXIT_ERROR) from None
                err.print(f"results written to {json_path}")
        if code:
            why = "an implementation disagreed" if code == EXIT_DISAGREE else "a suite or an implementation failed"
            err.print(f"[bold red]dualobj bench: exit {code}[/] ({why})")
        raise typer.Exit(code)

    @app.command()
    def info(
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    ) -> None:
        """Versions of torch, xformers and transformers; the device; which attention backends run here and why not."""
        from rich.table import Table

        from dualobj.bench._report import attention_backends, device_info, versions

        device = "cuda" if _cuda() else "cpu"
        vers, dev = versions(), device_info(device)
        backends = {d: attention_backends(d) for d in dict.fromkeys(["cpu", device])}
        if json_out:
            typer.echo(json.dumps({"versions": vers, "device": dev,
                                   "attention_backends": {d: b for d, (b, _) in backends.items()},
                                   "attention_note": next((n for _, n in backends.values() if n), None)},
                                  indent=2, default=str))
            return
        console = _console()
        table = Table(title="versions", title_justify="left", show_header=False)
        for name, version in vers.items():
            table.add_row(name, version or "[dim]not installed[/]")
        console.print(table)
        table = Table(title="device", title_justify="left", show_header=False)
        for key, value in dev.items():
            table.add_row(key, str(value))
        console.print(table)
        for where, (found, note) in backends.items():
            table = Table(title=f"attention backends on {where}", title_justify="left")
            for column in ("backend", "runs here", "why not"):
                table.add_column(column)
            for name, status in found.items():
                if status["forward"] and status["backward"]:
                    runs = "[green]yes[/] (training)"
                elif status["forward"]:
                    runs = "[yellow]forward only[/]"
                else:
                    runs = "[red]no[/]"
                table.add_row(name, runs, status["reason"] or "")
            console.print(table)
            if note:
                console.print(f"[yellow]{note}[/]")


def _console(*, stderr: bool = False):
    """A rich Console; off a terminal (CI logs, files) it is 160 columns wide so the tables are not squeezed."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=160)
    return console


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
