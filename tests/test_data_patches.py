"""Point annotations -> nucleus-centred patches, PatchDataset, and the real CRCHisto extract."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from histofed.data.formats import DataFormatError
from histofed.data.patches import (
    CRCHISTO_CLASSES,
    PatchDataset,
    extract_patches,
    patches_by_split,
    read_crchisto,
    read_points,
)


def _ramp(h: int = 6, w: int = 7) -> np.ndarray:
    """H x W x 3 uint8 whose pixel (r, c) holds 10*r + c in every channel."""
    v = (10 * np.arange(h)[:, None] + np.arange(w)[None, :]).astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=2)


def test_patch_inside_image_is_a_plain_crop():
    img = _ramp()
    patch = extract_patches(img, np.array([[3.0, 2.0]]), size=3)  # x = col 3, y = row 2
    assert patch.shape == (1, 3, 3, 3) and patch.dtype == np.uint8
    np.testing.assert_array_equal(patch[0], img[1:4, 2:5])


def test_even_size_centre_convention():
    # size 4: rows r-2 .. r+1, so (x=3, y=3) covers rows 1..4 and cols 1..4
    img = _ramp()
    np.testing.assert_array_equal(extract_patches(img, np.array([[3.0, 3.0]]), 4)[0], img[1:5, 1:5])


def test_reflect_padding_at_corner():
    img = _ramp()
    patch = extract_patches(img, np.array([[0.0, 0.0]]), size=3)[0, :, :, 0]
    # reflect (no edge repeat): row/col -1 -> 1, so rows (1, 0, 1) x cols (1, 0, 1)
    assert patch.tolist() == [[11, 10, 11], [1, 0, 1], [11, 10, 11]]


def test_rounding_and_clipping_of_centres():
    img = _ramp()
    pts = np.array([[2.4, 1.6], [-0.85, 5.7]])  # -> (col 2, row 2); (col 0 clipped, row 5 clipped)
    centres = extract_patches(img, pts, size=1)[:, 0, 0, 0]
    assert centres.tolist() == [22, 50]


def _write(path, text):
    path.write_text(text)
    return path


def test_read_points_one_based_and_labels(tmp_path):
    p = _write(
        tmp_path / "img1.csv", "x,y,label\n1,1,epithelial\n10.5,3,others\n2,7,inflammatory\n"
    )
    pts, labels = read_points(p)
    np.testing.assert_allclose(pts, [[0, 0], [9.5, 2], [1, 6]])
    assert labels.tolist() == [0, 3, 2] and labels.dtype == np.int64
    pts0, _ = read_points(p, one_based=False)
    np.testing.assert_allclose(pts0, [[1, 1], [10.5, 3], [2, 7]])


def test_read_points_missing_column_names_file_and_fix(tmp_path):
    p = _write(tmp_path / "bad.csv", "x,y,class\n1,1,epithelial\n")
    with pytest.raises(
        DataFormatError, match=r"bad\.csv.*\['label'\].*found \['x', 'y', 'class'\]"
    ):
        read_points(p)


def test_read_points_unknown_label(tmp_path):
    p = _write(tmp_path / "odd.csv", "x,y,label\n1,1,epithelial\n1,1,mitosis\n")
    with pytest.raises(DataFormatError, match=r"odd\.csv, line 3: unknown label 'mitosis'"):
        read_points(p)


def test_patch_dataset_contract_and_reproducible_augmentation():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    ds = PatchDataset(imgs, np.array([0, 1, 2, 3, 1]), augment=True, seed=4)
    x, y = ds[2]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and int(y) == 2
    assert ds.labels.dtype == np.int64 and len(ds) == 5
    # the augmented patch is one of the 8 flips/rotations of the original
    orig = torch.from_numpy(imgs[2]).permute(2, 0, 1).float() / 255
    variants = [torch.rot90(o, k, (1, 2)) for o in (orig, orig.flip(2)) for k in range(4)]
    assert any(torch.equal(x, v) for v in variants)
    torch.testing.assert_close(PatchDataset(imgs, ds.labels, augment=True, seed=4)[2][0], x)
    seen = {tuple(ds[2][0].flatten()[:16].tolist()) for s in range(20) if ds.reseed(s) is None}
    assert len(seen) > 1  # reseeding changes the augmentation
    plain = PatchDataset(imgs, ds.labels)
    torch.testing.assert_close(plain[2][0], orig)


def test_patch_dataset_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N x s x s x 3 uint8"):
        PatchDataset(np.zeros((2, 8, 8), np.uint8), np.zeros(2))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        PatchDataset(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3))


def test_crchisto_counts_match_readme_and_nuclei_are_dark(shared_data):
    images = read_crchisto(shared_data / "crchisto")
    assert len(images) == 100
    labels = np.concatenate([im.labels for im in images])
    # shared/data/README.md, crchisto table: all = 7722 / 5712 / 6971 / 2039
    assert np.bincount(labels).tolist() == [7722, 5712, 6971, 2039]
    splits = patches_by_split(images, size=32)  # ~0.25 s for all 22,444 patches (no timing
    # assertion here: a busy machine makes one flaky; speed belongs in benchmarks/)
    assert {k: len(v[1]) for k, v in splits.items()} == {
        "train": 15533,
        "validation": 2268,
        "test": 4643,
    }
    assert np.bincount(splits["train"][1]).tolist() == [5395, 3889, 4708, 1541]
    assert splits["train"][0].shape[1:] == (32, 32, 3)
    assert list(CRCHISTO_CLASSES) == ["epithelial", "fibroblast", "inflammatory", "others"]

    # the points sit on nuclei: a 5x5 centre is much darker than the tiles (measured 148 vs 203),
    # and a bit darker with the MATLAB 1-based shift than without (148.0 vs 150.5)
    def centre_mean(imgs):
        return np.concatenate([extract_patches(im.image, im.points, 5) for im in imgs]).mean()

    tile_mean = np.mean([im.image.mean() for im in images])
    dark = centre_mean(images)
    assert dark < tile_mean - 30
    for im in images:
        im.points += 1.0  # undo the 1-based shift
    assert dark < centre_mean(images)
