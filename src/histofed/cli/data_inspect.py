"""`histofed data inspect PATH`: counts, sizes, stain statistics and a contact sheet.

Understands an image/mask *source* folder (``images/`` + ``masks/``) or a folder whose
sub-folders are sources (e.g. ``shared/data/nuclei``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from histofed.atomic import atomic_path
from histofed.data.formats import LAYOUT_HELP, DataFormatError, Source, is_source_dir, read_source

UNDERSTOOD = (
    "inspect understands (1) an image/mask source folder: " + LAYOUT_HELP
    + "; or (2) a folder whose sub-folders are such sources (e.g. shared/data/nuclei)"
)


def find_sources(path: Path) -> list[Path]:
    """The source folders at ``path``: itself (images/), or its sub-folders with images/ + masks/.

    Returns [] when there is none (e.g. a folder of point-annotated tiles without masks/).
    """
    def ok(p: Path) -> bool:
        return is_source_dir(p) and (p / "masks").is_dir()

    if ok(path):
        return [path]
    return [p for p in sorted(path.iterdir()) if ok(p)] if path.is_dir() else []


def _instances(mask: np.ndarray) -> tuple[int, bool]:
    """(number of nuclei, exact?) - binary masks count connected components (touching merge)."""
    present = np.flatnonzero(np.bincount(mask.ravel()))
    present = present[present > 0]
    if len(present) > 1 or mask.dtype == np.uint16:
        return len(present), True
    from scipy.ndimage import label

    return int(label(mask > 0)[1]), False


# Optical density of each 8-bit intensity: OD = -log10(I / 255), I clipped to >= 1 (Beer-Lambert).
_OD_LUT = -np.log10(np.maximum(np.arange(256), 1) / 255.0)


def source_stats(src: Source) -> dict[str, Any]:
    """Summary numbers of one source (all pixels of all images).

    Stain statistics come from per-channel 256-bin histograms (exact for uint8, and fast).
    """
    hw = np.array([im.shape[:2] for im in src.images])  # N x 2 (H, W)
    hist = np.zeros((3, 256))
    for im in src.images:
        for c in range(3):
            hist[c] += np.bincount(im[..., c].ravel(), minlength=256)
    n_px = hist[0].sum()
    levels = np.arange(256.0)
    mean = hist @ levels / n_px
    counts, exact = zip(*(_instances(m) for m in src.masks))
    return {
        "name": src.name,
        "n_images": len(src),
        "width": hw[:, 1],
        "height": hw[:, 0],
        "rgb_mean": mean,
        "rgb_std": np.sqrt(np.maximum(hist @ levels**2 / n_px - mean**2, 0.0)),
        "od_mean": hist @ _OD_LUT / n_px,
        "foreground": np.array([np.count_nonzero(m) / m.size for m in src.masks]),
        "instances": np.array(counts),
        "instances_exact": all(exact),
        "mask_dtypes": sorted({str(m.dtype) for m in src.masks}),
        "has_meta": any(src.meta),
    }


def _mmm(values: np.ndarray) -> str:
    return f"{values.min():g} / {np.median(values):g} / {values.max():g}"


def format_stats(st: dict[str, Any]) -> str:
    """Human-readable report of :func:`source_stats`."""
    inst = st["instances"]
    lines = [
        f"source {st['name']}: {st['n_images']} images with masks"
        + (", meta.csv present" if st["has_meta"] else ", no meta.csv"),
        f"  width  min/median/max: {_mmm(st['width'])} px",
        f"  height min/median/max: {_mmm(st['height'])} px",
        "  RGB mean: " + " ".join(f"{v:.1f}" for v in st["rgb_mean"])
        + "   std: " + " ".join(f"{v:.1f}" for v in st["rgb_std"]),
        "  mean optical density (R G B): " + " ".join(f"{v:.3f}" for v in st["od_mean"]),
        f"  foreground fraction min/mean/max: {st['foreground'].min():.3f} / "
        f"{st['foreground'].mean():.3f} / {st['foreground'].max():.3f}",
        f"  masks: {', '.join(st['mask_dtypes'])}; nuclei per image "
        + ("(instance ids)" if st["instances_exact"]
           else "(connected components: touching nuclei merge in binary masks)")
        + f", total {int(inst.sum())}:",
    ]
    edges = np.histogram_bin_edges(inst, bins=min(6, max(len(np.unique(inst)), 1)))
    hist, edges = np.histogram(inst, bins=edges)
    for h, lo, hi in zip(hist, edges[:-1], edges[1:]):
        lines.append(f"    {lo:7.0f} - {hi:<7.0f} | {'#' * int(h)} {h}")
    return "\n".join(lines)


def _thumbnail(image: np.ndarray, mask: np.ndarray, side: int) -> np.ndarray:
    """Downscaled image (longer side = ``side``) with mask outlines in yellow; h x w x 3 uint8."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    h, w = mask.shape
    scale = min(side / max(h, w), 1.0)
    th, tw = max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)
    thumb = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.BILINEAR)).copy()
    rows = (np.arange(th) * h / th).astype(int)  # nearest-neighbour mask downscale
    cols = (np.arange(tw) * w / tw).astype(int)
    outline = find_boundaries(mask[np.ix_(rows, cols)], mode="inner")
    thumb[outline] = (255, 230, 0)
    return thumb


