"""`histofed slides ...`: whole slides to CLAM-style feature bags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from histofed.cli.errors import friendly_errors

app = typer.Typer(help="Whole slides: tissue tiles -> feature bags (.h5) for MIL methods, and "
                       "attention heatmaps of a MIL run.", no_args_is_help=True)

EncoderOpt = Annotated[Path | None, typer.Option(
    "--encoder", help="Local encoder checkpoint (TorchScript, or a state dict with --arch). "
                      "Default: a fixed random ConvNet seeded by --seed (nothing is downloaded).")]
ArchOpt = Annotated[str, typer.Option(
    help='For a state dict: its registered model as JSON, e.g. \'{"name": "random-cnn"}\'.')]
OutDimOpt = Annotated[int, typer.Option(help="Expected features per tile (0 = any).")]
TileOpt = Annotated[int, typer.Option(help="Tile side in pixels.")]
BatchOpt = Annotated[int, typer.Option(help="Tiles per encoder forward pass.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the default random encoder.")]
MagOpt = Annotated[float | None, typer.Option(
    help="Tile at this magnification (e.g. 20); default level-0 pixels.")]
MppOpt = Annotated[float | None, typer.Option(help="Tile at this um/px instead.")]
AssumeOpt = Annotated[float | None, typer.Option(
    help="Level-0 um/px for slides that do not record it.")]
TissueOpt = Annotated[float, typer.Option(help="Minimum tissue fraction of a tile.")]


def _res(magnification: float | None, mpp: float | None, assume_mpp: float | None) -> dict:
    """Resolution keywords for histofed.data.slides (only those given)."""
    res = {"magnification": magnification, "mpp": mpp, "assume_mpp": assume_mpp}
    return {k: v for k, v in res.items() if v is not None}


def _encoder(encoder: Path | None, arch: str, out_dim: int, tile_size: int, seed: int):
    """phi of --encoder/--arch/--out-dim, or the seeded random ConvNet."""
    from histofed.models.encoders import RandomCNNEncoder, load_encoder

    if encoder is None:
        return RandomCNNEncoder(seed=seed)
    return load_encoder(encoder, arch=json.loads(arch) if arch else None, tile_size=tile_size,
                        out_dim=out_dim or None)


@app.command("extract")
@friendly_errors
def extract(
    slides_dir: Annotated[Path, typer.Argument(help="Folder of slides (.svs, .tif, .ndpi, ...).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <slide>.h5 bags (created).")],
    encoder: EncoderOpt = None,
    arch: ArchOpt = "",
    out_dim: OutDimOpt = 0,
    tile_size: TileOpt = 256,
    batch_size: BatchOpt = 32,
    seed: SeedOpt = 0,
    magnification: MagOpt = None,
    mpp: MppOpt = None,
    assume_mpp: AssumeOpt = None,
    tissue_threshold: TissueOpt = 0.5,
) -> None:
    """Tile each slide's tissue, encode the tiles and write one bag per slide (features, coords).

    Resumable: a slide whose bag already exists (and reads back) is skipped. A slide OpenSlide
    cannot open is named and the others continue; the command then exits with status 1.

    \b
    Example:
      histofed slides extract ../shared/data/wsi --out bags/wsi
      histofed slides extract slides/ --out bags/ --encoder resnet50_trunc.pt --out-dim 1024
      histofed slides extract slides/ --out bags/ --magnification 20 --tile-size 224
    """
    from histofed.models.encoders import extract_bags

    phi = _encoder(encoder, arch, out_dim, tile_size, seed)
    report = extract_bags(slides_dir, out, phi, tile_size=tile_size, batch_size=batch_size,
                          tissue_threshold=tissue_threshold,
                          **_res(magnification, mpp, assume_mpp))
    typer.echo(f"{len(report.written)} bag(s) written, {len(report.skipped)} already there, "
               f"{report.tiles} tiles in {report.seconds:.1f} s "
               f"({report.tiles_per_second:.1f} tiles/s) -> {out}")
    if report.failed:
        for name, reason in report.failed.items():
            typer.echo(f"failed: {name}: {reason}", err=True)
        raise typer.Exit(1)


@app.command("heatmap")
@friendly_errors
def heatmap(
    run_dir: Annotated[Path, typer.Argument(help="A finished MIL run (e.g. on slides-bags).")],
    slide: Annotated[Path, typer.Argument(help="The slide to show (.svs, .tif, ...).")],
    model: Annotated[str, typer.Option(
        "--model", help='"global" or "personal:<site>" (FedWSIDD keeps personal models only).')
    ] = "global",
    out: Annotated[Path | None, typer.Option(
        "--out", help="PNG to write (default: <slide stem>-heatmap.png here); a CSV of the "
                      "tiles' scores goes next to it.")] = None,
    bag: Annotated[Path | None, typer.Option(
        "--bag", help="This slide's .h5 bag (features + coords) instead of extracting again.")
    ] = None,
    encoder: EncoderOpt = None,
    arch: ArchOpt = "",
    out_dim: OutDimOpt = 0,
    tile_size: TileOpt = 256,
    batch_size: BatchOpt = 32,
    seed: SeedOpt = 0,
    magnification: MagOpt = None,
    mpp: MppOpt = None,
    assume_mpp: AssumeOpt = None,
    tissue_threshold: TissueOpt = 0.5,
    alpha: Annotated[float, typer.Option(help="Opacity of the colours over the tissue.")] = 0.5,
    cmap: Annotated[str, typer.Option(help="Matplotlib colormap.")] = "jet",
    max_side: Annotated[int, typer.Option(help="Longest side of the thumbnail.")] = 2048,
    data_root: Annotated[Path | None, typer.Option(
        help="Data of a run that standardised its features (to refit that site's scaling).")
    ] = None,
) -> None:
    """Overlay a MIL model's attention on the slide thumbnail (PNG), as attention-MIL tools do.

    Each tile's attention becomes its percentile rank among the slide's tiles, coloured at the
    tile's place; the title gives the predicted class and its probability. Tiles are encoded
    with the same tiling and encoder options as `slides extract` (they must match the run's
    bags), or read from --bag.

    \b
    Example:
      histofed slides heatmap runs/fedavg-slides ../shared/data/wsi/cmu-1-small-region.svs --out cmu-heatmap.png
      histofed slides heatmap runs/fedwsidd slide.svs --model personal:radboud --bag bags/slide.h5
    """
    from histofed.heatmap import attention_heatmap

    phi = None if bag is not None else _encoder(encoder, arch, out_dim, tile_size, seed)
    summary = attention_heatmap(
        run_dir, slide, out or Path(f"{slide.stem}-heatmap.png"), which=model, bag=bag,
        encoder=phi, tile_size=tile_size, batch_size=batch_size, alpha=alpha, cmap=cmap,
        max_side=max_side, data_root=data_root, tissue_threshold=tissue_threshold,
        **_res(magnification, mpp, assume_mpp))
    probs = ", ".join(f"{p:.3f}" for p in summary["probabilities"])
    typer.echo(f"{summary['tiles']} tiles; {model} model predicts class {summary['predicted']} "
               f"(probabilities {probs}) -> {summary['png']} + {summary['csv']}")
