"""Running a grid without losing work: one run per output folder at a time (a lock), results stored under their
full setting signature, every cell saved atomically as it finishes, worker processes that stop with their parent,
and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dualobj._errors import DualObjError, check_int, describe, fail
from dualobj.experiments._grid import Cell, GridConfig, check_data, train_cell

RESULTS_FILE = "results.json"
LOCK_FILE = ".lock"
FORMAT_VERSION = 2

class Stopped(KeyboardInterrupt):
    """A run stopped by a signal (SIGTERM): handled like Ctrl-C, with the signal's number in ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


OnCell = Callable[[Cell, dict], None]
OnProgress = Callable[[Cell, int, int], None]


def _io_error(path: Path, err: OSError, what: str) -> DualObjError:
    return fail("out", what, f"{str(path)!r} ({err.strerror or err})")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a reader
    (or an interrupted run) never sees a half-written file.

    Raises:
        DualObjError: the folder cannot be written (named ``out``); the old file is then unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _io_error(path.parent, err, "a folder where results can be written") from err
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _io_error(path, err, "a results file that can be written") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _empty() -> dict:
    return {"version": FORMAT_VERSION, "settings": {}, "cells": {}}


def load_results(out: str | os.PathLike) -> dict:
    """The results record in ``out`` (an empty record when there is none).

    Returns:
        ``{"version": 2, "settings": {signature: {"config", "heldout"}}, "cells": {"<signature>/<cell key>":
        result}}``. A file of the first format (cells keyed without their signature) is read and re-keyed.

    Raises:
        DualObjError: ``out`` is not a folder, or its results file cannot be read, is not UTF-8 JSON, or does not
            have the structure written by ``dualobj repro``.
    """
    out = Path(out)
    path = out / RESULTS_FILE
    if out.exists() and not out.is_dir():
        raise fail("out", "a folder (or a path to create one)", f"{str(out)!r}, which is a file")
    if not path.exists():
        return _empty()
    if not path.is_file():
        raise fail("out", f"a folder whose {RESULTS_FILE} is a regular file", repr(str(path)))
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _io_error(path, err, f"a readable {RESULTS_FILE}") from err
    try:
        payload = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise fail("out", f"a folder whose {RESULTS_FILE} is UTF-8 JSON",
                   f"{str(path)!r}, which holds binary bytes (use another --out, or move the file away)") from err
    except json.JSONDecodeError as err:
        raise fail("out", f"a folder whose {RESULTS_FILE} is valid JSON",
                   f"{str(path)!r} ({err}; use another --out, or move the file away)") from err
    wrong = fail("out", f"a folder whose {RESULTS_FILE} was written by dualobj repro",
                 f"{str(path)!r}, which has another structure (use another --out, or move the file away)")
    if not isinstance(payload, dict) or not isinstance(payload.get("cells"), dict):
        raise wrong
    cells = payload["cells"]
    if not all(isinstance(v, dict) and isinstance(v.get("signature"), str) for v in cells.values()):
        raise wrong
    if payload.get("version", 1) == 1:  # first format: keys without the signature, one "config"
        record = _empty()
        for key, cell in cells.items():
            record["cells"][f"{cell['signature']}/{key}"] = cell
            record["settings"].setdefault(cell["signature"], {"config": payload.get("config")})
        return record
    if payload.get("version") != FORMAT_VERSION or not isinstance(payload.get("settings"), dict):
        raise wrong
    if not all(k.split("/", 1)[0] == v["signature"] for k, v in cells.items()):
        raise wrong
    return payload


def cell_id(config: GridConfig, cell: Cell) -> str:
    """The key of ``cell`` trained under ``config``'s settings in the results file: ``"<signature>/<cell key>"``."""
    return f"{config.signature()}/{cell.key}"


def grid_cells(record: dict, config: GridConfig) -> dict:
    """``{"cells": {cell key: result}}`` for the stored cells of ``config`` (its axes and its settings only)."""
    cells = record.get("cells", {})
    return {"cells": {c.key: cells[cell_id(config, c)] for c in config.cells() if cell_id(config, c) in cells}}


def pending_cells(config: GridConfig, record: dict) -> list[Cell]:
    """The cells of ``config`` without a stored result trained under the same settings."""
    cells = record.get("cells", {})
    return [c for c in config.cells() if cell_id(config, c) not in cells]


