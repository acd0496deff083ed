"""Placeholder: the owner of this command fills it in."""

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands to `histofed data`."""
