"""`histofed predict`: a segmentation run's model on image tiles or a whole slide, written as
files a pathologist can open.

Tile folder (``--images DIR``, the images in DIR or DIR/images)::

    OUT/masks/<id>.png        16-bit instance ids (0 = background, 1..N nuclei)
    OUT/overlays/<id>.png     the image with predicted nucleus contours (green)
    OUT/geojson/<id>.geojson  nucleus polygons in tile pixels (QuPath: File > Import objects)
    OUT/predictions.csv       per image: size, nuclei, seconds
    OUT/summary.json          run, model, instance options, totals

Whole slide (``--images SLIDE``, any format OpenSlide reads)::

    OUT/<slide>.geojson       nucleus polygons in level-0 slide pixels (import into QuPath on
                              the same slide)
    OUT/<slide>-overlay.png   thumbnail: nuclei outlined green, predicted tiles dark green,
                              non-tissue tinted blue
    OUT/<slide>-tiles.csv     per tile: level-0 x, y, nuclei
    OUT/summary.json          tiles, seconds, nuclei, resolution

Nothing is half-written: inputs are checked first, outputs go to a hidden folder beside OUT that
is renamed to OUT only when everything succeeded, and OUT must not exist yet.

Example:
    >>> summary = predict_tiles("runs/fedavg", "tiles/", "pred/")  # doctest: +SKIP
    >>> summary["nuclei"]                                          # doctest: +SKIP
    412
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofed.atomic import _UMASK, atomic_write_text
from histofed.data.formats import IMAGE_SUFFIXES, DataFormatError, read_image
from histofed.instances import InstanceOptions, label_instances
from histofed.overlays import draw_contours, nucleus_features, write_geojson, write_png


class OutputExistsError(ValueError):
    """The output folder already holds files (histofed never overwrites results)."""


class Predictor:
    """A run's segmentation model with its evaluation settings (window, overlap, threshold).

    Args:
        run_dir: a finished segmentation run.
        which: "global" or "personal:<client>".
    """

    def __init__(self, run_dir: str | os.PathLike[str], which: str = "global") -> None:
        from histofed.evaluate import load_run_model

        self.run_dir = Path(run_dir)
        self.which = which
        self.config, self.task, self.model = load_run_model(self.run_dir, which)

    @torch.no_grad()
    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 -> H x W float32 nucleus probability (sliding windows, MONAI)."""
        x = torch.tensor(image).permute(2, 0, 1).float()[None] / 255.0  # copies: read-only ok
        return self.task.predict(self.model, x, self.config.eval)[0, 0].numpy()  # H x W

    def binary(self, image: np.ndarray) -> np.ndarray:
        """H x W bool: probability >= the run's evaluation threshold."""
        return self.probabilities(image) >= self.config.eval.threshold


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out``, renamed to ``out`` only if the block succeeds."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(
            f"{out} already exists and histofed predict never overwrites; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private (0700)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_images(folder: str | os.PathLike[str], *, mixed_sizes: bool = False) -> list[Path]:
    """Image files of a tile folder (DIR/images/ if present, else DIR), checked for consistency.

    A folder of tiles cut from one slide has one size and one colour format; a mix usually
    means stray files (a mask, a thumbnail) in the folder, so it is refused unless
    ``mixed_sizes`` (datasets such as CPM-15 do mix sizes). Channel counts must always agree.

    Raises:
        DataFormatError: no images, or images that differ in channel count (or in size,
            unless ``mixed_sizes``); the message names one file of each kind and the fix.
    """
    from PIL import Image

    folder = Path(folder)
    root = folder / "images" if (folder / "images").is_dir() else folder
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not paths:
        raise DataFormatError(f"{root} holds no .png/.tif/.tiff/.jpg images; pass a folder of "
                              "image tiles (or a slide file)")
    kinds: dict[tuple, Path] = {}
    for p in paths:
        try:
            with Image.open(p) as im:
                size = (0, 0) if mixed_sizes else im.size
                kinds.setdefault((size, len(im.getbands())), p)
        except OSError as err:
            raise DataFormatError(f"cannot read image {p}: {err}. Fix: re-export it as PNG or "
                                  "remove it from the folder") from None
    if len(kinds) > 1:
        desc = "; ".join(f"{p.name} has {c} channel(s)" + ("" if mixed_sizes else f", {w}x{h}")
                         for ((w, h), c), p in list(kinds.items())[:4])
        fix = "" if mixed_sizes else (" If the sizes differ on purpose (a dataset such as "
                                      "CPM-15), pass --mixed-sizes")
        raise DataFormatError(
            f"{root} mixes image sizes or channel counts ({desc}). Fix: keep one colour "
            "format (e.g. RGB) and one tile size per folder and predict the folders "
            f"separately, or remove stray files.{fix}")
    return paths


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def predict_tiles(
    run_dir: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    which: str = "global",
    options: InstanceOptions = InstanceOptions(),
    mixed_sizes: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Masks, contour overlays and GeoJSON for every image of a tile folder.

    Args:
        run_dir: a finished segmentation run.
        images: folder of image tiles (one size, one channel count).
        out: output folder; must not exist (or be empty).
        which: "global" or "personal:<client>".
        options: how predicted pixels become nuclei (components or watershed, min area).
        mixed_sizes: accept images of different sizes (see :func:`list_images`).
        progress: show a tqdm bar.

    Returns:
        The summary written to ``out/summary.json``.

    Raises:
        DataFormatError: unreadable or inconsistent images.
        ValueError: the run is not a segmentation run.
        OutputExistsError: ``out`` already holds files.
    """
    from tqdm.auto import tqdm

    paths = list_images(images, mixed_sizes=mixed_sizes)
    predictor = Predictor(run_dir, which)
    t0 = time.perf_counter()
    rows = []
    with staged_dir(Path(out)) as tmp:
        for p in tqdm(paths, unit="tile", desc="predict", disable=not progress):
            t = time.perf_counter()
            image = read_image(p)  # H x W x 3 uint8
            labels = label_instances(predictor.binary(image), options)  # H x W int32
            write_png(tmp / "masks" / f"{p.stem}.png", labels.astype(np.uint16))
            write_png(tmp / "overlays" / f"{p.stem}.png", draw_contours(image, labels))
            write_geojson(tmp / "geojson" / f"{p.stem}.geojson", nucleus_features(labels))
            rows.append({"id": p.stem, "width": image.shape[1], "height": image.shape[0],
                         "nuclei": int(labels.max()), "seconds": round(time.perf_counter() - t, 3)})
        summary = {"run": str(run_dir), "model": which, "images": str(images),
                   "instances": dataclasses.asdict(options),
                   "tiles": len(rows), "nuclei": sum(r["nuclei"] for r in rows),
                   "seconds": round(time.perf_counter() - t0, 2)}
        atomic_write_text(tmp / "predictions.csv", _csv(rows))
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
    return summary
