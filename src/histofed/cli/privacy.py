"""Placeholder: the owner of this command group fills it in."""

import typer

app = typer.Typer(help="Differential-privacy budgets (no training).", no_args_is_help=True)
