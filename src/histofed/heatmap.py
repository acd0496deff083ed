"""Attention heatmaps of a MIL run on a whole slide (``histofed slides heatmap``).

As attention-MIL tools show them (CLAM, Lu et al. 2021): each tile's attention score is put at
the tile's place on the slide thumbnail, turned into its percentile rank among the slide's tiles
(so the map does not depend on the scale of the scores, and the top 1 % of tiles is always the
top of the colour bar), coloured with a colormap and blended over the tissue with ``alpha``.
The title gives the model's predicted class and its probability; a CSV lists every tile
(level-0 x, y, raw attention, percentile).

Tiles and features come from the same code as ``histofed slides extract``
(:func:`histofed.data.slides.extract_features`), or from an existing ``.h5`` bag (``bag=``),
whose ``coords`` place the tiles. Scores come from the model's ``instance_attention``
(:mod:`histofed.models.mil`); the model is rebuilt by :func:`histofed.evaluate.load_run_model`.

Example:
    >>> attention_heatmap("runs/fedavg-slides", "case.svs", "case-heatmap.png")  # doctest: +SKIP
    {'tiles': 412, 'predicted': 1, 'probability': 0.91, ...}
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histofed.atomic import atomic_path, atomic_write_text
from histofed.data import slides

# options of federations that standardise bag features with each site's own training statistics
_STANDARDISED_BY_DEFAULT = {"ucsb-breast-bags"}


def percentile_rank(scores: np.ndarray) -> np.ndarray:
    """Percentile rank in (0, 1] of each score among all (ties share their mean rank), as CLAM's
    heatmaps do (``scipy.stats.percentileofscore`` per tile; ``rankdata`` is the same at once).

    Example:
        >>> percentile_rank(np.array([0.1, 0.7, 0.3, 0.3])).tolist()
        [0.25, 1.0, 0.625, 0.625]
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64).ravel()
    return rankdata(scores) / max(len(scores), 1)


def bag_footprint(path: Path, coords: np.ndarray, slide) -> int:
    """Tile side in level-0 pixels of a bag: our ``size0`` attribute, else CLAM's ``coords``
    attributes (``patch_size`` at ``patch_level``), else the smallest step between coords.

    Raises:
        ValueError: none of these is available (a bag of one tile without attributes).
    """
    import h5py

    with h5py.File(path, "r") as f:
        if "size0" in f.attrs:
            return int(f.attrs["size0"])
        if "coords" in f and "patch_size" in f["coords"].attrs:
            a = f["coords"].attrs
            level = int(a.get("patch_level", 0))
            return int(round(int(a["patch_size"]) * slide.level_downsamples[level]))
    steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    if len(steps) == 0:
        raise ValueError(f"{path}: no tile size recorded (attribute size0, or CLAM's coords "
                         "patch_size) and too few tiles to infer it; re-extract the bag with "
                         "`histofed slides extract`")
    return int(steps.min())


def _standardizer(run_dir: Path, config, which: str, data_root: Path | None):
    """The standardiser the model's site applied to its bags, or None if the run had none.

    A standardising federation fits mean/std on each site's own training bags; they are not
    saved in the run, so the site's data is read again (this command runs where the data is).
    """
    fed = config.federation
    if not bool(fed.options.get("standardize", fed.name in _STANDARDISED_BY_DEFAULT)):
        return None
    if which == "global":
        raise ValueError(
            f"run {run_dir} standardised each site's features with that site's own statistics "
            f"(federation {fed.name!r}, standardize = true), so the global model has no single "
            "input scale: pass --model personal:<site>")
    from histofed.engine import data_root_from, load_federation

    info = json.loads((run_dir / "run.json").read_text())
    root = data_root_from(data_root) or (Path(info["data_root"]) if info.get("data_root") else None)
    name = which.split(":", 1)[1]
    for client in load_federation(config, root).clients:
        if client.name == name:
            return getattr(client.train, "standardizer", None)
    raise ValueError(f"federation {fed.name!r} rebuilt from {run_dir}/config.toml has no site "
                     f"{name!r}")


def _features(slide_path: Path, slide, bag: Path | None, encoder, tile_size: int,
              batch_size: int, tissue_threshold: float, progress: bool, res: dict
              ) -> tuple[np.ndarray, np.ndarray, int, str]:
    """``(features N x D, coords N x 2 level-0, size0, source)`` from a bag or the slide."""
    from histofed.data.bags import read_bag

    if bag is None:
        if encoder is None:
            raise ValueError("pass an encoder (the one the run's bags were made with) or --bag")
        with tempfile.TemporaryDirectory(prefix="histofed-heatmap-") as tmp:
            path = slides.extract_features(  # the very tiling and encoding of `slides extract`
                slide_path, encoder, Path(tmp) / "bag.h5", tile_size=tile_size,
                batch_size=batch_size, tissue_threshold=tissue_threshold, progress=progress, **res)
            b = read_bag(path)
            size0 = bag_footprint(path, b.coords, slide)
        return b.features, b.coords, size0, "extracted"
    b = read_bag(bag)
    if b.coords is None or len(b.coords) != len(b.features):
        raise ValueError(f"{bag}: a heatmap needs the tiles' coords (N x 2), and this bag has "
                         "none; re-extract it with `histofed slides extract`")
    if len(b.features) == 0:
        raise ValueError(f"{bag}: the bag has no tiles")
    width, height = slide.dimensions
    outside = (b.coords[:, 0] >= width) | (b.coords[:, 1] >= height) | (b.coords < 0).any(1)
    if outside.any():
        raise ValueError(f"{bag}: {int(outside.sum())} tile(s) lie outside {slide_path.name} "
                         f"({width} x {height}); is it this slide's bag?")
    return b.features, b.coords, bag_footprint(bag, b.coords, slide), str(bag)


