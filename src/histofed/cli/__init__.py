"""The ``histofed`` command line. Each command group lives in its own module."""

from __future__ import annotations

import os

import typer

# Flower must never try to install packages, phone home or check for updates.
for _key, _value in {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}.items():
    os.environ.setdefault(_key, _value)

from histofed.cli import audit as _audit  # noqa: E402
from histofed.cli import data as _data  # noqa: E402
from histofed.cli import deploy as _deploy  # noqa: E402
from histofed.cli import predict as _predict  # noqa: E402
from histofed.cli import privacy as _privacy  # noqa: E402
from histofed.cli import run as _run  # noqa: E402
from histofed.cli import slides as _slides  # noqa: E402

app = typer.Typer(
    name="histofed",
    help=(
        "Federated learning for computational pathology: hospitals train together, "
        "pixels stay home.\n\n"
        "Start with `histofed demo`, then `histofed run configs/fedavg-nuclei.toml --data-root PATH`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(_data.app, name="data")
app.add_typer(_privacy.app, name="privacy")
app.add_typer(_audit.app, name="audit")
app.add_typer(_slides.app, name="slides")
app.add_typer(_deploy.app, name="deploy")
_run.register(app)
_predict.register(app)


def main() -> None:
    app()