def contact_sheet(sources: list[Source], out_file: Path, *, per_source: int = 6) -> Path:
    """Write a PNG grid (one row per source, ``per_source`` images) with mask outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(min(per_source, max(len(s) for s in sources)), 1)
    fig, axes = plt.subplots(
        len(sources), cols, figsize=(2.6 * cols, 2.9 * len(sources)), squeeze=False
    )
    for r, src in enumerate(sources):
        picks = np.unique(np.linspace(0, len(src) - 1, min(cols, len(src))).round().astype(int))
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(picks):
                continue
            i = int(picks[c])
            ax.imshow(_thumbnail(src.images[i], src.masks[i], 320))
            h, w = src.masks[i].shape
            ax.set_title(
                f"{src.name}: {src.ids[i][:22]}\n{w}x{h}, fg {(src.masks[i] > 0).mean():.0%}",
                fontsize=7,
            )
    fig.suptitle("histofed data inspect (yellow = mask outlines)", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(out_file) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out_file


_HELP = (
    "Check a folder of H&E images + nucleus masks before training on it.\n\n"
    "Reads every image and mask (failing with a message that names the bad file), then prints "
    "per source: image count, width/height (min/median/max), RGB mean/std, mean optical density "
    "per channel (stain strength), foreground fraction and a histogram of nuclei per image.\n\n"
    "Writes a contact sheet with mask outlines to OUT/inspect-<name>.png: look at it to check "
    "that the masks line up with the nuclei.\n\n"
    "Example: histofed data inspect ../shared/data/nuclei --out runs/inspect"
)


def register(app: typer.Typer) -> None:
    """Attach this module's commands to `histofed data`."""

    @app.command("inspect", help=_HELP)
    def inspect(
        path: Annotated[Path, typer.Argument(
            help="A source folder (images/ + masks/ [+ meta.csv]) or a folder of sources, "
            "e.g. ../shared/data/nuclei or ../shared/data/nuclei/cpm15.",
        )],
        out: Annotated[Path, typer.Option(
            "--out", help="Folder for the contact sheet inspect-<name>.png."
        )] = Path("."),
        per_source: Annotated[int, typer.Option(
            "--per-source", min=1, help="Images per source shown on the contact sheet."
        )] = 6,
    ) -> None:
        found = find_sources(path)
        if not found:
            if not path.exists():
                what = "does not exist"
            elif is_source_dir(path):
                what = "has images/ but no masks/ folder (point labels or unlabelled tiles?)"
            else:
                what = "is not an image/mask folder"
            typer.echo(f"error: {path} {what}. {UNDERSTOOD}", err=True)
            deeper = sorted(path.glob("*/*/masks")) if path.is_dir() else []
            if deeper:
                hint = deeper[0].parent.parent
                typer.echo(f"hint: sources found one level down, try: {hint}", err=True)
            raise typer.Exit(code=2)
        sources = []
        for folder in found:
            try:
                src = read_source(folder)
            except DataFormatError as err:
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(code=1) from None
            typer.echo(format_stats(source_stats(src)))
            sources.append(src)
        sheet = contact_sheet(sources, out / f"inspect-{path.resolve().name}.png",
                              per_source=per_source)
        typer.echo(f"contact sheet: {sheet}")
