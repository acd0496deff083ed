"""Placeholder: the owner of this command group fills it in."""

import typer

app = typer.Typer(help="Empirical privacy audits (gradient inversion).", no_args_is_help=True)
