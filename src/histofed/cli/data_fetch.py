"""`histofed data fetch NAME` (public datasets) and `histofed data tile SLIDE` (whole slides)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from histofed.atomic import atomic_path
from histofed.cli.errors import friendly_errors


def _atomic_write(path: Path, write: Any, suffix: str) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (no half-written file on a crash)."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def random_encoder(seed: int = 0, checkpoint: Path | None = None) -> Any:
    """A small CNN encoder (B x 3 x H x W in [0, 1] -> B x 64): histofed.models.cnn.SmallCNN's
    convolutional part (width 16, depth 3, no normalisation) + global average pooling.

    Starts from random weights drawn from ``seed`` (the global torch RNG is left untouched), or
    loads ``checkpoint``, a ``state_dict`` saved with ``torch.save(encoder.state_dict(), path)``.
    Random features are for testing the pipeline, not for science: use a pathology encoder's
    local checkpoint for real work (nothing is downloaded).
    """
    import torch
    from torch import nn

    from histofed.models.cnn import SmallCNN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cnn = SmallCNN(num_classes=1, width=16, depth=3, norm="none")
    encoder = nn.Sequential(cnn.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        try:
            encoder.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{checkpoint} is not a state_dict of this encoder ({err}). Save one with "
                "torch.save(random_encoder().state_dict(), path) after training it"
            ) from None
    return encoder


def register(app: typer.Typer) -> None:
    """Attach `fetch` and `tile` to `histofed data`."""

    @app.command()
    @friendly_errors
    def fetch(
        name: Annotated[Optional[str], typer.Argument(
            help="Dataset to download (see --list).")] = None,
        dest: Annotated[Path, typer.Option(
            help="Data root to fill; the dataset lands in DEST/<its folder>.")] = Path("data"),
        list_: Annotated[bool, typer.Option("--list", help="List the datasets and exit.")] = False,
        archive: Annotated[Optional[Path], typer.Option(
            help="Use a file you downloaded yourself instead of downloading.")] = None,
        force: Annotated[bool, typer.Option(help="Convert again even if DEST/<folder> exists.")] = False,
    ) -> None:
        """Download a public dataset from upstream and convert it into histofed's layout.

        \b
        Example:
          histofed data fetch --list
          histofed data fetch monuseg --dest data
          histofed data inspect data/nuclei/monuseg

        Archives go to DEST/downloads/NAME/: an interrupted download resumes
        where it stopped, and a finished one is checked and reused. They are
        converted into the layout the rest of histofed reads, e.g.
        DEST/nuclei/monuseg/images/<id>.png + masks/<id>.png + meta.csv.
        Each dataset keeps its upstream licence (printed at the end and kept
        in DEST/<folder>/fetch.json); several are research-only. Upstream links
        move: if every mirror fails, download the file in a browser and pass
        it with --archive FILE.
        """
        from histofed.data.fetch import DATASETS, DownloadError
        from histofed.data.fetch import fetch as fetch_dataset

        if list_ or name is None:
            for ds_name in DATASETS:
                ds = DATASETS.get(ds_name)
                typer.echo(f"{ds.name}  ->  DEST/{ds.subdir}\n    {ds.title}\n"
                           f"    licence: {ds.licence}\n    homepage: {ds.homepage}")
                for d in ds.downloads:
                    pinned = "sha256 pinned" if d.sha256 else "sha256 not pinned"
                    typer.echo(f"    - {d.url}  ({d.note}; {pinned})")
            if name is None and not list_:
                typer.echo("\nPass a NAME to download one, e.g. `histofed data fetch monuseg`.")
            return
        try:
            fetch_dataset(name, dest, archive=archive, force=force,
                          log=lambda line: typer.echo(line, err=True))
        except (DownloadError, FileExistsError) as err:
            typer.echo(f"error: {err}", err=True)
            sys.exit(2)

    @app.command()
    @friendly_errors
    def tile(
        slide: Annotated[Path, typer.Argument(help="Whole-slide image (.svs, .ndpi, .mrxs, tiled .tif, ...).")],
        out: Annotated[Path, typer.Option(help="Folder for the outputs (created if needed).")],
        tile_size: Annotated[int, typer.Option(help="Tile side in pixels at the chosen resolution.")] = 256,
        magnification: Annotated[Optional[float], typer.Option(
            help="Tile at this magnification, e.g. 20 (default: level-0 pixels).")] = None,
        mpp: Annotated[Optional[float], typer.Option(
            help="Or tile at this many microns per pixel, e.g. 0.5.")] = None,
        assume_mpp: Annotated[Optional[float], typer.Option(
            help="Level-0 microns per pixel for slides that do not record it (0.25 ~ 40x, 0.5 ~ 20x).")] = None,
        tissue_threshold: Annotated[float, typer.Option(
            help="Keep tiles whose tissue fraction is at least this (0 keeps all).")] = 0.5,
        extract_features: Annotated[bool, typer.Option(
            "--extract-features", help="Also encode the tiles into a feature bag SLIDE.h5.")] = False,
        encoder_checkpoint: Annotated[Optional[Path], typer.Option(
            help="state_dict for the feature encoder (default: random weights from --seed).")] = None,
        seed: Annotated[int, typer.Option(help="Seed of the random encoder weights.")] = 0,
        batch_size: Annotated[int, typer.Option(help="Tiles per encoder batch.")] = 32,
    ) -> None:
        """Find the tissue in a whole slide, cut it into tiles, and optionally encode them.

        \b
        Example:
          histofed data tile ../shared/data/wsi/cmu-1-small-region.svs \\
              --out tiles --magnification 10
          histofed data tile slide.svs --out tiles --assume-mpp 0.25 \\
              --magnification 20 --extract-features

        \b
        Writes, for SLIDE = name.svs:
          OUT/name.tiles.csv   x,y of each tile's top-left corner, level-0 pixels
          OUT/name.tiles.json  resolution, pyramid level, tile footprint used
          OUT/name.tiles.png   thumbnail: background tinted blue, tiles in green
          OUT/name.h5          --extract-features: a CLAM-style bag
                               (features N x D, coords N x 2)

        The tissue mask is Otsu's threshold on colour saturation at low
        resolution: white glass and grey dust are background. --magnification
        needs the slide's mpp or objective power; when it records neither,
        pass --assume-mpp or leave --magnification out (level-0 pixels).
        The default encoder is a small CNN with random weights: it tests the
        pipeline end to end, but its features know nothing of pathology; pass
        --encoder-checkpoint with a trained encoder's weights for real work.
        """
        import numpy as np

        from histofed.data import slides

        res = {"magnification": magnification, "mpp": mpp, "assume_mpp": assume_mpp}
        out.mkdir(parents=True, exist_ok=True)
        stem = slide.stem
        with slides.open_slide(slide) as s:
            spec = slides.tile_spec(s, tile_size, **res)
            mask = slides.tissue_mask(s)
            coords = slides.tile_coords(s, tile_size, tissue_threshold=tissue_threshold,
                                        mask=mask, **res)
            picture = slides.render_tiling(s, coords, spec.size0, mask)
            width, height = s.dimensions

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["x", "y"])
                writer.writerows(np.asarray(coords).tolist())

        info = {"slide": str(slide), "width": width, "height": height, "tile_size": tile_size,
                **res, "downsample": spec.downsample, "level": spec.level,
                "tile_size_level0": spec.size0, "tissue_threshold": tissue_threshold,
                "tissue_fraction": float(mask[0].mean()), "n_tiles": int(len(coords))}
        _atomic_write(out / f"{stem}.tiles.csv", write_csv, ".csv")
        _atomic_write(out / f"{stem}.tiles.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"), ".json")
        _atomic_write(out / f"{stem}.tiles.png", lambda tmp: picture.save(tmp, format="PNG"), ".png")
        typer.echo(f"{slide.name}: {width} x {height} px, tissue {info['tissue_fraction']:.0%} of "
                   f"the slide; {len(coords)} tiles of {tile_size} px (level {spec.level}, "
                   f"{spec.size0} level-0 px each)")
        typer.echo(f"wrote {out / (stem + '.tiles.csv')}, .json and .png")
        if extract_features:
            if len(coords) == 0:
                raise ValueError(f"no tile of {slide} reaches --tissue-threshold "
                                 f"{tissue_threshold}; lower it or use a smaller --tile-size")
            encoder = random_encoder(seed, encoder_checkpoint)
            bag = slides.extract_features(slide, encoder, out / f"{stem}.h5", tile_size=tile_size,
                                          batch_size=batch_size, coords=coords, **res)
            from histofed.data.bags import read_bag

            n, dim = read_bag(bag).features.shape
            typer.echo(f"wrote {bag} ({n} tiles x {dim} features)")
