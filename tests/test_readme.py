"""The README's Python example runs as written and trains on both objectives."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    metrics = namespace["out"].metrics
    assert metrics["ar/tokens"] > 0 and metrics["md/tokens"] > 0
    assert 4.0 < float(metrics["ar/loss"]) < 7.0  # about ln 256 on uniform random bytes
    assert "ar/loss" in capsys.readouterr().out
