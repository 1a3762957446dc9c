"""The ``dualobj`` command: ``dualobj repro`` (the miniature replication), ``dualobj bench``, ``dualobj info``.

Each command lives beside the code it drives and registers itself here; heavy imports happen inside commands.

Bad input never ends in a traceback: a :class:`~dualobj.DualObjError` (a bad argument, a malformed file), an
``OSError`` (a path that cannot be read or written) or a file that is not UTF-8 or not JSON, escaping a command, is
printed as one line,
``dualobj <command>: error: ...``, on stderr, and the exit status is :data:`EXIT_USAGE` (2, as for bad options).
"""

from __future__ import annotations

import errno
import json
from typing import Any

import typer
from typer.core import TyperGroup

from dualobj._errors import DualObjError
from dualobj.bench._cli import register as _register_bench
from dualobj.experiments._cli import register as _register_repro

EXIT_USAGE = 2
"""Exit status for bad input: a bad option or argument, a malformed input file, a path that cannot be used."""


def error_message(err: BaseException) -> str:
    """One line for an error the user can fix: the message of a ``DualObjError``, the path and reason of an
    ``OSError``, the position of a decoding error."""
    if isinstance(err, OSError) and err.filename is not None:
        where = repr(str(err.filename)) + (f" -> {str(err.filename2)!r}" if err.filename2 is not None else "")
        return f"{where}: {err.strerror or err}"
    return str(err)


class _Group(TyperGroup):
    """The root command group: turns the user's errors into a message and exit status 2 instead of a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (DualObjError, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            if isinstance(err, OSError) and err.errno == errno.EPIPE:  # a closed pipe: the usual handling
                raise
            name = ctx.invoked_subcommand
            typer.echo(f"dualobj{' ' + name if name else ''}: error: {error_message(err)}", err=True)
            raise typer.Exit(EXIT_USAGE) from err


app = typer.Typer(
    name="dualobj",
    cls=_Group,
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
