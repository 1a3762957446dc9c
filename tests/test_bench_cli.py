"""``dualobj bench`` and ``dualobj info`` through typer's CliRunner, with fake suite modules written per test."""

from __future__ import annotations

import itertools
import json
import math
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from dualobj.bench import Context
from dualobj.bench._cli import EXIT_DISAGREE, EXIT_ERROR, exit_code
from dualobj.bench._core import allclose
from dualobj.bench._runner import (
    DISAGREE,
    ERROR,
    MISSING,
    OK,
    CaseResult,
    RunOptions,
    SuiteResult,
    time_callables,
)
from dualobj.cli import app

runner = CliRunner()
_counter = itertools.count()

HEADER = """
import torch
from dualobj.bench import Case, Impl
from dualobj.bench._core import allclose

x = torch.arange(4096, dtype=torch.float64) / 7.0

def ours():
    return lambda: x.sum()

def loop():
    # an independent reference: a Python loop over chunks
    def run():
        total = torch.zeros((), dtype=torch.float64)
        for chunk in x.split(512):
            total = total + chunk.sum()
        return total
    return run

def never():
    raise AssertionError("an unavailable implementation must not be set up")
"""


@pytest.fixture
def suite_module(tmp_path, monkeypatch):
    """Write a fake suite package and return its dotted module name (``pkg.suite``)."""
    made = []

    def write(body: str) -> str:
        pkg = f"fakebench{next(_counter)}"
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "suite.py").write_text(HEADER + textwrap.dedent(body))
        made.append(pkg)
        return f"{pkg}.suite"

    monkeypatch.syspath_prepend(str(tmp_path))
    yield write
    for name in [m for m in sys.modules if m.split(".")[0] in made]:
        del sys.modules[name]


def bench(*args: str):
    return runner.invoke(app, ["bench", *args, "--quick"])


AGREEING = """
def cases(ctx):
    return [Case(
        "sum [4096]",  # brackets are printed as they are, not read as rich markup
        [Impl("ours", ours, ours=True), Impl("loop", loop), Impl("hf", never, available="transformers missing")],
        sizes={"n": 4096}, units=4096, unit="el", check=allclose(rtol=1e-12, atol=0.0),
        targets={"loop": 1e9}, targets_judged=True,
    )]
"""


def test_agreeing_suite_exits_zero_and_writes_the_json_schema(suite_module, tmp_path):
    module = suite_module(AGREEING)
    path = tmp_path / "out.json"
    result = bench(module, "--json", str(path))
    assert result.exit_code == 0, result.output
    assert "sum [4096]" in result.stdout and "agree" in result.stdout
    assert "not run: transformers missing" in result.stdout
    assert "sum [4096]" in result.stderr  # progress goes to stderr
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and doc["exit_code"] == 0
    assert doc["versions"]["torch"] == torch.__version__
    assert set(doc["versions"]) >= {"python", "dualobj", "torch", "xformers", "transformers"}
    assert doc["device"]["type"] == "cpu" and doc["device"]["torch_threads"] >= 1
    assert doc["options"]["quick"] is True and doc["options"]["dtype"] == "float32"
    [suite] = doc["suites"]
    assert suite["status"] == OK and suite["failed"] is False and suite["module"] == module
    [case] = suite["cases"]
    assert case["sizes"] == {"n": 4096} and case["units"] == 4096 and case["status"] == OK
    impls = {i["name"]: i for i in case["impls"]}
    assert impls["hf"]["status"] == "unavailable" and impls["hf"]["median_s"] is None
    for name in ("ours", "loop"):
        assert impls[name]["median_s"] > 0 and impls[name]["repeats"] >= 3 and impls[name]["calls_per_repeat"] >= 1
        assert impls[name]["iqr_s"] >= 0 and impls[name]["peak_bytes"] is None  # memory not asked for
    [ratio] = case["ratios"]
    assert ratio["baseline"] == "loop" and ratio["target"] == 1e9 and ratio["met"] is True
    assert ratio["time"] == pytest.approx(impls["ours"]["median_s"] / impls["loop"]["median_s"])


