"""``camelyon16-bags``: FLamby's Fed-Camelyon16 split over your own CAMELYON16 feature bags.

FLamby (Ogier du Terrail et al., NeurIPS 2022 Datasets & Benchmarks) splits the 399 CAMELYON16
slides (Bejnordi et al., JAMA 2017) by the hospital that scanned them -- 2 centres, Radboud UMC
(``hospital_corrected = 0``) and UMC Utrecht (1) -- and keeps the challenge's train/test split
(slides named ``test_*`` are the test set; ``normal_*`` and ``tumor_*`` train). Its metadata CSV
(``flamby/datasets/fed_camelyon16/metadata/metadata.csv``) has the columns::

    label,tumorp1000,tumorp10000,tumorp40000,hospital,hospital_corrected,slide_name
    0,,,,0.0,0.0,normal_001.tif

**The slides and features are not here** (CAMELYON16 is ~700 GB of slides; its licence is
CC0 but the data must be fetched from the challenge). Users who have feature bags give a
folder with one bag per slide, found by slide name: CLAM ``<stem>.h5`` (``features`` +
``coords``), CLAM ``pt_files/<stem>.pt`` (an N x D tensor), or FLamby's ``<slide_name>.npy``
(e.g. ``normal_001.tif.npy``) / ``<stem>.npy``. Slides without a bag are left out and counted
(as FLamby does for a partial download), as are ``normal_086`` and ``test_049``, which the
challenge withdrew.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from histofed.data.bags import BagDataset, Standardizer, read_bag
from histofed.data.federation import (
    ClientData,
    Federation,
    merge_options,
    register_federation,
    under_data_root,
)
from histofed.data.formats import DataFormatError

CENTRES = ("radboud", "utrecht")  # hospital_corrected 0, 1
WITHDRAWN = {"normal_086", "test_049"}


def read_flamby_metadata(path: Path) -> list[dict[str, Any]]:
    """Rows ``{"stem", "label", "centre", "split"}`` of FLamby's Fed-Camelyon16 metadata CSV.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: missing columns, or a label / centre that is not 0 or 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLamby metadata CSV {path} does not exist (it ships with "
                                "FLamby: flamby/datasets/fed_camelyon16/metadata/metadata.csv)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        centre_col = next((c for c in ("hospital_corrected", "hospital") if c in cols), None)
        if not {"label", "slide_name"} <= set(cols) or centre_col is None:
            raise DataFormatError(f"{path}: expected FLamby's columns label,...,hospital_corrected,"
                                  f"slide_name; found {cols}")
        rows = []
        for i, r in enumerate(reader):
            stem = r["slide_name"].strip().lower().split(".")[0]
            try:
                label, centre = int(float(r["label"])), int(float(r[centre_col]))
            except ValueError:
                raise DataFormatError(f"{path}, line {i + 2}: label {r['label']!r} and "
                                      f"{centre_col} {r[centre_col]!r} must be numbers") from None
            if label not in (0, 1) or centre not in (0, 1):
                raise DataFormatError(f"{path}, line {i + 2}: label and {centre_col} must be 0 "
                                      f"or 1, got {label}, {centre}")
            rows.append({"stem": stem, "name": r["slide_name"].strip(), "label": label,
                         "centre": centre, "split": "test" if stem.startswith("test") else "train"})
    if not rows:
        raise DataFormatError(f"{path}: no slides listed")
    return rows


def find_bag(folder: Path, stem: str, name: str) -> Path | None:
    """The bag of one slide: ``<stem>.h5``, ``pt_files/<stem>.pt``, ``<stem>.pt``,
    ``<name>.npy`` or ``<stem>.npy``; None when there is none."""
    for candidate in (folder / f"{stem}.h5", folder / "h5_files" / f"{stem}.h5",
                      folder / "pt_files" / f"{stem}.pt", folder / f"{stem}.pt",
                      folder / f"{name}.npy", folder / f"{stem}.npy"):
        if candidate.is_file():
            return candidate
    return None


