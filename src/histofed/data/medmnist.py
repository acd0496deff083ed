"""MedMNIST ``.npz`` files (Yang et al., Scientific Data 2023) as a federation, for users who
have them: PathMNIST, BloodMNIST, TissueMNIST, OrganAMNIST, ... (the FedMIC paper's datasets).

histofed does not download them (no test downloads; fetch them yourself from
https://medmnist.com, e.g. ``pathmnist.npz``). One file holds six arrays:

    train_images  N x s x s x 3 uint8 (RGB sets) or N x s x s (grey sets), s = 28/64/128/224
    train_labels  N x 1 integer class ids (N, also accepted)
    val_images, val_labels, test_images, test_labels   the same for the official splits

Grey images are repeated to three channels (our choice: every histofed classifier takes RGB,
and :class:`~histofed.data.patches.PatchDataset` expects N x s x s x 3). Multi-label sets
(ChestMNIST: N x 14 labels) are refused: histofed's classification task is single-label.

The ``medmnist-npz`` federation splits the official train split over ``num_clients`` with
Dirichlet label skew (like ``crchisto-dirichlet``) and shares the val and test splits out class
by class in proportion to each client's training counts, so every client is evaluated on its
own label mix. ``max_per_split`` keeps a seeded, stratified subsample of each split (a
CPU-sized run; 0 = everything).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histofed.data.federation import ClientData, Federation, merge_options, register_federation
from histofed.data.partition import DirichletPartitioner, partition_like, stratified_split
from histofed.data.patches import PatchDataset

SPLITS = ("train", "val", "test")
PAPER_SETS = ("pathmnist", "bloodmnist", "tissuemnist", "organamnist")


def read_medmnist_npz(path: Path | str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images N x s x s x 3 uint8, labels N int64)}`` for train, val and test.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing keys (named, with the expected layout), multi-label labels, images
            that are not uint8 N x s x s (x 1|3), or image/label counts that differ.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MedMNIST file (download e.g. pathmnist.npz "
                                "from https://medmnist.com and pass its path)")
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        need = [f"{s}_{part}" for s in SPLITS for part in ("images", "labels")]
        missing = [k for k in need if k not in keys]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; a MedMNIST .npz holds "
                             f"{', '.join(need)} (found: {', '.join(sorted(keys)) or 'none'})")
        out = {}
        for split in SPLITS:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            out[split] = (_as_rgb(images, f"{path}: {split}_images"),
                          _as_labels(labels, len(images), f"{path}: {split}_labels"))
    return out


def _as_rgb(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 pixels, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:  # grey: N x s x s -> N x s x s x 3
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: expected N x s x s (grey) or N x s x s x 3 (RGB), got "
                         f"shape {images.shape}")
    return np.ascontiguousarray(images)


def _as_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{where}: shape {labels.shape} looks multi-label (e.g. ChestMNIST); "
                         "histofed classifies one label per image (N or N x 1 labels)")
    if len(labels) != n:
        raise ValueError(f"{where}: {len(labels)} labels for {n} images")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise ValueError(f"{where}: labels must be integer class ids >= 0, got {labels.dtype}")
    return labels.astype(np.int64)


def _subsample(x: np.ndarray, y: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified subsample of at most ``limit`` items (0 = all)."""
    if not limit or len(y) <= limit:
        return x, y
    _, keep = stratified_split(y, limit / len(y), np.random.default_rng(seed))  # ~limit, per class
    keep = np.sort(keep)
    return x[keep], y[keep]


@register_federation(
    "medmnist-npz",
    task="classification",
    needs_data_root=False,
    description="a MedMNIST .npz (e.g. pathmnist.npz): -o path=FILE; Dirichlet label skew",
)
def build_medmnist_npz(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """MedMNIST classification over ``num_clients`` with Dirichlet label skew.

    Options: path (required; relative paths are taken under data_root), num_clients=5,
    alpha=0.5, min_size=20 (training images per client), max_per_split=0 (0 = all),
    augment=True (flips and right-angle rotations; fine for pathology and blood, questionable
    for organ CT slices: set augment=false there).
    """
    opt = merge_options("medmnist-npz", options, dict(path="", num_clients=5, alpha=0.5,
                                                      min_size=20, max_per_split=0, augment=True))
    if not opt["path"]:
        raise ValueError("federation 'medmnist-npz' needs option path=FILE (a MedMNIST .npz, "
                         "e.g. -o path=pathmnist.npz)")
    path = Path(opt["path"]).expanduser()
    if not path.is_absolute() and data_root is not None:
        path = Path(data_root) / path
    data = read_medmnist_npz(path)
    data = {s: _subsample(*data[s], opt["max_per_split"], seed + i)
            for i, s in enumerate(SPLITS)}
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    num_classes = int(max(ytr.max(), yva.max(initial=0), yte.max(initial=0))) + 1
    part = DirichletPartitioner(labels=ytr, alpha=opt["alpha"], num_partitions=opt["num_clients"],
                                seed=seed, min_size=opt["min_size"])
    counts = np.stack([np.bincount(ytr[p], minlength=num_classes) for p in part.partitions()])
    rng = np.random.default_rng([seed, 1])
    val_parts, test_parts = partition_like(yva, counts, rng), partition_like(yte, counts, rng)
    clients = []
    for c, (tr, va, te) in enumerate(zip(part.partitions(), val_parts, test_parts, strict=True)):
        if len(te) == 0:
            raise ValueError(f"medmnist-npz: client {c} got no test images; raise min_size or "
                             "max_per_split")
        clients.append(ClientData(
            name=f"client-{c}",
            train=PatchDataset(xtr[tr], ytr[tr], augment=opt["augment"], seed=seed + c),
            val=PatchDataset(xva[va], yva[va]) if len(va) else None,
            test=PatchDataset(xte[te], yte[te]),
            info={"num_train": len(tr), "num_val": len(va), "num_test": len(te),
                  "label_hist_train": np.bincount(ytr[tr], minlength=num_classes).tolist(),
                  "label_hist_test": np.bincount(yte[te], minlength=num_classes).tolist()}))
    return Federation(
        name="medmnist-npz", task="classification", clients=clients, num_classes=num_classes,
        description=f"{path.name}: {xtr.shape[1]}px, {num_classes} classes, Dirichlet "
                    f"alpha={opt['alpha']}",
        info={"partitioner": "dirichlet", **{k: str(v) for k, v in opt.items()}})
