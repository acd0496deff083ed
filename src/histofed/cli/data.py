"""`histofed data ...`: list, inspect, show federations, fetch public datasets.

Each command lives in its own module with a ``register(app)`` function.
"""

from __future__ import annotations

import typer

from histofed.cli import data_federation, data_fetch, data_inspect

app = typer.Typer(help="Inspect and prepare pathology data and federations.", no_args_is_help=True)
for _module in (data_federation, data_inspect, data_fetch):
    _module.register(app)
