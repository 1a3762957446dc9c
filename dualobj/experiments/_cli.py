"""``dualobj repro``: the miniature replication of the paper's α × repetition grid."""

from __future__ import annotations

import typer


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    from dualobj._errors import fail

    if text is None:
        return None
    try:
        out = []
        for part in text.replace(" ", "").split(","):
            if "/" in part:
                num, den = part.split("/")
                out.append(float(num) / float(den))
            else:
                out.append(float(part))
        return tuple(out)
    except (ValueError, ZeroDivisionError) as err:
        raise fail(name, "a comma-separated list of numbers (fractions like 3/4 allowed)", repr(text)) from err


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    from dualobj._errors import fail

    if text is None:
        return None
    try:
        return tuple(int(p) for p in text.replace(" ", "").split(","))
    except ValueError as err:
        raise fail(name, "a comma-separated list of ints", repr(text)) from err


def register(app: typer.Typer) -> None:
    """Add the ``repro`` command to ``app``."""

    @app.command()
    def repro(
        quick: bool = typer.Option(False, "--quick", help="The few-minute grid (same as --grid quick)."),
        grid: str = typer.Option("paper", "--grid", help="Preset: quick or paper."),
        alphas: str = typer.Option(None, "--alphas", help="AR weights, e.g. '1,3/4,1/2,0' (overrides the preset)."),
        repetitions: str = typer.Option(None, "--repetitions", help="Repetition counts R, e.g. '1,32'."),
        budget: int = typer.Option(None, "--budget", help="Training tokens per model."),
        seeds: int = typer.Option(None, "--seeds", help="Seeds per (α, R): mean ± std."),
        out: str = typer.Option("repro-out", "--out", help="Output folder (results.json, plots); resumed."),
        data: str = typer.Option(None, "--data", help="Your text file or folder (default: Python's stdlib)."),
        jobs: int = typer.Option(None, "--jobs", help="Worker processes, one torch thread each (default: 2)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
    ) -> None:
        """Train one small model per (α, R, seed) at a fixed token budget and compare them on held-out text.

        Each model is evaluated in AR mode (bits per byte, final and minimum over training), MD mode (ELBO),
        as a prefix LM and on a next-line zero-shot probe. Results go to OUT/results.json (written atomically
        after every model, so an interrupted grid resumes), OUT/curves.png and OUT/final_vs_alpha.png.
        """
        import dataclasses
        import json
        import os
        from pathlib import Path

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from dualobj._errors import DualObjError, fail
        from dualobj.data import load_corpus
        from dualobj.experiments import (
            PRESETS,
            GridConfig,
            alpha_label,
            load_results,
            pending_cells,
            plot,
            render_table,
            run_grid,
            summarize,
        )

        console = Console(stderr=as_json)
        if not console.is_terminal:  # logs and pipes: keep the table's rows on one line each
            console.width = max(console.width, 140)
        try:
            name = "quick" if quick else grid
            if name not in PRESETS:
                raise fail("grid", "one of " + ", ".join(PRESETS), repr(name))
            changes = {"alphas": _floats(alphas, "alphas"), "repetitions": _ints(repetitions, "repetitions"),
                       "budget": budget, "seeds": seeds, "data": data}
            if data is not None:
                load_corpus(data)  # fail fast on a bad path or an empty file
                changes["data"] = os.path.abspath(data)
            config = dataclasses.replace(PRESETS[name], **{k: v for k, v in changes.items() if v is not None})
            if not isinstance(config, GridConfig):  # pragma: no cover
                raise fail("grid", "a GridConfig", type(config).__name__)
            n_jobs = jobs if jobs is not None else min(2, os.cpu_count() or 1)
            cells = config.cells()
            console.print(f"[bold]dualobj repro[/] grid={name}: {len(config.alphas)} α × {len(config.repetitions)} R "
                          f"× {config.seeds} seeds = {len(cells)} models, {config.budget:,} tokens each, "
                          f"{n_jobs} worker(s); results in {out}")
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=False) as progress:
                overall = progress.add_task("models", total=len(cells))
                tasks: dict[str, int] = {}

                def on_progress(cell, step, steps):
                    if cell.key not in tasks:
                        tasks[cell.key] = progress.add_task(
                            f"  α={alpha_label(cell.alpha)} R={cell.repetitions} seed={cell.seed}", total=steps)
                    progress.update(tasks[cell.key], completed=step)

                def on_cell(cell, result):
                    progress.advance(overall)
                    if cell.key in tasks:
                        progress.remove_task(tasks.pop(cell.key))
                    progress.console.print(
                        f"  done α={alpha_label(cell.alpha)} R={cell.repetitions} seed={cell.seed}: AR final "
                        f"{result['ar_final']:.3f} (min {result['ar_min']:.3f}), MD {result['md_elbo']:.3f} bits/byte"
                        f", {result['seconds']:.0f}s")

                stored = load_results(Path(out))["cells"]
                progress.update(overall, completed=len(cells) - len(pending_cells(config, stored)))
                record = run_grid(config, out, jobs=n_jobs, on_cell=on_cell, on_progress=on_progress)
        except DualObjError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(2) from err
        # Summarise only this grid's cells (the file may hold more from an earlier, larger grid).
        keys = {c.key for c in cells}
        sig = config.signature()
        mine = {"cells": {k: v for k, v in record["cells"].items() if k in keys and v.get("signature") == sig}}
        summary = summarize(mine)
        paths = plot(mine, out)
        if as_json:
            typer.echo(json.dumps({"config": config.to_dict(), "summary": summary,
                                   "plots": [str(p) for p in paths]}, indent=1))
            return
        console.print(render_table(summary))
        console.print("Bits per byte (lower is better); ★ best α per R; rise = final − min of the AR curve; "
                      "prefix = second half of each row given a bidirectional (vs causal) first half; "
                      "probe = next-line accuracy (chance 1/4).")
        for p in paths:
            console.print(f"plot: {p}")
