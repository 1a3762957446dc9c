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
    PRESETS,
    RESULTS_FILE,
    GridConfig,
    _runner,
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
        batch_size=4, curve_points=2, heldout_tokens=256, elbo_tokens=128, elbo_samples=1, probe_questions=4,
        probe_options=2, data=str(corpus_dir),
    )


def test_tiny_grid_end_to_end(tiny, tmp_path):
    seen = []
    record = run_grid(tiny, tmp_path, on_cell=lambda c, r: seen.append(c.key))
    assert len(seen) == 4 and set(record["cells"]) == {c.key for c in tiny.cells()}
    stored = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert stored["cells"] == json.loads(json.dumps(record["cells"]))
    for cell in stored["cells"].values():
        assert cell["steps"] == 1024 // (4 * 32)
        assert cell["unique_tokens"] == 1024 // cell["repetitions"]
        assert len(cell["curve"]) == 2 and cell["ar_min"] == min(v for _, v in cell["curve"])
        assert cell["ar_final"] == cell["curve"][-1][1]
        for key in ("md_elbo", "prefix", "prefix_causal"):
            assert 0 < cell[key] < 20
        assert set(cell["probe"]) == {"ar", "prefix", "md"}
    summary = summarize(stored)
    assert len(summary["rows"]) == 4 and set(summary["best"]) == {1, 2}
    paths = plot(stored, tmp_path)
    assert [p.name for p in paths] == ["curves.png", "final_vs_alpha.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_table(summary))
    assert "★" in console.export_text()


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
    assert list(first["cells"]) == calls == [tiny.cells()[0].key]  # saved before the interruption
    run_grid(tiny, tmp_path)
    assert calls[1:] == [c.key for c in tiny.cells()[1:]]  # the finished cell is not retrained
    assert load_results(tmp_path)["cells"][calls[0]] == first["cells"][calls[0]]
    # A grid extended with another seed trains only the new cells; changed settings retrain everything.
    calls.clear()
    run_grid(dataclasses.replace(tiny, seeds=2), tmp_path, max_cells=1)
    assert calls == [c.key for c in dataclasses.replace(tiny, seeds=2).cells() if c.seed == 1][:1]
    calls.clear()
    run_grid(dataclasses.replace(tiny, lr=1e-3, alphas=(1.0,), repetitions=(2,)), tmp_path)
    assert calls == ["a=1,R=2,seed=0"]


def test_two_worker_processes(tiny, tmp_path):
    progress = []
    config = dataclasses.replace(tiny, repetitions=(2,))
    record = run_grid(config, tmp_path, jobs=2, on_progress=lambda c, s, n: progress.append((c.key, s, n)))
    assert set(record["cells"]) == {c.key for c in config.cells()}
    assert {k for k, _, _ in progress} == set(record["cells"])
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


@pytest.mark.parametrize("case", ["missing", "empty", "empty-folder", "alphas", "grid"])
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
