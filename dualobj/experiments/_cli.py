"""``dualobj repro``: the miniature replication of the paper's α × repetition grid (placeholder)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``repro`` command to ``app``."""
