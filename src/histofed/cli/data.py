"""`histofed data ...`: list, inspect, show federations, fetch public datasets."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect and prepare pathology data and federations.", no_args_is_help=True)
