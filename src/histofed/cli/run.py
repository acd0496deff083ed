"""`histofed run|demo|evaluate`: run experiments and look at their results."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the run-related commands to the main app."""
