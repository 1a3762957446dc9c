"""``dualobj bench`` and ``dualobj info`` (placeholder until the benchmark suites land)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``bench`` and ``info`` commands to ``app``."""

    @app.command()
    def info() -> None:
        """Versions, device and the attention backends that run here."""
        import torch

        import dualobj

        typer.echo(f"dualobj {dualobj.__version__}, torch {torch.__version__}")
