"""Running a grid: resume from the results file, train missing cells (in worker processes), save atomically."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import tempfile
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from dualobj._errors import describe, fail
from dualobj.experiments._grid import Cell, GridConfig, train_cell

RESULTS_FILE = "results.json"
FORMAT_VERSION = 1

OnCell = Callable[[Cell, dict], None]
OnProgress = Callable[[Cell, int, int], None]


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a reader
    (or an interrupted run) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(out: Path) -> dict:
    """The results file in ``out`` (an empty record when there is none)."""
    path = out / RESULTS_FILE
    if not path.exists():
        return {"version": FORMAT_VERSION, "cells": {}}
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise fail("out", f"a folder whose {RESULTS_FILE} is valid JSON", f"{str(path)!r} ({err})") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("cells"), dict):
        raise fail("out", f"a folder whose {RESULTS_FILE} was written by dualobj repro", str(path))
    return payload


def pending_cells(config: GridConfig, stored: dict) -> list[Cell]:
    """The cells of ``config`` without a stored result trained under the same settings."""
    sig = config.signature()
    return [c for c in config.cells() if stored.get(c.key, {}).get("signature") != sig]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _worker_run(config: GridConfig, cell: Cell, events: queue.Queue) -> dict:
    every = 10

    def progress(step: int, total: int) -> None:
        if step % every == 0 or step == total:
            events.put((cell.key, step, total))

    return train_cell(config, cell, progress)


def run_grid(
    config: GridConfig,
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    on_cell: OnCell | None = None,
    on_progress: OnProgress | None = None,
    max_cells: int | None = None,
) -> dict:
    """Train every missing cell of ``config`` and keep ``out/results.json`` up to date after each one.

    Cells already stored with the same training settings (:meth:`GridConfig.signature`) are kept, so an
    interrupted grid resumes where it stopped and a grid can be extended with more α, R or seeds.

    Args:
        config: the grid.
        out: the output folder (created).
        jobs: worker processes (each with one torch thread); 1 trains in this process.
        on_cell: called as ``on_cell(cell, result)`` after each cell is saved.
        on_progress: called as ``on_progress(cell, step, steps)`` during training.
        max_cells: stop after training this many cells (for tests and partial runs).

    Returns:
        The results record: ``{"version", "config", "cells": {key: result}}``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise fail("jobs", "an int >= 1", describe(jobs))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise fail("out", "a folder (or a path to create one)", f"{str(out)!r}, which is a file")
    record = load_results(out)
    record["version"] = FORMAT_VERSION
    record["config"] = config.to_dict()
    sig = config.signature()
    todo = pending_cells(config, record["cells"])
    if max_cells is not None:
        todo = todo[:max_cells]
    path = out / RESULTS_FILE
    write_json_atomic(path, record)

    def save(cell: Cell, result: dict) -> None:
        result["signature"] = sig
        record["cells"][cell.key] = result
        write_json_atomic(path, record)
        if on_cell is not None:
            on_cell(cell, result)

    if jobs == 1 or len(todo) <= 1:
        for cell in todo:
            cb = None if on_progress is None else (lambda s, n, c=cell: on_progress(c, s, n))
            save(cell, train_cell(config, cell, cb))
        return record
    by_key = {c.key: c for c in todo}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        events = manager.Queue()
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(_worker_run, config, c, events): c for c in todo}
            try:
                while futures:
                    done, _ = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
                    _drain(events, by_key, on_progress)
                    for fut in done:
                        save(futures.pop(fut), fut.result())
                _drain(events, by_key, on_progress)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    return record


def _drain(events: queue.Queue, by_key: dict[str, Cell], on_progress: OnProgress | None) -> None:
    while True:
        try:
            key, step, total = events.get_nowait()
        except queue.Empty:
            return
        if on_progress is not None:
            on_progress(by_key[key], step, total)
