"""camelyon16-bags: FLamby's Fed-Camelyon16 split over a tiny generated metadata CSV + bags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histofed.data.bags import write_bag
from histofed.data.federation import build_federation
from histofed.data.formats import DataFormatError

import histofed.data.registry  # noqa: F401

HEADER = "label,tumorp1000,tumorp10000,tumorp40000,hospital,hospital_corrected,slide_name\n"
ROWS = [  # (label, hospital, hospital_corrected, slide_name), as in FLamby's file
    (0, 0, 0, "normal_001.tif"), (0, 1, 1, "normal_101.tif"), (0, 0, 0, "normal_086.tif"),
    (1, 0, 0, "tumor_001.tif"), (1, 0, 1, "tumor_096.tif"), (1, 1, 1, "tumor_071.tif"),
    (0, 0, 0, "test_003.tif"), (1, 1, 1, "test_001.tif"), (1, 0, 0, "test_002.tif"),
    (0, 1, 1, "test_012.tif"), (0, 0, 0, "test_049.tif"), (0, 0, 0, "normal_002.tif"),
]


def write_case(tmp_path, skip=("normal_002",)):
    rng = np.random.default_rng(0)
    feats = tmp_path / "features"
    (feats / "pt_files").mkdir(parents=True)
    lines = [HEADER]
    for i, (label, hosp, corrected, name) in enumerate(ROWS):
        tumour = "0.01,0.01,0.01" if label else ",,"
        lines.append(f"{label},{tumour},{float(hosp)},{float(corrected)},{name}\n")
        stem = name.split(".")[0]
        x = rng.normal(label, 1, (3 + i % 3, 5)).astype(np.float32)
        if stem in skip:
            continue
        if i % 3 == 0:  # the three layouts users have: CLAM .h5, CLAM .pt, FLamby .tif.npy
            write_bag(feats / f"{stem}.h5", x, coords=np.zeros((len(x), 2), np.int64))
        elif i % 3 == 1:
            torch.save(torch.from_numpy(x), feats / "pt_files" / f"{stem}.pt")
        else:
            np.save(feats / f"{name}.npy", x)
    (tmp_path / "metadata.csv").write_text("".join(lines))
    return feats


def test_flamby_split_by_corrected_hospital_and_test_names(tmp_path):
    write_case(tmp_path)
    fed = build_federation("camelyon16-bags", data_root=tmp_path, seed=0,
                           features_dir="features", metadata_csv="metadata.csv")
    radboud, utrecht = fed.clients
    assert (radboud.name, utrecht.name, fed.num_classes) == ("radboud", "utrecht", 2)
    # withdrawn normal_086 / test_049 and bag-less normal_002 are left out; tumor_096 is
    # Utrecht by hospital_corrected although hospital says 0
    assert radboud.info["label_hist_train"] == [1, 1]  # normal_001, tumor_001
    assert utrecht.info["label_hist_train"] == [1, 2]  # normal_101, tumor_096, tumor_071
    assert sorted(radboud.info["test_ids"]) == ["test_002", "test_003"]
    assert sorted(utrecht.info["test_ids"]) == ["test_001", "test_012"]
    assert fed.info["missing_slides"] == 1 and radboud.train.dim == 5
    x, y = utrecht.test[0]
    assert x.shape[1] == 5 and int(y) in (0, 1)


def test_bad_camelyon16_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="needs options features_dir"):
        build_federation("camelyon16-bags", data_root=None, seed=0)
    feats = write_case(tmp_path, skip=("test_002", "test_003"))
    with pytest.raises(ValueError, match="centre 'radboud' has no test bag"):
        build_federation("camelyon16-bags", data_root=None, seed=0, features_dir=str(feats),
                         metadata_csv=str(tmp_path / "metadata.csv"))
    (tmp_path / "bad.csv").write_text("slide,label\nnormal_001.tif,0\n")
    with pytest.raises(DataFormatError, match="bad.csv: expected FLamby's columns"):
        build_federation("camelyon16-bags", data_root=None, seed=0, features_dir=str(feats),
                         metadata_csv=str(tmp_path / "bad.csv"))