def test_json_to_stdout_moves_the_tables_to_stderr(suite_module):
    result = bench(suite_module(AGREEING), "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["suites"][0]["cases"][0]["status"] == OK
    assert "time ours/this" in result.stderr


def test_forced_disagreement_exits_non_zero(suite_module, tmp_path):
    module = suite_module("""
    def off_by_one():
        return lambda: x.sum() + 1
    def cases(ctx):
        return [Case("sum", [Impl("ours", ours, ours=True), Impl("loop", loop), Impl("bad", off_by_one)],
                     check=allclose(rtol=1e-9, atol=1e-9), targets={"loop": 1e9})]
    """)
    path = tmp_path / "out.json"
    result = bench(module, "--json", str(path))
    assert result.exit_code == EXIT_DISAGREE
    assert "DISAGREE" in result.stdout and "bad differs from ours" in result.stdout
    case = json.loads(path.read_text())["suites"][0]["cases"][0]
    assert case["status"] == DISAGREE and "max |diff| = 1" in case["message"]


def test_missed_target_is_reported_not_failed(suite_module):
    module = suite_module("""
    def cases(ctx):
        return [Case("sum", [Impl("ours", ours, ours=True), Impl("loop", loop)], targets={"loop": 1e-9},
                     targets_judged=True)]
    """)
    result = bench(module)
    assert result.exit_code == 0, result.output
    assert "missed" in result.stdout


def test_targets_are_not_judged_at_quick_sizes_by_default(suite_module, tmp_path):
    module = suite_module("""
    def cases(ctx):
        return [Case("sum", [Impl("ours", ours, ours=True), Impl("loop", loop)], targets={"loop": 1e-9},
                     memory_targets={"loop": 1e-9})]
    """)
    path = tmp_path / "out.json"
    result = bench(module, "--json", str(path))
    assert result.exit_code == 0, result.output
    assert "n/a at quick sizes" in result.stdout and "missed" not in result.stdout and "met" not in result.stdout
    [ratio] = json.loads(path.read_text())["suites"][0]["cases"][0]["ratios"]
    assert ratio["judged"] is False and ratio["met"] is None and ratio["target"] == 1e-9
    full = runner.invoke(app, ["bench", module, "--json", str(path)])  # full sizes: judged
    assert full.exit_code == 0, full.output
    assert "missed" in full.stdout
    [ratio] = json.loads(path.read_text())["suites"][0]["cases"][0]["ratios"]
    assert ratio["judged"] is True and ratio["met"] is False


@pytest.mark.parametrize("where", ["missing folder", "a folder", "under a file"])
def test_unwritable_json_path_is_refused_before_the_run(suite_module, tmp_path, where):
    module = suite_module(AGREEING)
    (tmp_path / "file").write_text("x")
    path = {"missing folder": tmp_path / "nope" / "out.json", "a folder": tmp_path,
            "under a file": tmp_path / "file" / "out.json"}[where]
    result = bench(module, "--json", str(path))
    assert result.exit_code == 2  # usage error, before any suite ran
    assert "--json: expected a file" in result.output and "folder" in result.output
    assert "sum [4096]" not in result.stderr  # nothing was measured


def test_missing_suite_fails_unless_allowed():
    result = bench("no_such_package_xyz.suite")
    assert result.exit_code == EXIT_ERROR
    assert "missing" in result.stdout and "no module no_such_package_xyz.suite" in result.stdout
    allowed = bench("no_such_package_xyz.suite", "--allow-missing")
    assert allowed.exit_code == 0 and "missing" in allowed.stdout


def test_suite_that_fails_to_import_always_fails(suite_module):
    module = suite_module("import a_dependency_that_is_not_there_xyz\n")
    for extra in ([], ["--allow-missing"]):
        result = bench(module, *extra)
        assert result.exit_code == EXIT_ERROR
        assert "failed to import" in result.stdout and "a_dependency_that_is_not_there_xyz" in result.stdout


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def cases(ctx):\n    raise RuntimeError('boom')\n", "cases(ctx) raised RuntimeError: boom"),
        ("CASES = []\n", "has no function cases(ctx)"),
        ("def cases(ctx):\n    return [Case('two', [Impl('a', ours, ours=True), Impl('b', loop, ours=True)])]\n",
         "exactly one Impl ours=True, found 2"),
        ("def cases(ctx):\n    return [Case('t', [Impl('a', ours, ours=True)], targets={'zz': 1.0})]\n",
         "targets for unknown baselines ['zz']"),
        ("def broken():\n    raise RuntimeError('kaput')\n"
         "def cases(ctx):\n    return [Case('c', [Impl('a', ours, ours=True), Impl('b', broken)])]\n",
         "b raised RuntimeError: kaput"),
    ],
)
def test_broken_suites_and_impls_exit_with_the_error_code(suite_module, body, message):
    result = bench(suite_module(body))
    assert result.exit_code == EXIT_ERROR
    assert message in " ".join(result.stdout.split())