def read_features(path: Path) -> np.ndarray:
    """``N x D`` float32 features of a ``.h5`` / ``.pt`` / ``.npy`` bag.

    Raises:
        DataFormatError: not an N x D array, or no instance.
    """
    if path.suffix == ".h5":
        x = read_bag(path).features
    elif path.suffix == ".pt":
        import torch

        x = torch.load(path, map_location="cpu", weights_only=True)
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    else:
        x = np.load(path, allow_pickle=False)
    if x.ndim != 2 or len(x) == 0:
        raise DataFormatError(f"{path}: a bag must be an N x D array with N >= 1, got shape "
                              f"{tuple(x.shape)}")
    return np.asarray(x, np.float32)


@register_federation(
    "camelyon16-bags",
    task="mil",
    needs_data_root=False,
    description="FLamby Fed-Camelyon16 (Radboud / Utrecht, challenge train/test) over your "
                "CAMELYON16 bags: -o features_dir=DIR -o metadata_csv=FILE",
)
def build_camelyon16_bags(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """Two clients, ``radboud`` and ``utrecht``; each trains on its centre's normal_/tumor_
    slides and is tested on its centre's test_ slides (FLamby's split; no randomness).

    Options: features_dir, metadata_csv (required; relative paths are under data_root),
    standardize=False (per-feature, fitted on each centre's own training bags).
    """
    del seed  # the split is fixed by FLamby
    opt = merge_options("camelyon16-bags", options,
                        dict(features_dir=None, metadata_csv=None, standardize=False))
    if opt["features_dir"] is None or opt["metadata_csv"] is None:
        raise ValueError("federation 'camelyon16-bags' needs options features_dir=DIR (one bag "
                         "per slide) and metadata_csv=FILE (FLamby's metadata.csv); CAMELYON16 "
                         "is not shipped with histofed")
    folder = Path(under_data_root(opt["features_dir"], data_root))
    if not folder.is_dir():
        raise FileNotFoundError(f"features_dir {folder} does not exist")
    rows = [r for r in read_flamby_metadata(under_data_root(opt["metadata_csv"], data_root))
            if r["stem"] not in WITHDRAWN]
    found, missing = [], []
    for r in rows:
        path = find_bag(folder, r["stem"], r["name"])
        (found if path else missing).append({**r, "path": path} if path else r)
    if not found:
        raise FileNotFoundError(f"{folder} holds no bag of any slide of the metadata CSV (looked "
                                "for <slide>.h5, pt_files/<slide>.pt, <slide>.tif.npy)")
    features = [read_features(r["path"]) for r in found]
    dims = {f.shape[1] for f in features}
    if len(dims) > 1:
        raise DataFormatError(f"{folder}: bags have different feature sizes {sorted(dims)}; "
                              "extract all slides with one encoder")
    clients = []
    for c, name in enumerate(CENTRES):
        split = {s: [i for i, r in enumerate(found) if r["centre"] == c and r["split"] == s]
                 for s in ("train", "test")}
        for s, idx in split.items():
            if not idx:
                raise ValueError(f"camelyon16-bags: centre {name!r} has no {s} bag in {folder} "
                                 f"({len(missing)} slide(s) of the CSV have no bag there)")
        labels = {s: np.array([found[i]["label"] for i in idx], np.int64)
                  for s, idx in split.items()}
        std = (Standardizer.fit([features[i] for i in split["train"]])
               if opt["standardize"] else None)
        clients.append(ClientData(
            name=name,
            train=BagDataset([features[i] for i in split["train"]], labels["train"], std),
            test=BagDataset([features[i] for i in split["test"]], labels["test"], std),
            info={"num_train": len(split["train"]), "num_test": len(split["test"]),
                  "label_hist_train": np.bincount(labels["train"], minlength=2).tolist(),
                  "label_hist_test": np.bincount(labels["test"], minlength=2).tolist(),
                  "test_ids": [found[i]["stem"] for i in split["test"]]}))
    return Federation(
        name="camelyon16-bags", task="mil", clients=clients, num_classes=2,
        description=f"Fed-Camelyon16 (FLamby split): {len(found)} slide bags, "
                    f"{len(missing)} listed slide(s) without a bag",
        info={"class_names": ["normal", "tumor"], "feature_dim": dims.pop(),
              "partitioner": "flamby-centres", "missing_slides": len(missing),
              **{k: str(v) for k, v in opt.items()}})
