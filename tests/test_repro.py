"""``dualobj repro`` end to end on a tiny grid: results, resume after interruption, CLI errors, summaries."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
from typer.testing import CliRunner

from dualobj import DualObjError
from dualobj.cli import app
from dualobj.experiments import (
    OBJECTIVES,
    PRESETS,
    RESULTS_FILE,
    Cell,
    GridConfig,
    _runner,
    cell_id,
    check_data,
    folder_lock,
    grid_cells,
    load_results,
    plot,
    render_table,
    run_grid,
    summarize,
    write_json_atomic,
)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for f in range(40):
        lines = [f"def f{f}_{i}(x):\n    return x * {i} + {f}  # line {i}\n" for i in range(30)]
        (root / f"mod{f}.py").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def tiny(corpus_dir) -> GridConfig:
    return GridConfig(
        alphas=(1.0, 0.0), repetitions=(1, 2), budget=1024, seeds=1, dim=16, layers=1, heads=2, seq_len=32,
        batch_size=4, curve_points=2, heldout_tokens=256, validation_tokens=128, elbo_tokens=128, elbo_samples=1,
        probe_questions=4, probe_options=2, data=str(corpus_dir),
    )


def test_tiny_grid_end_to_end(tiny, tmp_path):
    seen = []
    record = run_grid(tiny, tmp_path, on_cell=lambda c, r: seen.append(c.key))
    sig = tiny.signature()
    assert len(seen) == 4 and set(record["cells"]) == {f"{sig}/{c.key}" for c in tiny.cells()}
    stored = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert stored["cells"] == json.loads(json.dumps(record["cells"]))
    assert stored["settings"][sig]["config"] == json.loads(json.dumps(tiny.to_dict()))
    assert stored["settings"][sig]["heldout"]["max_file_share"] <= 1.0
    for cell in stored["cells"].values():
        assert cell["steps"] == 1024 // (4 * 32)
        assert cell["unique_tokens"] == 1024 // cell["repetitions"]
        assert len(cell["curve"]) == len(cell["curve_validation"]) == 2
        # Early stopping is chosen on the validation curve and reported on the test curve.
        best = min(range(2), key=lambda i: cell["curve_validation"][i][1])
        assert cell["ar_min"] == cell["curve"][best][1] and cell["ar_min_tokens"] == cell["curve"][best][0]
        assert cell["ar_test_min"] == min(v for _, v in cell["curve"]) <= cell["ar_min"]
        assert cell["ar_final"] == cell["curve"][-1][1]
        for key in ("md_elbo", "prefix", "prefix_causal"):
            assert 0 < cell[key] < 20
        assert set(cell["probe"]) == set(tiny.probe_modes) == {"ar", "prefix"}
        for mode, acc in cell["probe"].items():
            assert cell["probe_se"][mode] == pytest.approx((acc * (1 - acc) / cell["probe_questions"]) ** 0.5)
        assert 0 <= cell["window_overlap"] <= 1
    mine = grid_cells(stored, tiny)
    summary = summarize(mine)
    assert len(summary["rows"]) == 4 and set(summary["best"]) == {1, 2}
    paths = plot(mine, tmp_path)
    assert [p.name for p in paths] == ["curves.png", "final_vs_alpha.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_table(summary))
    assert "★" in console.export_text()


def test_objective_axis_beside_the_alpha_axis(tiny, tmp_path):
    config = dataclasses.replace(tiny, alphas=(1.0,), objectives=("ar", "md", "bd4"), repetitions=(2,))
    assert [c.key for c in config.cells()] == ["a=1,R=2,seed=0", "obj=ar,R=2,seed=0", "obj=md,R=2,seed=0",
                                               "obj=bd4,R=2,seed=0"]
    record = grid_cells(run_grid(config, tmp_path), config)["cells"]
    assert record["obj=ar,R=2,seed=0"]["objective"] == "ar" and record["obj=ar,R=2,seed=0"]["alpha"] is None
    # AR rows need no random draw, so the "ar" objective and α = 1 train the same model on the same batches.
    for key in ("ar_final", "ar_min", "md_elbo", "prefix"):
        assert record["obj=ar,R=2,seed=0"][key] == pytest.approx(record["a=1,R=2,seed=0"][key], rel=1e-5)
    # the objective axis follows each model's own bound; the α axis does not
    assert "bound_final" not in record["a=1,R=2,seed=0"]
    for key in ("obj=ar,R=2,seed=0", "obj=md,R=2,seed=0", "obj=bd4,R=2,seed=0"):
        cell = record[key]
        assert len(cell["bound_curve"]) == len(cell["curve"]) == len(cell["bound_curve_validation"])
        assert cell["bound_final"] == cell["bound_curve"][-1][1] and 0 < cell["bound_final"] < 20
        assert cell["bound_min"] in [v for _, v in cell["bound_curve"]]
    rows = summarize({"cells": record})["rows"]
    assert [(r["alpha"], r["objective"]) for r in rows] == [(1.0, "dual"), (None, "ar"), (None, "bd4"), (None, "md")]
    assert all("bound_rise" in r for r in rows[1:]) and "bound_rise" not in rows[0]
    assert set(OBJECTIVES) >= {"ar", "md", "bd4", "bd16"}
    with pytest.raises(DualObjError, match="objectives"):
        dataclasses.replace(tiny, objectives=("bd3",))
    with pytest.raises(DualObjError, match="alphas"):
        dataclasses.replace(tiny, alphas=(), objectives=())
    assert Cell(None, 4, 1, "md").label == "md" and Cell(0.75, 4, 1).label == "α=3/4"


def test_objectives_preset_is_small():
    config = PRESETS["objectives"]
    assert set(config.objectives) >= {"ar", "bd4", "bd16", "md"} and config.repetitions == (32,)
    assert len(config.cells()) <= 10 and config.budget <= 750_000


def test_resume_after_interruption(tiny, tmp_path, monkeypatch):
    calls = []
    real = _runner.train_cell

    def counting(config, cell, progress=None):
        calls.append(cell.key)
        return real(config, cell, progress)

    monkeypatch.setattr(_runner, "train_cell", counting)

    def interrupt(cell, result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_grid(tiny, tmp_path, on_cell=interrupt)
    first = load_results(tmp_path)
    assert list(first["cells"]) == [cell_id(tiny, tiny.cells()[0])] and calls == [tiny.cells()[0].key]
    run_grid(tiny, tmp_path)
    assert calls[1:] == [c.key for c in tiny.cells()[1:]]  # the finished cell is not retrained
    assert load_results(tmp_path)["cells"][cell_id(tiny, tiny.cells()[0])] == first["cells"][cell_id(tiny,
                                                                                                 tiny.cells()[0])]
    # A grid extended with another seed trains only the new cells.
    calls.clear()
    run_grid(dataclasses.replace(tiny, seeds=2), tmp_path, max_cells=1)
    assert calls == [c.key for c in dataclasses.replace(tiny, seeds=2).cells() if c.seed == 1][:1]
    # Another setting trains its own cells and keeps the others' results and settings.
    calls.clear()
    before = load_results(tmp_path)
    other = dataclasses.replace(tiny, lr=1e-3, alphas=(1.0,), repetitions=(2,))
    after = run_grid(other, tmp_path)
    assert calls == ["a=1,R=2,seed=0"]
    assert {k: v for k, v in after["cells"].items() if k in before["cells"]} == before["cells"]
    assert len(after["cells"]) == len(before["cells"]) + 1
    assert after["settings"][tiny.signature()]["config"]["lr"] == tiny.lr
    assert after["settings"][other.signature()]["config"]["lr"] == 1e-3
    assert grid_cells(after, other)["cells"]["a=1,R=2,seed=0"]["signature"] == other.signature()
    assert grid_cells(after, tiny)["cells"]["a=1,R=2,seed=0"]["signature"] == tiny.signature()


def test_first_format_results_are_rekeyed(tmp_path):
    old = {"version": 1, "config": {"lr": 1}, "cells": {"a=1,R=2,seed=0": {"signature": "abc", "ar_final": 1.0}}}
    (tmp_path / RESULTS_FILE).write_text(json.dumps(old))
    record = load_results(tmp_path)
    assert record["cells"] == {"abc/a=1,R=2,seed=0": old["cells"]["a=1,R=2,seed=0"]}
    assert record["settings"] == {"abc": {"config": {"lr": 1}}}


def test_two_worker_processes(tiny, tmp_path):
    progress = []
    config = dataclasses.replace(tiny, repetitions=(2,))
    record = run_grid(config, tmp_path, jobs=2, on_progress=lambda c, s, n: progress.append((c.key, s, n)))
    assert set(grid_cells(record, config)["cells"]) == {c.key for c in config.cells()}
    assert {k for k, _, _ in progress} == {c.key for c in config.cells()}
    assert all(n == 1024 // (4 * 32) for _, _, n in progress)
    # Worker processes are seeded like the main process: the same cell gives the same numbers.
    again = run_grid(config, tmp_path / "single", jobs=1)
    for key, cell in record["cells"].items():
        assert again["cells"][key]["ar_final"] == pytest.approx(cell["ar_final"], rel=1e-5)


def test_cli_runs_the_quick_preset(tiny, tmp_path, monkeypatch, corpus_dir):
    monkeypatch.setitem(PRESETS, "quick", dataclasses.replace(tiny, data=None, repetitions=(2,)))
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["repro", "--quick", "--out", str(out), "--data", str(corpus_dir), "--jobs", "1",
                              "--alphas", "1,1/2", "--seeds", "1"])
    assert res.exit_code == 0, res.output
    assert "best" in res.output or "★" in res.output
    assert (out / "curves.png").exists() and (out / "final_vs_alpha.png").exists()
    res = runner.invoke(app, ["repro", "--quick", "--out", str(out), "--data", str(corpus_dir), "--jobs", "1",
                              "--alphas", "1,1/2", "--seeds", "1", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout[res.stdout.index("{"):])
    assert [r["alpha"] for r in payload["summary"]["rows"]] == [1.0, 0.5]
    assert payload["config"]["data"] == str(corpus_dir.resolve())


@pytest.mark.parametrize("case", ["missing", "empty", "empty-folder", "alphas", "grid", "objectives",
                                  "no-objectives", "jobs"])
def test_cli_errors(case, tmp_path):
    args = ["repro", "--out", str(tmp_path / "out"), "--jobs", "1"]
    if case == "missing":
        args += ["--data", str(tmp_path / "nope.txt")]
        word = "does not exist"
    elif case == "empty":
        (tmp_path / "e.txt").write_text("")
        args += ["--data", str(tmp_path / "e.txt")]
        word = "empty"
    elif case == "empty-folder":
        (tmp_path / "d").mkdir()
        args += ["--data", str(tmp_path / "d")]
        word = "holds none"
    elif case == "alphas":
        args += ["--alphas", "1,x"]
        word = "alphas"
    elif case == "objectives":
        args += ["--objectives", "ar,bd3"]
        word = "objectives"
    elif case == "no-objectives":
        args += ["--objectives", ","]
        word = "objectives"
    elif case == "jobs":
        args = [a if a != "1" else "0" for a in args]
        word = "jobs"
    else:
        args += ["--grid", "huge"]
        word = "grid"
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert "error" in res.output and word in " ".join(res.output.split())
    assert not (tmp_path / "out" / RESULTS_FILE).exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / RESULTS_FILE
    write_json_atomic(path, {"cells": {"a": 1}})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"cells": {"a": object()}})
    assert json.loads(path.read_text()) == {"cells": {"a": 1}}
    assert [p.name for p in tmp_path.iterdir()] == [RESULTS_FILE]
    path.write_text("{not json")
    with pytest.raises(DualObjError, match="valid JSON"):
        load_results(tmp_path)


def test_summarize_mean_std_and_best():
    def cell(alpha, R, seed, final, low, md):
        return {"alpha": alpha, "repetitions": R, "seed": seed, "unique_tokens": 100, "ar_final": final,
                "ar_min": low, "md_elbo": md, "prefix": 1.0, "prefix_causal": 1.1,
                "probe": {"ar": 0.5, "prefix": 0.5, "md": 0.25}, "curve": [[1, low], [2, final]]}

    cells = [cell(1.0, 8, 0, 3.0, 2.0, 4.0), cell(1.0, 8, 1, 3.2, 2.2, 4.0), cell(0.5, 8, 0, 2.5, 2.4, 3.0),
             cell(0.5, 8, 1, 2.7, 2.6, 3.2), cell(0.0, 8, 0, 3.5, 3.5, 2.9)]
    summary = summarize({"cells": {str(i): c for i, c in enumerate(cells)}})
    rows = {r["alpha"]: r for r in summary["rows"]}
    assert rows[1.0]["ar_final"][0] == pytest.approx(3.1)
    assert rows[1.0]["ar_final"][1] == pytest.approx(statistics.stdev([3.0, 3.2]))
    assert rows[1.0]["ar_rise"][0] == pytest.approx(1.0)
    assert rows[0.0]["seeds"] == 1 and rows[0.0]["ar_final"][1] == 0.0
    assert summary["best"][8] == {"ar_final": 0.5, "ar_min": 1.0, "md_elbo": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"alphas": (1.5,)}, "alphas"), ({"alphas": ()}, "alphas"), ({"repetitions": (0,)}, "repetitions"),
     ({"budget": 100}, "budget"), ({"seeds": 0}, "seeds")],
)
def test_bad_grid_config(kwargs, word):
    with pytest.raises(DualObjError, match=word):
        GridConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# --data checks before training, and path or file problems: clear errors, never a traceback.


def _text_file(path, size):
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs %d.\n"
    lines, total, i = [], 0, 0
    while total < size:
        lines.append(line % i)
        total += len(lines[-1])
        i += 1
    path.write_bytes(b"".join(lines))
    return path


def test_one_text_file_of_a_few_hundred_kilobytes(tiny, tmp_path, monkeypatch):
    f = _text_file(tmp_path / "book.txt", 300_000)
    # The real quick preset accepts it (checked before any training, without training).
    stats = check_data(dataclasses.replace(PRESETS["quick"], data=str(f)))
    assert stats["pieces"] and stats["test_tokens"] == PRESETS["quick"].heldout_tokens
    assert stats["probe_questions"] >= 278
    # And the CLI runs to the end on it (a small grid, for time).
    monkeypatch.setitem(PRESETS, "quick", dataclasses.replace(tiny, alphas=(0.5,), repetitions=(2,)))
    res = CliRunner().invoke(app, ["repro", "--quick", "--out", str(tmp_path / "out"), "--data", str(f),
                                   "--jobs", "1", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout[res.stdout.index("{"):])
    assert payload["heldout"]["pieces"] and [r["alpha"] for r in payload["summary"]["rows"]] == [0.5]


def test_data_too_small_for_the_grid_fails_before_training(tmp_path, monkeypatch):
    f = _text_file(tmp_path / "small.txt", 60_000)
    calls = []
    monkeypatch.setattr(_runner, "train_cell", lambda *a, **k: calls.append(a))
    res = CliRunner().invoke(app, ["repro", "--grid", "paper", "--out", str(tmp_path / "out"), "--data", str(f),
                                   "--jobs", "1"])
    assert res.exit_code == 2 and not calls
    text = " ".join(res.output.split())
    assert "error" in text and "data" in text and "Traceback" not in text
    assert not (tmp_path / "out" / RESULTS_FILE).exists()


@pytest.mark.parametrize("case", ["under-file", "is-file", "binary", "not-json", "list", "cells-list", "cell-scalar",
                                  "results-dir", "unwritable", "uncreatable"])
def test_output_folder_problems_are_clear_errors(case, tiny, tmp_path, corpus_dir, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    results = out / RESULTS_FILE
    if case == "under-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "sub"
    elif case == "is-file":
        out = tmp_path / "f"
        out.write_text("x")
    elif case == "binary":
        results.write_bytes(b"\xff\xfe\x00\x81binary")
    elif case == "not-json":
        results.write_text("{not json")
    elif case == "list":
        results.write_text("[1, 2]")
    elif case == "cells-list":
        results.write_text('{"version": 2, "settings": {}, "cells": []}')
    elif case == "cell-scalar":
        results.write_text('{"version": 2, "settings": {}, "cells": {"x/a=1,R=2,seed=0": 3}}')
    elif case == "results-dir":
        results.mkdir()
    elif case == "uncreatable":
        import os

        if not os.path.isdir("/sys/kernel"):
            pytest.skip("needs a Linux sysfs, where no one may create a folder")
        out = "/sys/dualobj-out"
    else:
        import os

        if os.geteuid() == 0:
            pytest.skip("the superuser can write anywhere")
        out.chmod(0o500)
    with pytest.raises(DualObjError, match="out"):
        run_grid(tiny, out)
    monkeypatch.setitem(PRESETS, "quick", tiny)
    res = CliRunner().invoke(app, ["repro", "--quick", "--out", str(out), "--jobs", "1"])
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)  # no traceback
    assert "error" in res.output and "out" in res.output


def test_a_second_run_on_a_folder_in_use_is_refused(tiny, tmp_path, monkeypatch):
    with folder_lock(tmp_path):
        with pytest.raises(DualObjError, match="in use by the run with process id"):
            run_grid(tiny, tmp_path)
        monkeypatch.setitem(PRESETS, "quick", tiny)
        res = CliRunner().invoke(app, ["repro", "--quick", "--out", str(tmp_path), "--jobs", "1"])
        assert res.exit_code == 2 and "--wait" in " ".join(res.output.split())
    assert not (tmp_path / RESULTS_FILE).exists()
    with folder_lock(tmp_path):  # released
        pass


# ---------------------------------------------------------------------------------------------------------------
# Fault tests of the runner, in real processes: kill -9 then resume, two runs at once, SIGTERM.

SCRIPT = """
import json, sys
if __name__ == "__main__":
    from dualobj.cli import app
    from dualobj.experiments import PRESETS, GridConfig

    PRESETS["tiny"] = GridConfig(**json.loads(sys.argv[1]))
    sys.argv = ["dualobj", "repro", "--grid", "tiny", *sys.argv[2:]]
    app()
