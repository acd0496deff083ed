"""Point-annotated nuclei -> nucleus-centred patches, and the classification ``PatchDataset``.

Reads the CRCHistoPhenotypes layout (``shared/data/README.md``, section crchisto)::

    <root>/images/imgN.png     500 x 500 RGB
    <root>/points/imgN.csv     x,y,label   (x = column, y = row, float, MATLAB 1-based)
    <root>/split.csv           id,split    (train / validation / test)

Example:
    >>> image = np.zeros((10, 10, 3), np.uint8); image[4, 5] = 255
    >>> extract_patches(image, np.array([[5.0, 4.0]]), size=3)[0, 1, 1].tolist()
    [255, 255, 255]
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from histofed.data.formats import DataFormatError, read_image

CRCHISTO_CLASSES: tuple[str, ...] = ("epithelial", "fibroblast", "inflammatory", "others")
POINT_COLUMNS: tuple[str, ...] = ("x", "y", "label")


def read_points(
    path: str | Path, *, one_based: bool = True, classes: tuple[str, ...] = CRCHISTO_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Read a point-annotation CSV with columns ``x,y,label``.

    Args:
        path: CSV file; ``label`` is a class name from ``classes`` (or its integer index).
        one_based: coordinates are MATLAB 1-based (CRCHisto): subtract 1 to get 0-based pixels.
        classes: class names; their order defines the integer labels 0..K-1.

    Returns:
        points: N x 2 float64 (x, y) 0-based pixel coordinates.
        labels: N int64 in 0..K-1.

    Raises:
        DataFormatError: missing columns, unknown label or a non-numeric coordinate.
    """
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        found = reader.fieldnames or []
        missing = [c for c in POINT_COLUMNS if c not in found]
        if missing:
            raise DataFormatError(
                f"{path}: point CSV lacks column(s) {missing}; found {found}, expected "
                f"{list(POINT_COLUMNS)} (x = column, y = row, label = one of {list(classes)})"
            )
        rows = list(reader)
    index = {name: i for i, name in enumerate(classes)} | {str(i): i for i in range(len(classes))}
    points = np.zeros((len(rows), 2), np.float64)
    labels = np.zeros(len(rows), np.int64)
    for i, row in enumerate(rows):
        try:
            points[i] = float(row["x"]), float(row["y"])
        except (TypeError, ValueError):
            raise DataFormatError(
                f"{path}, line {i + 2}: coordinates must be numbers, got x={row['x']!r}, "
                f"y={row['y']!r}"
            ) from None
        if row["label"] not in index:
            raise DataFormatError(
                f"{path}, line {i + 2}: unknown label {row['label']!r}; expected one of "
                f"{list(classes)}"
            )
        labels[i] = index[row["label"]]
    return points - (1.0 if one_based else 0.0), labels


def extract_patches(image: np.ndarray, points: np.ndarray, size: int = 32) -> np.ndarray:
    """Cut ``size x size`` patches centred on points, reflect-padding at the borders.

    The centre pixel is the point rounded to the nearest pixel (clipped into the image);
    a patch covers rows ``r - size // 2 .. r - size // 2 + size - 1`` (same for columns).

    Args:
        image: H x W x 3 uint8.
        points: N x 2 (x, y) 0-based pixel coordinates.
        size: patch side (27 and 32 are usual).

    Returns:
        N x size x size x 3 uint8 (a copy).
    """
    image = np.asarray(image)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    h, w = image.shape[:2]
    half = size // 2
    padded = np.pad(image, ((half, half), (half, half), (0, 0)), mode="reflect")
    rows = np.clip(np.floor(points[:, 1] + 0.5), 0, h - 1).astype(np.intp)
    cols = np.clip(np.floor(points[:, 0] + 0.5), 0, w - 1).astype(np.intp)
    # padded[r : r + size] is the patch centred on image row r (as r - half + half = r).
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(0, 1))
    return windows[rows, cols].transpose(0, 2, 3, 1).copy()  # N x 3 x s x s -> N x s x s x 3


@dataclass
class PointImage:
    """One point-annotated image: ``image`` H x W x 3 uint8, ``points`` N x 2 (x, y) 0-based,
    ``labels`` N int64."""

    id: str
    split: str
    image: np.ndarray
    points: np.ndarray
    labels: np.ndarray


def read_crchisto(root: str | Path, *, one_based: bool = True) -> list[PointImage]:
    """Read every image of a CRCHisto-layout folder, in ``split.csv`` order.

    Raises:
        FileNotFoundError: the folder, ``split.csv`` or an image/points file is missing.
        DataFormatError: a malformed ``split.csv`` or points CSV.
    """
    root = Path(root)
    split_csv = root / "split.csv"
    if not split_csv.is_file():
        raise FileNotFoundError(
            f"{split_csv} not found: expected the CRCHisto layout images/imgN.png, "
            "points/imgN.csv and split.csv (see shared/data/README.md, section crchisto)"
        )
    with open(split_csv, newline="") as f:
        reader = csv.DictReader(f)
        if not {"id", "split"} <= set(reader.fieldnames or []):
            raise DataFormatError(
                f"{split_csv}: expected columns id,split; found {reader.fieldnames}"
            )
        entries = [(r["id"], r["split"]) for r in reader]
    paths = [(root / "images" / f"{i}.png", root / "points" / f"{i}.csv") for i, _ in entries]
    for p in (p for pair in paths for p in pair):
        if not p.is_file():
            raise FileNotFoundError(f"{p} (listed in {split_csv}) does not exist")
    with ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 1)
    ) as pool:  # PNG decode frees the GIL
        pixels = list(pool.map(read_image, [image_path for image_path, _ in paths]))
    out = []
    for (image_id, split), image, (_, points_path) in zip(entries, pixels, paths, strict=True):
        points, labels = read_points(points_path, one_based=one_based)
        out.append(PointImage(image_id, split, image, points, labels))
    return out


def patches_by_split(
    images: list[PointImage], size: int = 32
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Patches of every image, grouped by split.

    Returns:
        ``{split: (patches N x s x s x 3 uint8, labels N int64)}``.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in dict.fromkeys(im.split for im in images):
        chosen = [im for im in images if im.split == split]
        patches = [extract_patches(im.image, im.points, size) for im in chosen]
        labels = [im.labels for im in chosen]
        out[split] = np.concatenate(patches), np.concatenate(labels)
    return out


class PatchDataset(Dataset):
    """Classification patches: item -> (image float32 [3, s, s] in [0, 1], label int64 scalar).

    Args:
        images: N x s x s x 3 uint8.
        labels: N int labels.
        augment: apply one of the 8 flips/right-angle rotations per item. The choice depends
            only on (seed, index), so a pass is reproducible; call ``reseed`` between passes.
        seed: seed of the augmentation choices.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, augment: bool = False, seed: int = 0
    ):
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be N x s x s x 3 uint8, got {images.shape} {images.dtype}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images  # N x s x s x 3 uint8
        self.labels = labels  # N int64
        self.augment = augment
        self.seed = int(seed)

    def reseed(self, seed: int) -> None:
        """Fix the augmentations of the next pass."""
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        patch = self.images[index]  # s x s x 3
        if self.augment:
            k = int(np.random.default_rng((self.seed, int(index))).integers(8))
            patch = np.rot90(patch, k % 4)
            if k >= 4:
                patch = patch[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))).float().div_(255.0)
        return x, torch.tensor(self.labels[index], dtype=torch.int64)