@contextlib.contextmanager
def folder_lock(out: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock of the output folder ``out`` (an OS file lock on ``out/.lock``, released by the OS even when
    the holder is killed).

    Args:
        out: an existing folder.
        wait: wait for another run to finish instead of refusing.

    Raises:
        DualObjError: another run holds the lock (``wait=False``), or the lock file cannot be written.
    """
    path = out / LOCK_FILE
    try:
        f = open(path, "a+")
    except OSError as err:
        raise _io_error(out, err, "a folder where dualobj repro can write") from err
    try:
        if not _lock_file(f, wait):
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise fail("out", "a folder that no other dualobj repro run is using",
                       f"{str(out)!r}, in use by the run with process id {holder} (wait for it to finish, pass --wait,"
                       " or use another --out)")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()  # closing the descriptor releases the lock


def _lock_file(f, wait: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        while True:
            try:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not wait:
                    return False
                time.sleep(0.5)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def prepare_out(out: str | os.PathLike) -> Path:
    """Create the output folder ``out`` if needed and check that it can be written.

    Raises:
        DualObjError: ``out`` is a file, lies under a file, cannot be created or is not writable.
    """
    if not isinstance(out, (str, os.PathLike)):
        raise fail("out", "a folder path", describe(out))
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise fail("out", "a folder (or a path to create one)", f"{str(out)!r}, which is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _io_error(path, err, "a folder that can be created") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise fail("out", "a folder dualobj repro can write to", f"{str(out)!r}, which is not writable")
    return path


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, turn SIGTERM into ``KeyboardInterrupt`` so cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_grid(
    config: GridConfig,
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    on_cell: OnCell | None = None,
    on_progress: OnProgress | None = None,
    max_cells: int | None = None,
    wait: bool = False,
) -> dict:
    """Train every missing cell of ``config`` and keep ``out/results.json`` up to date after each one.

    The data is checked (:func:`dualobj.experiments.check_data`) before anything is trained. Results are stored
    under their setting signature (:meth:`GridConfig.signature`): an interrupted grid resumes where it stopped,
    a grid can be extended with more α, objectives, R or seeds, and a run with other settings adds its cells
    beside the stored ones instead of replacing them. One run at a time uses a folder (:func:`folder_lock`).
    SIGTERM stops the run like Ctrl-C (``KeyboardInterrupt``): finished cells are kept and worker processes
    are stopped; workers also stop on their own when this process dies.

    Args:
        config: the grid.
        out: the output folder (created).
        jobs: worker processes (each with one torch thread); 1 trains in this process.
        on_cell: called as ``on_cell(cell, result)`` after each cell is saved.
        on_progress: called as ``on_progress(cell, step, steps)`` during training.
        max_cells: stop after training this many cells (for tests and partial runs).
        wait: wait for another run using ``out`` to finish instead of refusing.

    Returns:
        The whole results record: ``{"version", "settings", "cells"}`` (see :func:`load_results`).

    Raises:
        DualObjError: bad arguments, unusable data, an output folder that cannot be used, another run holding
            ``out``, or a cell that failed in a worker.
    """
    if not isinstance(config, GridConfig):
        raise fail("config", "a GridConfig", describe(config))
    jobs = check_int("jobs", jobs, low=1)
    if max_cells is not None:
        max_cells = check_int("max_cells", max_cells, low=0)
    path_out = prepare_out(out)
    with _sigterm_as_interrupt():
        heldout = check_data(config)
        with folder_lock(path_out, wait=wait):
            record = load_results(path_out)
            sig = config.signature()
            record["settings"][sig] = {"config": config.to_dict(), "heldout": heldout}
            todo = pending_cells(config, record)
            if max_cells is not None:
                todo = todo[:max_cells]
            path = path_out / RESULTS_FILE
            write_json_atomic(path, record)

            def save(cell: Cell, result: dict) -> None:
                result["signature"] = sig
                record["cells"][cell_id(config, cell)] = result
                write_json_atomic(path, record)
                if on_cell is not None:
                    on_cell(cell, result)

            if jobs == 1 or len(todo) <= 1:
                for cell in todo:
                    cb = None if on_progress is None else (lambda s, n, c=cell: on_progress(c, s, n))
                    save(cell, train_cell(config, cell, cb))
            else:
                _run_workers(config, todo, min(jobs, len(todo)), save, on_progress)
    return record


# ----------------------------------------------------------------------------------------------------------------
# Worker processes.


def _die_with_parent(parent: int) -> None:
    """Exit this worker as soon as its parent process is gone: PR_SET_PDEATHSIG where Linux offers it, and a
    watchdog thread everywhere (the parent id changes when the parent dies)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dualobj-parent-watch").start()


def _worker_main(tasks, events, parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the workers
    import torch

    torch.set_num_threads(1)
    while True:
        item = tasks.get()
        if item is None:
            return
        config, cell = item
        last = [0.0]

        def progress(step: int, total: int, cell: Cell = cell, last: list = last) -> None:
            now = time.monotonic()
            if now - last[0] > 0.2 or step == total:
                last[0] = now
                events.put(("progress", cell.key, (step, total)))

        try:
            events.put(("done", cell.key, train_cell(config, cell, progress)))
        except Exception as err:  # reported to the parent, which raises it there
            events.put(("error", cell.key, f"{type(err).__name__}: {err}"))


def _run_workers(config: GridConfig, todo: list[Cell], jobs: int, save: Callable[[Cell, dict], None],
                 on_progress: OnProgress | None) -> None:
    ctx = multiprocessing.get_context("spawn")
    tasks, events = ctx.Queue(), ctx.Queue()
    for cell in todo:
        tasks.put((config, cell))
    for _ in range(jobs):
        tasks.put(None)
    workers = [ctx.Process(target=_worker_main, args=(tasks, events, os.getpid()), daemon=True,
                           name=f"dualobj-repro-{i}") for i in range(jobs)]
    by_key = {c.key: c for c in todo}
    try:
        for w in workers:
            w.start()
        while by_key:
            try:
                kind, key, payload = events.get(timeout=0.25)
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if not dead and any(w.exitcode is None for w in workers):
                    continue
                try:  # a worker has stopped: read what it sent before it did
                    kind, key, payload = events.get(timeout=1.0)
                except queue.Empty:
                    code = dead[0].exitcode if dead else 0
                    raise fail("jobs", "worker processes that finish their cells",
                               f"a worker that exited with code {code} before "
                               f"{len(by_key)} cell(s) were done") from None
            if kind == "progress":
                if on_progress is not None and key in by_key:
                    on_progress(by_key[key], *payload)
            elif kind == "done":
                save(by_key.pop(key), payload)
            else:
                raise fail("cell", "a cell that trains without error", f"{key}: {payload}")
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        deadline = time.monotonic() + 5
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                w.kill()
                w.join()
        for q in (tasks, events):
            q.cancel_join_thread()
            q.close()
