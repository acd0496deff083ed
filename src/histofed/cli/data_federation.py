"""`histofed data list` and `histofed data federation NAME`: federations and who holds what."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from histofed.cli.errors import friendly_errors

DATA_ROOT_HELP = "Folder with the real data (e.g. ../shared/data); default: $HISTOFED_DATA."


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["alpha=0.1", "augment=false"]`` -> ``{"alpha": 0.1, "augment": False}``.

    Values become int, float or bool when they read as one, else stay strings (paths).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(
                f"expected key=value, got {item!r} (e.g. --option alpha=0.1)", param_hint="--option"
            )
        out[key.strip()] = _scalar(value.strip())
    return out


def _scalar(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _count(folder: Path, *patterns: str) -> int:
    return sum(1 for pattern in patterns for _ in folder.glob(pattern))


def data_sources(root: Path) -> list[tuple[str, str]]:
    """(relative folder, what it holds) for the data found up to two levels under ``root``."""
    found: list[tuple[str, str]] = []
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    folders += [q for p in folders[1:] for q in sorted(p.iterdir()) if q.is_dir()]
    for d in folders:
        rel = str(d.relative_to(root)) or "."
        if (d / "images").is_dir() and (d / "points").is_dir():
            found.append(
                (rel, f"{_count(d, 'images/*')} images with point labels (classification)")
            )
        elif (d / "images").is_dir() and (d / "masks").is_dir():
            found.append((rel, f"{_count(d, 'images/*')} images + masks (segmentation source)"))
        if n := _count(d, "*.h5"):
            labelled = " + labels.csv" if (d / "labels.csv").is_file() else ""
            found.append((rel, f"{n} feature bags (.h5){labelled} (MIL)"))
        if n := _count(d, "*.svs", "*.ndpi", "*.mrxs", "*.tif", "*.tiff"):
            found.append((rel, f"{n} whole-slide images"))
    return found


DataRoot = Annotated[
    Path | None, typer.Option("--data-root", envvar="HISTOFED_DATA", help=DATA_ROOT_HELP)
]


@friendly_errors
def list_federations(data_root: DataRoot = None) -> None:
    """List registered federations (name, task, description) and the data under --data-root."""
    import histofed.data.registry  # noqa: F401  (registers the built-in federations)
    from histofed.data.federation import FEDERATIONS

    if data_root is not None and not Path(data_root).is_dir():
        raise FileNotFoundError(f"--data-root {data_root} is not a folder")
    specs = [FEDERATIONS.get(n) for n in FEDERATIONS.names()]
    width = max((len(s.name) for s in specs), default=0)
    typer.echo("Federations (histofed data federation NAME):")
    for s in specs:
        data = "needs --data-root" if s.needs_data_root else "no --data-root needed"
        typer.echo(f"  {s.name.ljust(width)}  {s.task:<14}  {s.description} [{data}]")
    if data_root is not None:
        typer.echo(f"\nData under {data_root}:")
        sources = data_sources(Path(data_root))
        for rel, what in sources:
            typer.echo(f"  {rel:<28}  {what}")
        if not sources:
            typer.echo("  (nothing recognised; see docs/data.md for the expected layouts)")


@friendly_errors
def show_federation(
    name: Annotated[str, typer.Argument(help="Federation name (see: histofed data list).")],
    data_root: DataRoot = None,
    seed: Annotated[int, typer.Option(help="Seed of the split (same seed, same clients).")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for federation-NAME.png.")] = Path("."),
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Builder option key=value, repeatable (alpha=0.1)."),
    ] = None,
) -> None:
    """Build a federation and show who holds what: a per-client table and a PNG plot."""
    from histofed.data.federation import build_federation
    from histofed.data.summary import federation_table, plot_federation

    fed = build_federation(name, data_root=data_root, seed=seed, **parse_options(option or []))
    typer.echo(federation_table(fed))
    png = plot_federation(fed, Path(out) / f"federation-{name}.png")
    typer.echo(f"plot: {png}")


# Rich keeps a docstring's line breaks, so the help paragraphs are single strings.
LIST_HELP = "\n\n".join(
    [
        "List the registered federations (name, task, description) and, with --data-root, the "
        "data sources found there.",
        "Example: histofed data list --data-root ../shared/data",
    ]
)
FEDERATION_HELP = "\n\n".join(
    [
        "Build the federation NAME (see `histofed data list`) and show who holds what: a "
        "per-client table (train/val/test sizes and class counts, bag counts or foreground "
        "fractions) and a PNG plot federation-NAME.png.",
        "Example, 8 hospitals with strong label skew:",
        "histofed data federation crchisto-dirichlet --data-root ../shared/data "
        "-o alpha=0.1 -o num_clients=8 --out runs",
        "No data at hand? Try `histofed data federation synthetic-patches`. An unknown option is "
        "rejected with the list of valid ones and their defaults.",
    ]
)


def register(app: typer.Typer) -> None:
    """Attach this module's commands to `histofed data`."""
    app.command("list", help=LIST_HELP)(list_federations)
    app.command("federation", help=FEDERATION_HELP)(show_federation)
