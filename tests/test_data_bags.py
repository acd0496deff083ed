"""HDF5 feature bags: read/write, key variants, labels CSV, standardisation, BagDataset."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from histofed.data.bags import (
    BagDataset,
    Standardizer,
    read_bag,
    read_bag_labels,
    write_bag,
)
from histofed.data.formats import DataFormatError


def test_write_read_round_trip(tmp_path):
    feats = np.arange(12, dtype=np.float64).reshape(4, 3)
    coords = np.array([[0, 0], [256, 0], [0, 256], [256, 256]])
    write_bag(tmp_path / "sub" / "s1.h5", feats, coords, attrs={"encoder": "toy", "mpp": 0.5})
    bag = read_bag(tmp_path / "sub" / "s1.h5")
    assert bag.features.dtype == np.float32 and bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    with h5py.File(tmp_path / "sub" / "s1.h5") as f:
        assert sorted(f.keys()) == ["coords", "features"]  # CLAM-style keys
        assert f.attrs["encoder"] == "toy" and f.attrs["mpp"] == 0.5
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["s1.h5"]  # no temp file left
    write_bag(tmp_path / "s2.h5", feats)
    assert read_bag(tmp_path / "s2.h5").coords is None


def test_reads_feats_key_variant(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f["feats"] = np.ones((2, 5), np.float32)
    assert read_bag(tmp_path / "old.h5").features.shape == (2, 5)


def test_bag_without_feature_key_names_file_found_and_expected_keys(tmp_path):
    with h5py.File(tmp_path / "meta_only.h5", "w") as f:
        f["metadata"] = np.array([b"0_0.jpg"])
        f["coords"] = np.zeros((1, 2), np.int64)
    with pytest.raises(
        DataFormatError,
        match=r"meta_only\.h5: no feature dataset; found keys "
        r"\['coords', 'metadata'\], expected one of \['features', 'feats'\]",
    ):
        read_bag(tmp_path / "meta_only.h5")


def test_bad_bag_files(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["features"] = np.ones((3, 4), np.float32)
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(DataFormatError, match=r"c\.h5: 'coords' must be 3 x 2"):
        read_bag(tmp_path / "c.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataFormatError, match=r"text\.h5: not a readable HDF5"):
        read_bag(tmp_path / "text.h5")
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_bag(tmp_path / "nope.h5")


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    write_bag(tmp_path / "s.h5", np.ones((2, 2)))
    with pytest.raises(TypeError):
        write_bag(tmp_path / "s.h5", np.zeros((5, 2)), attrs={"bad": object()})  # fails mid-write
    np.testing.assert_array_equal(read_bag(tmp_path / "s.h5").features, np.ones((2, 2)))
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
    with pytest.raises(ValueError, match="coords must be 2 x 2"):
        write_bag(tmp_path / "s.h5", np.ones((2, 2)), coords=np.zeros((3, 2)))


def _bags_dir(tmp_path, ids, header="slide_id,label", extra=None):
    for i in ids:
        write_bag(tmp_path / f"{i}.h5", np.ones((2, 3)))
    rows = [
        f"{i},{lab}" + (f",{extra[n]}" if extra else "") for n, (i, lab) in enumerate(ids.items())
    ]
    (tmp_path / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return tmp_path / "labels.csv"


def test_labels_csv_names_map_sorted_and_sites(tmp_path):
    csv = _bags_dir(
        tmp_path,
        {"a": "tumour", "b": "normal", "c": "tumour"},
        header="slide_id,label,site",
        extra=["H1", "H2", "H1"],
    )
    table = read_bag_labels(csv)
    assert table.class_names == ["normal", "tumour"]
    assert table.labels.tolist() == [1, 0, 1] and table.groups == ["H1", "H2", "H1"]
    assert [p.name for p in table.paths] == ["a.h5", "b.h5", "c.h5"]


def test_labels_csv_integer_labels_without_groups(tmp_path):
    table = read_bag_labels(_bags_dir(tmp_path, {"a": "1", "b": "0"}))
    assert table.labels.tolist() == [1, 0] and table.groups is None
    assert table.class_names == ["0", "1"]


def test_labels_csv_naming_a_missing_bag(tmp_path):
    csv = _bags_dir(tmp_path, {"a": "1", "b": "0"})
    (tmp_path / "b.h5").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"labels\.csv, line 3: bag 'b' has no file .*b\.h5"
    ):
        read_bag_labels(csv)


def test_labels_csv_missing_columns(tmp_path):
    (tmp_path / "l.csv").write_text("slide,label\na,1\n")
    with pytest.raises(DataFormatError, match=r"l\.csv: expected columns slide_id,label"):
        read_bag_labels(tmp_path / "l.csv")


def test_standardizer_hand_computed():
    # instances [1, 10], [3, 10] and [2, 10]: mean (2, 10); std (sqrt(2/3), 0 -> 1)
    std = Standardizer.fit([np.array([[1.0, 10], [3, 10]]), np.array([[2.0, 10]])])
    np.testing.assert_allclose(std.mean, [2, 10])
    np.testing.assert_allclose(std.std, [np.sqrt(2 / 3), 1.0], rtol=1e-6)
    np.testing.assert_allclose(std(np.array([[3.0, 12]])), [[1 / np.sqrt(2 / 3), 2]], rtol=1e-6)


def test_bag_dataset_contract():
    bags = [np.ones((3, 4)), np.zeros((5, 4))]
    ds = BagDataset(
        bags, [1, 0], Standardizer(np.full(4, 1.0, np.float32), np.full(4, 2.0, np.float32))
    )
    x, y = ds[1]
    assert x.shape == (5, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.all(x == -0.5) and int(y) == 0
    assert ds.labels.tolist() == [1, 0] and ds.dim == 4 and len(ds) == 2
    with pytest.raises(ValueError, match="different feature dimensions"):
        BagDataset([np.ones((2, 3)), np.ones((2, 4))], [0, 1])


def test_real_bags_both_key_layouts(shared_data):
    a = read_bag(shared_data / "bags" / "TCGA-3X-AAVA-01Z-00-DX1.h5")  # features + metadata
    assert a.features.shape == (180, 512) and a.coords is None
    b = read_bag(shared_data / "bags" / "TCGA-AD-6964-01Z-00-DX1.h5")  # feats + coords
    assert b.features.shape == (777, 512) and b.coords.shape == (777, 2)
    ucsb = shared_data / "bags" / "ucsb_breast"
    table = read_bag_labels(ucsb / "labels.csv")
    assert np.bincount(table.labels).tolist() == [32, 26]  # README: 32 benign, 26 malignant
    assert table.class_names == ["benign", "malignant"]
    assert read_bag(table.paths[0]).features.shape[1] == 708