def test_bad_usage_exits_two():
    assert bench("nonsense").exit_code == 2
    assert bench("all", "--dtype", "float64").exit_code == 2
    if not torch.cuda.is_available():
        result = bench("all", "--device", "cuda")
        assert result.exit_code == 2 and "CUDA" in result.output


def test_case_filter_selects_by_name(suite_module, tmp_path):
    module = suite_module("""
    def cases(ctx):
        return [Case(name, [Impl("ours", ours, ours=True)]) for name in ("alpha one", "beta two", "alpha three")]
    """)
    path = tmp_path / "out.json"
    assert bench(module, "-k", "alpha", "--json", str(path)).exit_code == 0
    names = [c["name"] for c in json.loads(path.read_text())["suites"][0]["cases"]]
    assert names == ["alpha one", "alpha three"]


def test_cpu_memory_is_the_peak_rss_growth_of_a_fresh_process(suite_module, tmp_path):
    module = suite_module("""
    def alloc(mib):
        def make():
            return lambda: torch.ones(mib * 2**18).sum()  # mib MiB of float32
        return make
    def cases(ctx):
        return [Case("alloc", [Impl("big", alloc(64), ours=True), Impl("small", alloc(16))], memory=True,
                     memory_targets={"small": 1.0}, targets_judged=True)]
    """)
    path = tmp_path / "out.json"
    result = bench(module, "--json", str(path))
    assert result.exit_code == 0, result.output
    case = json.loads(path.read_text())["suites"][0]["cases"][0]
    peak = {i["name"]: i["peak_bytes"] for i in case["impls"]}
    mib = 2**20
    assert 60 * mib <= peak["big"] <= 72 * mib
    assert 14 * mib <= peak["small"] <= 24 * mib
    [ratio] = case["ratios"]
    assert ratio["memory"] == pytest.approx(peak["big"] / peak["small"])
    assert ratio["memory_met"] is False  # 4x the baseline against a target of 1x


def test_a_crash_in_the_memory_subprocess_fails_the_run(suite_module):
    module = suite_module("""
    import sys
    def only_here():
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is not None and spec.name == "dualobj.bench._worker":
            raise RuntimeError("crashed in the worker")
        return lambda: x.sum()
    def cases(ctx):
        return [Case("m", [Impl("ours", only_here, ours=True)], memory=True)]
    """)
    result = bench(module)
    assert result.exit_code == EXIT_ERROR
    assert "crashed in the worker" in result.stdout


def test_exit_code_precedence():
    def suite(status=OK, *case_status):
        return SuiteResult("s", "m", status=status, cases=[CaseResult("c", {}, "tok", None, status=c)
                                                             for c in case_status])

    assert exit_code([suite(OK, OK)], allow_missing=False) == 0
    assert exit_code([suite(OK, ERROR), suite(OK, DISAGREE)], allow_missing=False) == EXIT_DISAGREE
    assert exit_code([suite(OK, OK, ERROR)], allow_missing=False) == EXIT_ERROR
    assert exit_code([suite(MISSING), suite(OK, OK)], allow_missing=False) == EXIT_ERROR
    assert exit_code([suite(MISSING), suite(OK, OK)], allow_missing=True) == 0
    assert exit_code([suite(ERROR)], allow_missing=True) == EXIT_ERROR


