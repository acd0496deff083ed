"""`histofed slides ...`: whole slides to CLAM-style feature bags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from histofed.cli.errors import friendly_errors

app = typer.Typer(help="Whole slides: tissue tiles -> feature bags (.h5) for MIL methods.",
                  no_args_is_help=True)


@app.command("extract")
@friendly_errors
def extract(
    slides_dir: Annotated[Path, typer.Argument(help="Folder of slides (.svs, .tif, .ndpi, ...).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <slide>.h5 bags (created).")],
    encoder: Annotated[Path | None, typer.Option(
        help="Local encoder checkpoint (TorchScript, or a state dict with --arch). Default: a "
             "fixed random ConvNet seeded by --seed (nothing is downloaded).")] = None,
    arch: Annotated[str, typer.Option(
        help='For a state dict: its registered model as JSON, e.g. \'{"name": "random-cnn"}\'.')] = "",
    out_dim: Annotated[int, typer.Option(help="Expected features per tile (0 = any).")] = 0,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Tiles per encoder forward pass.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the default random encoder.")] = 0,
) -> None:
    """Tile each slide's tissue, encode the tiles and write one bag per slide (features, coords).

    Resumable: a slide whose bag already exists (and reads back) is skipped. A slide OpenSlide
    cannot open is named and the others continue; the command then exits with status 1.

    \b
    Example:
      histofed slides extract ../shared/data/wsi --out bags/wsi
      histofed slides extract slides/ --out bags/ --encoder resnet50_trunc.pt --out-dim 1024
    """
    from histofed.models.encoders import RandomCNNEncoder, extract_bags, load_encoder

    if encoder is None:
        phi = RandomCNNEncoder(seed=seed)
    else:
        phi = load_encoder(encoder, arch=json.loads(arch) if arch else None, tile_size=tile_size,
                           out_dim=out_dim or None)
    report = extract_bags(slides_dir, out, phi, tile_size=tile_size, batch_size=batch_size)
    typer.echo(f"{len(report.written)} bag(s) written, {len(report.skipped)} already there, "
               f"{report.tiles} tiles in {report.seconds:.1f} s "
               f"({report.tiles_per_second:.1f} tiles/s) -> {out}")
    if report.failed:
        for name, reason in report.failed.items():
            typer.echo(f"failed: {name}: {reason}", err=True)
        raise typer.Exit(1)
