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


def _names(text: str | None, name: str) -> tuple[str, ...] | None:
    from dualobj._errors import fail

    if text is None:
        return None
    names = tuple(p for p in text.replace(" ", "").split(",") if p)
    if not names:
        raise fail(name, "a comma-separated list of names", repr(text))
    return names


def register(app: typer.Typer) -> None:
    """Add the ``repro`` command to ``app``."""

    @app.command()
    def repro(
        quick: bool = typer.Option(False, "--quick", help="The few-minute grid (same as --grid quick)."),
        grid: str = typer.Option("paper", "--grid", help="Preset: quick, paper or objectives."),
        alphas: str = typer.Option(None, "--alphas", help="AR weights, e.g. '1,3/4,1/2,0' (overrides the preset)."),
        objectives: str = typer.Option(None, "--objectives",
                                       help="Objective axis beside the α axis, e.g. 'ar,md' (overrides the preset)."),
        repetitions: str = typer.Option(None, "--repetitions", help="Repetition counts R, e.g. '1,32'."),
        budget: int = typer.Option(None, "--budget", help="Training tokens per model."),
        seeds: int = typer.Option(None, "--seeds", help="Seeds per (α or objective, R): mean ± std."),
        out: str = typer.Option("repro-out", "--out", help="Output folder (results.json, plots); resumed."),
        data: str = typer.Option(None, "--data", help="Your text file or folder (default: Python's stdlib)."),
        jobs: int = typer.Option(None, "--jobs", help="Worker processes, one torch thread each (default: 2)."),
        wait: bool = typer.Option(False, "--wait", help="If another run is using OUT, wait for it instead of "
                                  "refusing."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
    ) -> None:
        """Train one small model per (α or objective, R, seed) at a fixed token budget and compare them on held-out
        text.

        Each model is evaluated on held-out test files in AR mode (bits per byte, final and early-stopped at the
        point chosen on a separate validation split), MD mode (ELBO), as a prefix LM and on a next-line zero-shot
        probe. Results go to OUT/results.json (written atomically after every model and stored under the full
        setting signature, so an interrupted grid resumes and other settings' results are kept), OUT/curves.png
        and OUT/final_vs_alpha.png. One run at a time may use OUT.
        """
        import dataclasses
        import json
        import os
        import signal

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from dualobj._errors import DualObjError, fail
        from dualobj.data import load_corpus
        from dualobj.experiments import (
            PRESETS,
            GridConfig,
            check_data,
            grid_cells,
            load_results,
            pending_cells,
            plot,
            render_table,
            run_grid,
            summarize,
        )
        from dualobj.experiments._runner import Stopped, prepare_out

        console = Console(stderr=as_json)
        if not console.is_terminal:  # logs and pipes: keep the table's rows on one line each
            console.width = max(console.width, 140)
        def on_term(signum, frame):
            raise Stopped(signum)

        old_term = signal.signal(signal.SIGTERM, on_term)
        try:
            name = "quick" if quick else grid
            if name not in PRESETS:
                raise fail("grid", "one of " + ", ".join(PRESETS), repr(name))
            changes = {"alphas": _floats(alphas, "alphas"), "objectives": _names(objectives, "objectives"),
                       "repetitions": _ints(repetitions, "repetitions"), "budget": budget, "seeds": seeds,
                       "data": data}
            if objectives is not None and alphas is None:
                changes["alphas"] = ()  # --objectives alone: only the objective axis
            if data is not None:
                load_corpus(data)  # fail fast on a bad path or an empty file
                changes["data"] = os.path.abspath(data)
            config = dataclasses.replace(PRESETS[name], **{k: v for k, v in changes.items() if v is not None})
            if not isinstance(config, GridConfig):  # pragma: no cover
                raise fail("grid", "a GridConfig", type(config).__name__)
            if jobs is not None and (isinstance(jobs, bool) or jobs < 1):
                raise fail("jobs", "an int >= 1", jobs)
            n_jobs = jobs if jobs is not None else min(2, os.cpu_count() or 1)
            cells = config.cells()
            axes = []
            if config.alphas:
                axes.append(f"{len(config.alphas)} α")
            if config.objectives:
                axes.append(f"{len(config.objectives)} objective(s) ({', '.join(config.objectives)})")
            console.print(f"[bold]dualobj repro[/] grid={name}: {' + '.join(axes)} × {len(config.repetitions)} R "
                          f"× {config.seeds} seeds = {len(cells)} models, {config.budget:,} tokens each, "
                          f"{n_jobs} worker(s); results in {out}")
            prepare_out(out)  # a bad --out is reported before the data is read
            held = check_data(config)  # before any training: splits, sizes, probe
            console.print(
                f"held-out: {held['files']['test']} test / {held['files']['validation']} validation / "
                f"{held['files']['train']} training files ({held['families']} near-duplicate families"
                f"{', documents cut into pieces' if held['pieces'] else ''}); {held['test_tokens']:,} test tokens, "
                f"largest file share {held['max_file_share']:.1%}; test 32-byte windows found in the training "
                f"text: {held['test_window_overlap_train']:.1%}; probe: {held['probe_questions']} questions")
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=False) as progress:
                overall = progress.add_task("models", total=len(cells))
                tasks: dict[str, int] = {}

                def on_progress(cell, step, steps):
                    if cell.key not in tasks:
                        tasks[cell.key] = progress.add_task(
                            f"  {cell.label} R={cell.repetitions} seed={cell.seed}", total=steps)
                    progress.update(tasks[cell.key], completed=step)

                def on_cell(cell, result):
                    progress.advance(overall)
                    if cell.key in tasks:
                        progress.remove_task(tasks.pop(cell.key))
                    progress.console.print(
                        f"  done {cell.label} R={cell.repetitions} seed={cell.seed}: AR final "
                        f"{result['ar_final']:.3f} (early-stopped {result['ar_min']:.3f}), MD "
                        f"{result['md_elbo']:.3f} bits/byte, {result['seconds']:.0f}s")

                try:
                    stored = load_results(out)
                except DualObjError:
                    stored = {"cells": {}}  # run_grid reports it (after taking the lock)
                progress.update(overall, completed=len(cells) - len(pending_cells(config, stored)))
                record = run_grid(config, out, jobs=n_jobs, on_cell=on_cell, on_progress=on_progress, wait=wait)
            mine = grid_cells(record, config)
            summary = summarize(mine)
            paths = plot(mine, out)
        except DualObjError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(2) from err
        except OSError as err:
            console.print(f"[red]error:[/] {getattr(err, 'filename', None) or out}: {err.strerror or err}")
            raise typer.Exit(2) from err
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            console.print(f"[yellow]stopped[/] by signal {signal.Signals(signum).name}: finished models are saved "
                          f"in {out}; run the same command again to resume.")
            raise typer.Exit(128 + int(signum)) from err
        finally:
            signal.signal(signal.SIGTERM, old_term)
        if as_json:
            typer.echo(json.dumps({"config": config.to_dict(), "heldout": held, "summary": summary,
                                   "plots": [str(p) for p in paths]}, indent=1))
            return
        console.print(render_table(summary))
        console.print("Test-split bits per byte (lower is better); ★ best per R; AR min = the test loss at the "
                      "point where the validation loss is lowest; rise = final − AR min; prefix = second half of "
                      "each row given a bidirectional (vs causal) first half; probe = next-line accuracy "
                      f"(chance 1/{config.probe_options}, {held['probe_questions']} questions).")
        for p in paths:
            console.print(f"plot: {p}")
