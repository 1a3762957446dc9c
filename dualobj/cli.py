"""The ``dualobj`` command: ``dualobj repro`` (the miniature replication), ``dualobj bench``, ``dualobj info``.

Each command lives beside the code it drives and registers itself here; heavy imports happen inside commands.
"""

from __future__ import annotations

import typer

from dualobj.bench._cli import register as _register_bench
from dualobj.experiments._cli import register as _register_repro

app = typer.Typer(
    name="dualobj",
    help="Composable language-model training objectives: AR, masked diffusion and their dual mix.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)



@app.callback()
def _root() -> None:
    """Composable language-model training objectives: AR, masked diffusion and their dual mix."""


_register_repro(app)
_register_bench(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
