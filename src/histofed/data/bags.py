"""CLAM-style HDF5 feature bags (one slide = one bag of tile features) and the MIL ``BagDataset``.

A bag file holds ``features`` (N x D float, older tools write ``feats``) and optionally
``coords`` (N x 2 int, tile origins in level-0 pixels). A labels CSV names the bags::

    slide_id,label[,site|client]       (bag file = <bags_dir>/<slide_id>.h5)

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "slide.h5")
    >>> write_bag(path, np.ones((3, 4), np.float32), coords=np.zeros((3, 2), np.int64))
    >>> read_bag(path).features.shape
    (3, 4)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from histofed.atomic import atomic_path
from histofed.data.federation import site_name_problem
from histofed.data.formats import DataFormatError

FEATURE_KEYS: tuple[str, ...] = ("features", "feats")


@dataclass
class Bag:
    """``features`` N x D float32, ``coords`` N x 2 int64 or None, ``path`` the source file."""

    features: np.ndarray
    coords: np.ndarray | None
    path: Path


def read_bag(path: str | Path) -> Bag:
    """Read one HDF5 bag (``features`` or ``feats``, optional ``coords``).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: not HDF5, no feature dataset, or inconsistent shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bag file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataFormatError(f"{path}: not a readable HDF5 bag file ({err})") from None
    with f:
        keys = sorted(f.keys())
        key = next((k for k in FEATURE_KEYS if k in f), None)
        if key is None:
            raise DataFormatError(
                f"{path}: no feature dataset; found keys {keys}, expected one of "
                f"{list(FEATURE_KEYS)} (N x D) and optionally 'coords' (N x 2)"
            )
        features = np.asarray(f[key][()], dtype=np.float32)
        coords = np.asarray(f["coords"][()], dtype=np.int64) if "coords" in f else None
    if features.ndim != 2 or len(features) == 0:
        raise DataFormatError(f"{path}: '{key}' must be N x D with N >= 1, got {features.shape}")
    if coords is not None and coords.shape != (len(features), 2):
        raise DataFormatError(
            f"{path}: 'coords' must be {len(features)} x 2 to match '{key}', got {coords.shape}"
        )
    return Bag(features, coords, path)


def write_bag(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write a CLAM-style bag atomically (temp file in the same folder, then ``os.replace``).

    Args:
        path: destination ``.h5`` file (parent folders are created).
        features: N x D, stored as float32 under ``features``.
        coords: optional N x 2, stored as int64 under ``coords``.
        attrs: optional HDF5 file attributes (str/number values).
    """
    path = Path(path)
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {features.shape}")
    if coords is not None:
        coords = np.asarray(coords, dtype=np.int64)
        if coords.shape != (len(features), 2):
            raise ValueError(f"coords must be {len(features)} x 2, got {coords.shape}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        if coords is not None:
            f.create_dataset("coords", data=coords)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


@dataclass
class BagTable:
    """A parsed labels CSV: per bag its id, file path, int label and group (site/client) or None."""

    slide_ids: list[str]
    paths: list[Path]
    labels: np.ndarray  # N int64
    groups: list[str] | None
    class_names: list[str]


def read_bag_labels(csv_path: str | Path, bags_dir: str | Path | None = None) -> BagTable:
    """Read ``slide_id,label[,site|client]``; labels are ints, or names mapped in sorted order.

    A ``label_int`` column, when present, is used as the integer label (``label`` then names it).

    Raises:
        DataFormatError: missing columns or empty table.
        FileNotFoundError: a row names a bag missing from ``bags_dir`` (default: the CSV's folder).
    """
    csv_path = Path(csv_path)
    bags_dir = Path(bags_dir) if bags_dir is not None else csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if not {"slide_id", "label"} <= set(cols):
            raise DataFormatError(
                f"{csv_path}: expected columns slide_id,label (optional site or client); "
                f"found {cols}"
            )
        rows = list(reader)
    if not rows:
        raise DataFormatError(f"{csv_path}: no bags listed")
    group_col = next((c for c in ("site", "client") if c in cols), None)
    paths = []
    for i, r in enumerate(rows):
        name = r["slide_id"] if r["slide_id"].endswith(".h5") else f"{r['slide_id']}.h5"
        p = bags_dir / name
        if not p.is_file():
            raise FileNotFoundError(
                f"{csv_path}, line {i + 2}: bag {r['slide_id']!r} has no file {p}; "
                "remove the row or put the .h5 file there (or pass the right bags_dir)"
            )
        paths.append(p)
    names = [r["label"] for r in rows]
    if "label_int" in cols:
        labels = np.array([int(r["label_int"]) for r in rows], np.int64)
        class_names = [
            n for _, n in sorted({int(r["label_int"]): r["label"] for r in rows}.items())
        ]
    elif all(n.lstrip("-").isdigit() for n in names):
        labels = np.array([int(n) for n in names], np.int64)
        class_names = [str(k) for k in range(int(labels.max()) + 1)]
    else:
        class_names = sorted(set(names))
        labels = np.array([class_names.index(n) for n in names], np.int64)
    if labels.min() < 0:
        raise DataFormatError(f"{csv_path}: labels must be >= 0, got {labels.min()}")
    groups = [r[group_col] for r in rows] if group_col else None
    for i, group in enumerate(groups or []):
        problem = site_name_problem(group)
        if problem:
            raise DataFormatError(f"{csv_path}, line {i + 2}, column {group_col!r}: {problem}")
    return BagTable([r["slide_id"] for r in rows], paths, labels, groups, class_names)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature ``(x - mean) / std``; fit it on a client's training bags only."""

    mean: np.ndarray  # D float32
    std: np.ndarray  # D float32, >= eps

    @classmethod
    def fit(cls, features_list: list[np.ndarray], eps: float = 1e-6) -> Standardizer:
        """Statistics over all instances of the given bags (each N_i x D)."""
        x = np.concatenate(features_list).astype(np.float64)  # sum(N_i) x D
        std = x.std(axis=0)
        return cls(
            x.mean(axis=0).astype(np.float32), np.where(std < eps, 1.0, std).astype(np.float32)
        )

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32)


class BagDataset(Dataset):
    """MIL bags: item -> (features float32 [N_i, D], label int64 scalar).

    Args:
        features_list: one N_i x D array per bag.
        labels: bag labels.
        standardizer: optional transform applied once at construction.
    """

    def __init__(
        self,
        features_list: list[np.ndarray],
        labels: np.ndarray,
        standardizer: Standardizer | None = None,
    ):
        labels = np.asarray(labels, dtype=np.int64)
        if len(features_list) != len(labels):
            raise ValueError(f"{len(features_list)} bags but {len(labels)} labels")
        dims = {f.shape[1] for f in features_list}
        if len(dims) > 1:
            raise ValueError(f"bags have different feature dimensions {sorted(dims)}")
        tf = standardizer or (lambda x: np.asarray(x, np.float32))
        self.features = [torch.from_numpy(np.ascontiguousarray(tf(f))) for f in features_list]
        self.labels = labels  # N int64
        self.standardizer = standardizer

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1]) if self.features else 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], torch.tensor(self.labels[index], dtype=torch.int64)
