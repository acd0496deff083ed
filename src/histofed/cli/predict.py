"""`histofed predict`: nucleus masks, overlays and QuPath GeoJSON from a segmentation run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histofed.cli.errors import friendly_errors


def register(app: typer.Typer) -> None:
    """Attach `predict` to the main app."""

    @app.command()
    @friendly_errors
    def predict(
        run_dir: Annotated[Path, typer.Argument(help="A finished segmentation run directory.")],
        images: Annotated[Path, typer.Option(
            help="A folder of image tiles (DIR or DIR/images), or one whole-slide file.")],
        out: Annotated[Path, typer.Option(help="Output folder (must not exist yet).")],
        model: Annotated[str, typer.Option(
            help="'global' or 'personal:<client>' (see the run's final/ folder).")] = "global",
        watershed: Annotated[bool, typer.Option(
            help="Split touching nuclei by a distance-transform watershed.")] = False,
        min_distance: Annotated[int, typer.Option(
            help="Watershed: minimum distance between nucleus centres, pixels.")] = 4,
        min_area: Annotated[int, typer.Option(help="Drop predicted nuclei smaller than this, pixels.")] = 10,
        mixed_sizes: Annotated[bool, typer.Option(
            help="Tile folder: accept images of different sizes (e.g. CPM-15).")] = False,
        tile_size: Annotated[int, typer.Option(help="Slide: tile side in pixels.")] = 256,
        margin: Annotated[int, typer.Option(help="Slide: context pixels read around each tile.")] = 32,
        magnification: Annotated[Optional[float], typer.Option(
            help="Slide: predict at this magnification (e.g. 40); default level-0 pixels.")] = None,
        mpp: Annotated[Optional[float], typer.Option(help="Slide: predict at this um/px instead.")] = None,
        assume_mpp: Annotated[Optional[float], typer.Option(
            help="Slide: level-0 um/px for slides that do not record it.")] = None,
        tissue_threshold: Annotated[float, typer.Option(help="Slide: minimum tissue fraction of a tile.")] = 0.5,
        max_tiles: Annotated[Optional[int], typer.Option(
            help="Slide: predict at most N tissue tiles, evenly spread (a quick look).")] = None,
    ) -> None:
        """Predict nuclei with a run's model and write files a pathologist can open.

        \b
        Tile folder: OUT/masks/<id>.png (16-bit instance ids), OUT/overlays/<id>.png
        (contours), OUT/geojson/<id>.geojson, predictions.csv, summary.json.
        Whole slide: OUT/<slide>.geojson (level-0 pixels; QuPath: File > Import objects),
        OUT/<slide>-overlay.png (thumbnail), OUT/<slide>-tiles.csv, summary.json.

        \b
        Example:
          histofed run configs/fedavg-nuclei.toml --data-root ../shared/data --out runs/fedavg
          histofed predict runs/fedavg --images ../shared/data/nuclei/monuseg --out pred/monuseg
          histofed predict runs/fedavg --images ../shared/data/wsi/cmu-1-small-region.svs \\
              --out pred/cmu1 --magnification 20 --max-tiles 20
        """
        from histofed.instances import InstanceOptions

        options = InstanceOptions(split="watershed" if watershed else "components",
                                  min_distance=min_distance, min_area=min_area)
        if images.is_dir():
            from histofed.predict import predict_tiles

            summary = predict_tiles(run_dir, images, out, which=model, options=options,
                                    mixed_sizes=mixed_sizes)
        elif images.is_file():
            from histofed.predict_slide import predict_slide

            summary = predict_slide(
                run_dir, images, out, which=model, options=options, tile_size=tile_size,
                margin=margin, magnification=magnification, mpp=mpp, assume_mpp=assume_mpp,
                tissue_threshold=tissue_threshold, max_tiles=max_tiles)
        else:
            raise FileNotFoundError(f"--images {images} does not exist; pass a folder of tiles "
                                    "or a slide file")
        typer.echo(f"{summary['tiles']} tile(s), {summary['nuclei']} nuclei, "
                   f"{summary['seconds']:.1f} s -> {out}")