"""


def _fault_config(corpus_dir, **changes) -> GridConfig:
    base = dict(alphas=(1.0, 0.0), repetitions=(1, 2), budget=1024, seeds=1, dim=16, layers=1, heads=2,
                seq_len=32, batch_size=4, curve_points=2, heldout_tokens=256, validation_tokens=128,
                elbo_tokens=128, elbo_samples=1, probe_questions=4, probe_options=2, data=str(corpus_dir))
    base.update(changes)
    return GridConfig(**base)


def _launch(tmp_path, config: GridConfig, *args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import dualobj

    script = tmp_path / "run_tiny.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(dualobj.__file__).parents[1]))
    payload = json.dumps({k: v for k, v in config.to_dict().items()})
    return subprocess.Popen([sys.executable, str(script), payload, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _children(pid: int) -> list[int]:
    from pathlib import Path

    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(predicate, timeout: float) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _stored(out) -> int:
    try:
        return len(load_results(out)["cells"])
    except DualObjError:
        return 0


def _numbers(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k not in ("seconds", "cpu_seconds")}


needs_proc = pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/stat").exists(), reason="needs /proc")


@needs_proc
def test_kill_9_mid_grid_then_resume_equals_a_clean_run(corpus_dir, tmp_path):
    import os
    import signal

    config = _fault_config(corpus_dir)
    out = tmp_path / "killed"
    proc = _launch(tmp_path, config, "--out", str(out), "--jobs", "2")
    try:
        assert _wait_until(lambda: _stored(out) >= 1 or proc.poll() is not None, 120), "no cell saved"
        workers = _children(proc.pid)
        saved = _stored(out)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 1 <= saved < len(config.cells())
    assert _wait_until(lambda: not any(_alive(p) for p in workers), 15), "workers outlived their parent"
    resumed = run_grid(config, out, jobs=1)
    clean = run_grid(config, tmp_path / "clean", jobs=1)
    assert set(resumed["cells"]) == set(clean["cells"])
    for key, cell in clean["cells"].items():
        got = _numbers(resumed["cells"][key])
        for name, value in _numbers(cell).items():
            assert got[name] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), name


@needs_proc
def test_two_concurrent_runs_on_one_folder_lose_nothing(corpus_dir, tmp_path):
    first = _fault_config(corpus_dir, alphas=(1.0, 0.0), repetitions=(2,))
    second = _fault_config(corpus_dir, alphas=(0.0, 0.5), repetitions=(2,))
    out = tmp_path / "shared"
    procs = [_launch(tmp_path, c, "--out", str(out), "--jobs", "1", "--wait") for c in (first, second)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    record = load_results(out)
    want = {cell_id(first, c) for c in first.cells()} | {cell_id(second, c) for c in second.cells()}
    assert set(record["cells"]) == want and len(want) == 3  # both grids' cells, the shared one once


@needs_proc
def test_sigterm_stops_the_run_and_leaves_no_process(corpus_dir, tmp_path):
    import signal

    config = _fault_config(corpus_dir)
    out = tmp_path / "term"
    proc = _launch(tmp_path, config, "--out", str(out), "--jobs", "2")
    try:
        assert _wait_until(lambda: len(_children(proc.pid)) >= 2 or proc.poll() is not None, 60)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "resume" in output
    assert _wait_until(lambda: not any(_alive(p) for p in workers), 10), "a worker outlived the run"
    with folder_lock(out):  # the lock is free again
        pass


def test_a_cell_failing_in_a_worker_is_reported_and_nothing_is_left_running(tiny, tmp_path):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny.data, corpus)
    config = dataclasses.replace(tiny, data=str(corpus), repetitions=(2,))
    check_data(config)  # cached in this process: the run starts, then the workers cannot read the data
    shutil.rmtree(corpus)
    with pytest.raises(DualObjError, match="cell") as info:
        run_grid(config, tmp_path / "out", jobs=2)
    assert "does not exist" in str(info.value)
    assert load_results(tmp_path / "out")["cells"] == {}
    import multiprocessing

    assert multiprocessing.active_children() == []