def test_time_callables_interleaves_and_counts_calls():
    log: list[str] = []

    def counter(name):
        return lambda: log.append(name)

    options = RunOptions(min_run_time=0.0, min_repeats=4, max_repeats=4, block_time=1e-4)
    out = time_callables({"a": (counter("a"), 1.0), "b": (counter("b"), 1.0)}, options)
    for name in ("a", "b"):
        median, iqr, repeats, number = out[name]
        assert repeats == 4 and median > 0 and iqr >= 0
        # a probe block (the first call "took" 1 s, so 1 call), then 4 timed blocks of `number` calls each
        assert log.count(name) == 1 + 4 * number
    runs = [name for name, _ in itertools.groupby(log)]
    assert runs == ["a", "b"] * 5  # one probe each, then the repeats alternate


def test_allclose_check():
    check = allclose(rtol=0.0, atol=1e-6)
    t = torch.tensor([1.0, 2.0])
    assert check({"a": (t, {"k": 3.0}), "b": (t.clone(), {"k": 3.0})}) is None
    assert "shape" in check({"a": t, "b": t[:1]})
    assert "returned 1 values" in check({"a": (t, t), "b": t})
    assert "max |diff| = 0.5" in check({"a": t, "b": t + 0.5})
    assert check({"a": torch.tensor(math.nan), "b": torch.tensor(math.nan)}) is None


def test_info_reports_versions_device_and_backends():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = doc["attention_backends"]["cpu"]
    assert cpu or doc["attention_note"]
    for status in cpu.values():
        assert set(status) == {"forward", "backward", "reason"}
        assert (status["reason"] is None) == bool(status["forward"] and status["backward"])
    table = runner.invoke(app, ["info"])
    assert table.exit_code == 0 and torch.__version__ in table.stdout
    assert "attention backends on cpu" in table.stdout


def test_step_suite_contract_and_one_training_step():
    from dualobj.bench import step

    cases = step.cases(Context(quick=True))
    assert [c.targets for c in cases] == [{"ar": 1.05}, {"ar": 1.0}, {"ar": 2.2}, {"validation off": 1.03}]
    assert [[i.name for i in c.impls if i.ours] for c in cases] == [["dual"], ["md"], ["bd"], ["validation on"]]
    compiled = step.cases(Context(quick=True, compile=True))[4:]
    assert [c.name.split(" ")[0] for c in compiled] == ["ar", "md", "dual"]
    assert [c.targets for c in compiled] == [{}, {}, {"eager": 0.9}]
    assert all([i.name for i in c.impls] == ["compiled", "eager"] for c in compiled)
    sizes = {"batch": 4, "length": 16, "dim": 32, "layers": 1, "heads": 2, "vocab": 64}
    losses = {}
    for kind in ("ar", "md", "dual", "bd"):
        fn = step.make_step(kind, sizes, Context())
        losses[kind] = fn()
        assert torch.isfinite(fn())  # the model keeps training
    assert abs(float(losses["ar"]) - math.log(64)) < 0.5
    # validation on and off draw the same batches: the same first-step loss
    on = step.make_step("dual", sizes, Context(), validate=True)()
    off = step.make_step("dual", sizes, Context(), validate=False)()
    assert step._same_loss(1e-6)({"on": on, "off": off}) is None and torch.equal(on, off)
    assert "differ" in step._same_loss(1e-6)({"on": on, "off": off + 1e-3})
    check = step._check(64)
    assert check(losses) is None
    assert "ln V" in check({**losses, "ar": torch.tensor(0.1)})
    assert "first-step loss" in check({**losses, "md": torch.tensor(math.inf)})