def render_heatmap(thumb, coords: np.ndarray, size0: int, values: np.ndarray, scale: float,
                   *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend ``values`` (N in [0, 1]) coloured by ``cmap`` over each tile's box of the thumbnail.

    Args:
        thumb: the thumbnail (PIL image or ``h x w x 3`` uint8).
        coords: N x 2 level-0 tile corners; size0: tile side in level-0 pixels.
        scale: thumbnail pixels per level-0 pixel.

    Returns:
        ``h x w x 3`` uint8; pixels outside every tile are the thumbnail's.
    """
    from matplotlib import colormaps

    base = np.asarray(thumb, np.float64)[..., :3] / 255.0  # h x w x 3
    h, w = base.shape[:2]
    canvas = np.full((h, w), np.nan)  # h x w: value of the tile covering each pixel
    for (x, y), v in zip(np.asarray(coords, np.int64), values, strict=True):
        x0, y0 = int(np.floor(x * scale)), int(np.floor(y * scale))
        x1 = max(x0 + 1, int(np.ceil((x + size0) * scale)))
        y1 = max(y0 + 1, int(np.ceil((y + size0) * scale)))
        canvas[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = v
    covered = ~np.isnan(canvas)
    colour = colormaps[cmap](np.nan_to_num(canvas))[..., :3]  # h x w x 3
    out = np.where(covered[..., None], alpha * colour + (1 - alpha) * base, base)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def attention_heatmap(
    run_dir: str | os.PathLike[str],
    slide_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    which: str = "global",
    bag: str | os.PathLike[str] | None = None,
    encoder: torch.nn.Module | None = None,
    tile_size: int = 256,
    batch_size: int = 32,
    tissue_threshold: float = 0.5,
    magnification: float | None = None,
    mpp: float | None = None,
    assume_mpp: float | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    max_side: int = 2048,
    data_root: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out`` (PNG: attention over the thumbnail, colour bar, prediction in the title)
    and ``out`` with suffix ``.csv`` (one row per tile).

    Args:
        run_dir: a finished MIL run (``slides-bags``, ...).
        slide_path: the slide (for the thumbnail; tiles too unless ``bag`` is given).
        out: the PNG to write (atomically).
        which: "global" or "personal:<site>".
        bag: an ``.h5`` bag of this slide (features + coords) instead of extracting again.
        encoder: phi for extraction (the one the run's bags were made with).
        tile_size, batch_size, tissue_threshold, magnification, mpp, assume_mpp: as in
            ``histofed slides extract`` (they must match the run's bags).
        alpha: opacity of the colours; cmap: a matplotlib colormap name.
        max_side: longest side of the thumbnail.
        data_root: the data of a run that standardised features (see :func:`_standardizer`).

    Returns:
        A summary: tiles, predicted class, its probability, all class probabilities, source.

    Raises:
        ValueError: not a MIL run, no such model, a bag without coords or of another slide,
            features of another size than the model's input (another encoder).
        SlideError / NoTissueError: the slide cannot be read, or has no tissue tile.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from histofed.evaluate import load_run_model
    from histofed.predict import _csv

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; e.g. jet, viridis, coolwarm, inferno")
    run_dir, slide_path, out = Path(run_dir), Path(slide_path), Path(out)
    config, _, model = load_run_model(run_dir, which, task="mil")
    if not hasattr(model, "instance_attention"):
        raise ValueError(f"the {which} model of {run_dir} ({type(model).__name__}) gives no "
                         "per-instance attention")
    standardizer = _standardizer(run_dir, config, which, data_root)
    res = {"magnification": magnification, "mpp": mpp, "assume_mpp": assume_mpp}
    with closing(slides.open_slide(slide_path)) as slide:
        features, coords, size0, source = _features(
            slide_path, slide, Path(bag) if bag else None, encoder, tile_size, batch_size,
            tissue_threshold, progress, res)
        in_dim = model.embed[0].in_features
        if features.shape[1] != in_dim:
            raise ValueError(
                f"{source}: tiles have {features.shape[1]} features but the {which} model of "
                f"{run_dir} takes {in_dim}: use the encoder (and --out-dim) the run's bags were "
                "extracted with")
        x = torch.from_numpy(standardizer(features) if standardizer else features.astype(np.float32))
        with torch.no_grad():
            probs = torch.softmax(model(x[None]), dim=1)[0].numpy()  # C
            scores = model.instance_attention(x).numpy()  # N
        thumb = slide.get_thumbnail((max_side, max_side)).convert("RGB")
        scale = thumb.width / slide.dimensions[0]  # thumbnail px per level-0 px
    ranks = percentile_rank(scores)
    image = render_heatmap(thumb, coords, size0, ranks, scale, alpha=alpha, cmap=cmap)
    k = int(probs.argmax())
    fig = Figure(figsize=(8, 8 * image.shape[0] / image.shape[1] + 0.8), layout="constrained")
    ax = fig.subplots()
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), ax=ax, shrink=0.8)
    bar.set_label(f"attention, percentile rank among the {len(scores)} tiles")
    ax.set_title(f"{slide_path.name}: {which} model predicts class {k} (p = {probs[k]:.2f})",
                 fontsize=10)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    rows = [{"x": int(cx), "y": int(cy), "size0": size0, "attention": float(s),
             "percentile": round(float(r), 6)} for (cx, cy), s, r in zip(coords, scores, ranks)]
    atomic_write_text(out.with_suffix(".csv"), _csv(rows))
    return {"run": str(run_dir), "model": which, "slide": str(slide_path), "source": source,
            "tiles": int(len(scores)), "predicted": k, "probability": float(probs[k]),
            "probabilities": [float(p) for p in probs], "png": str(out),
            "csv": str(out.with_suffix(".csv"))}
