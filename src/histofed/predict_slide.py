"""`histofed predict` on a whole slide: nuclei over the tissue tiles, in slide coordinates.

Tiles come from :mod:`histofed.data.slides` (tissue mask, tile grid, OpenSlide reads). Each
tile is read with a ``margin`` of context on every side and a nucleus is kept only by the tile
whose core holds its centroid, so nuclei on tile borders are neither cut in two nor counted
twice (when they are smaller than the margin).

Example:
    >>> predict_slide("runs/fedavg", "case.svs", "pred/case")  # doctest: +SKIP
    {'tiles': 68, 'nuclei': 10412, 'seconds': 41.2, ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageDraw

from histofed.atomic import atomic_path, atomic_write_text
from histofed.data import slides
from histofed.instances import InstanceOptions, label_instances
from histofed.overlays import CONTOUR, nucleus_features, write_geojson
from histofed.predict import Predictor, _csv, staged_dir


def _subsample(coords: np.ndarray, max_tiles: int | None) -> np.ndarray:
    """At most ``max_tiles`` rows, evenly spread over the (row-major) tile list."""
    if max_tiles is None or len(coords) <= max_tiles:
        return coords
    idx = np.unique(np.linspace(0, len(coords) - 1, max_tiles).round().astype(int))
    return coords[idx]


def predict_slide(
    run_dir: str | os.PathLike[str],
    slide_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    which: str = "global",
    options: InstanceOptions = InstanceOptions(),
    tile_size: int = 256,
    margin: int = 32,
    magnification: float | None = None,
    mpp: float | None = None,
    assume_mpp: float | None = None,
    tissue_threshold: float = 0.5,
    max_tiles: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Nuclei of a whole slide as GeoJSON (level-0 pixels) plus a thumbnail overlay.

    Args:
        run_dir: a finished segmentation run.
        slide_path: a slide OpenSlide reads (.svs, pyramidal TIFF, ...).
        out: output folder; must not exist (or be empty).
        which: "global" or "personal:<client>".
        options: how predicted pixels become nuclei.
        tile_size: tile side in pixels at the requested resolution (the model's input scale).
        margin: context pixels read around each tile (nuclei centred there belong to the
            neighbour).
        magnification, mpp, assume_mpp: resolution to predict at (default: level-0 pixels);
            use the resolution the model was trained at (MoNuSeg is 40x, 0.25 um/px).
        tissue_threshold: minimum tissue fraction of a tile (see ``slides.tile_coords``).
        max_tiles: predict at most this many tissue tiles, evenly spread (a quick look).
        progress: show a tqdm bar.

    Returns:
        The summary written to ``out/summary.json``: tiles (predicted and with tissue),
        nuclei, seconds, resolution.

    Raises:
        NoTissueError: the slide has no tissue tile (nothing is written).
        SlideError: OpenSlide cannot read the slide, or the resolution cannot be located.
        ValueError: the run is not a segmentation run; bad tile size or margin.
        OutputExistsError: ``out`` already holds files.
    """
    from tqdm.auto import tqdm

    if margin < 0 or tile_size < 16:
        raise ValueError(f"need tile_size >= 16 and margin >= 0, got {tile_size}, {margin}")
    slide_path = Path(slide_path)
    res = {"magnification": magnification, "mpp": mpp, "assume_mpp": assume_mpp}
    predictor = Predictor(run_dir, which)  # refuses a non-segmentation run before any work
    t0 = time.perf_counter()
    with closing(slides.open_slide(slide_path)) as slide:
        spec = slides.tile_spec(slide, tile_size, **res)
        mask = slides.tissue_mask(slide)  # raises NoTissueError on a blank slide
        coords = slides.tile_coords(slide, tile_size, tissue_threshold=tissue_threshold,
                                    mask=mask, **res)  # N x 2 level-0 (x, y)
        if len(coords) == 0:
            raise slides.NoTissueError(
                f"no {tile_size} px tile of {slide_path} has a tissue fraction >= "
                f"{tissue_threshold}; lower --tissue-threshold or use a smaller --tile-size")
        picked = _subsample(coords, max_tiles)
        big = tile_size + 2 * margin
        shift = int(round(margin * spec.downsample))  # margin in level-0 pixels
        scale = round(big * spec.downsample) / big  # level-0 pixels per predicted pixel
        features, rows = [], []

        def core(cx: float, cy: float) -> bool:  # centroid in the tile, not its margin
            return margin <= cx < margin + tile_size and margin <= cy < margin + tile_size

        reads = slides.read_tiles(slide, picked - shift, big, **res)
        with staged_dir(Path(out)) as tmp:
            for (x, y), image in tqdm(zip(picked, reads), total=len(picked), unit="tile",
                                      desc=slide_path.name, disable=not progress):
                labels = label_instances(predictor.binary(image), options)  # big x big
                found = nucleus_features(labels, origin=(x - shift, y - shift), scale=scale,
                                         keep=core)
                features += found
                rows.append({"x": int(x), "y": int(y), "nuclei": len(found)})
            seconds = time.perf_counter() - t0
            stem = slide_path.stem
            write_geojson(tmp / f"{stem}.geojson", features)
            thumb = slides.render_tiling(slide, picked, spec.size0, mask, max_side=2048)
            _draw_nuclei(thumb, features, thumb.width / slide.dimensions[0])
            with atomic_path(tmp / f"{stem}-overlay.png") as png:
                thumb.save(png, format="PNG")
            atomic_write_text(tmp / f"{stem}-tiles.csv", _csv(rows))
            summary = {
                "run": str(run_dir), "model": which, "slide": str(slide_path),
                "dimensions": list(slide.dimensions), "tissue_tiles": int(len(coords)),
                "tiles": int(len(picked)), "tile_size": tile_size, "margin": margin,
                "downsample": spec.downsample, "level": spec.level,
                **{k: v for k, v in res.items() if v is not None},
                "instances": dataclasses.asdict(options), "nuclei": len(features),
                "seconds": round(seconds, 2),
            }
            atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
    return summary


def _draw_nuclei(thumb, features: list[dict], scale: float) -> None:
    """Outline each nucleus polygon on the thumbnail (``scale`` = thumbnail px per level-0 px)."""
    draw = ImageDraw.Draw(thumb)
    for f in features:
        ring = [(x * scale, y * scale) for x, y in f["geometry"]["coordinates"][0]]
        draw.line(ring, fill=CONTOUR, width=1)

