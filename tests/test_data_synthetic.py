"""Synthetic H&E-like data: exact masks, reproducibility, learnable classes, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from skimage.measure import label, regionprops

from histofed.data.formats import read_source
from histofed.data.synthetic import (
    NUCLEUS_CLASSES,
    Stain,
    dense_n_nuclei,
    random_stain,
    synthetic_bags,
    synthetic_patches,
    synthetic_tile,
    write_synthetic_source,
)


def test_tile_shapes_and_exact_masks() -> None:
    image, inst, cls = synthetic_tile(np.random.default_rng(0), size=128, n_nuclei=(10, 20))
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert inst.shape == cls.shape == (128, 128)
    assert inst.dtype == np.uint16 and cls.dtype == np.uint8
    n = int(inst.max())
    assert 1 <= n <= 20
    assert set(np.unique(inst)) == set(range(n + 1))  # ids 1..N consecutive, none hidden
    assert np.array_equal(inst > 0, cls > 0)
    assert set(np.unique(cls)) <= {0, *NUCLEUS_CLASSES}
    for k in range(1, n + 1):  # one class per nucleus
        assert len(np.unique(cls[inst == k])) == 1
    # hematoxylin nuclei are darker than the eosin background
    gray = image.astype(float).mean(-1)
    assert gray[inst > 0].mean() < gray[inst == 0].mean() - 40


def test_tile_reproducible_and_stain_only_changes_colour() -> None:
    a = synthetic_tile(np.random.default_rng(3), size=96)
    b = synthetic_tile(np.random.default_rng(3), size=96)
    c = synthetic_tile(np.random.default_rng(4), size=96)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    stained = synthetic_tile(np.random.default_rng(3), size=96, stain=random_stain(
        np.random.default_rng(1)))
    assert np.array_equal(stained[1], a[1]) and np.array_equal(stained[2], a[2])
    assert np.abs(stained[0].astype(int) - a[0].astype(int)).mean() > 3


def test_stain_default_colours_are_pink_background_purple_nuclei() -> None:
    image, inst, _ = synthetic_tile(np.random.default_rng(0), size=128, stain=Stain())
    bg = image[inst == 0].astype(float).mean(0)
    nuc = image[inst > 0].astype(float).mean(0)
    assert bg[1] < bg[0] and bg[1] < bg[2]  # pink/magenta: green absorbed by eosin
    assert nuc[2] > nuc[0] > nuc[1] - 10 and nuc.mean() < bg.mean()  # blue-purple, dark


def test_tile_is_fast() -> None:
    rng = np.random.default_rng(0)
    synthetic_tile(rng)
    t = time.perf_counter()
    for _ in range(10):
        synthetic_tile(rng)
    ms = (time.perf_counter() - t) / 10 * 1e3
    print(f"synthetic_tile 256x256: {ms:.1f} ms")
    assert ms < 200  # typically ~7 ms; generous bound for a loaded CI machine


def _patch_features(images: np.ndarray) -> np.ndarray:
    """[area, eccentricity, mean gray] of the dark blob covering most of the centre."""
    out = []
    for im in images:
        gray = im.astype(float).mean(-1)
        lab = label(gray < 160)
        ids, cnt = np.unique(lab[11:21, 11:21], return_counts=True)
        cnt[ids == 0] = 0
        blob = lab == ids[np.argmax(cnt)]
        r = regionprops(blob.astype(int))[0]
        out.append([r.area, r.eccentricity, gray[blob].mean()])
    return np.array(out)


def test_patches_classes_are_learnable() -> None:
    xtr, ytr = synthetic_patches(np.random.default_rng(1), 200, num_classes=4)
    xte, yte = synthetic_patches(np.random.default_rng(2), 100, num_classes=4)
    assert xtr.shape == (200, 32, 32, 3) and xtr.dtype == np.uint8
    assert ytr.dtype == np.int64 and set(np.unique(ytr)) == {0, 1, 2, 3}
    ftr, fte = _patch_features(xtr), _patch_features(xte)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-9
    centroids = np.stack([((ftr[ytr == k] - mu) / sd).mean(0) for k in range(4)])
    pred = np.argmin(((((fte - mu) / sd)[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == yte).mean() >= 0.9  # nearest centroid on 3 hand features


def test_patches_class_probs_and_errors() -> None:
    _, y = synthetic_patches(np.random.default_rng(0), 50, num_classes=3, class_probs=[0, 1, 0])
    assert (y == 1).all()
    x, _ = synthetic_patches(np.random.default_rng(0), 2, size=48)
    assert x.shape == (2, 48, 48, 3)
    with pytest.raises(ValueError, match="class_probs"):
        synthetic_patches(np.random.default_rng(0), 5, num_classes=3, class_probs=[1, 0])
    with pytest.raises(ValueError, match="num_classes"):
        synthetic_patches(np.random.default_rng(0), 5, num_classes=1)


def test_bags_shapes_labels_and_mil_signal() -> None:
    bags = synthetic_bags(np.random.default_rng(0), 40, dim=16, n_instances=(10, 30))
    assert len(bags) == 40 and sum(lbl for *_, lbl in bags) == 20
    for feats, coords, lbl in bags:
        assert feats.dtype == np.float32 and feats.shape[1] == 16 and 10 <= len(feats) <= 30
        assert coords.dtype == np.int64 and coords.shape == (len(feats), 2)
        assert len(np.unique(coords, axis=0)) == len(coords) and (coords % 256 == 0).all()
        assert lbl in (0, 1)
    # max over instances of the witness direction separates the bags (MIL signal)
    score = np.array([feats[:, :8].mean(1).max() for feats, _, _ in bags])
    labels = np.array([lbl for *_, lbl in bags])
    assert score[labels == 1].min() > np.median(score[labels == 0])
    assert (score[labels == 1].mean() - score[labels == 0].mean()) > 0.8
    # a second call (e.g. test set) shares the concept: same witness mean
    other = synthetic_bags(np.random.default_rng(9), 10, dim=16, pos_fraction=1.0)
    assert all(lbl == 1 for *_, lbl in other)


def test_bags_reject_bad_args() -> None:
    with pytest.raises(ValueError, match="pos_fraction"):
        synthetic_bags(np.random.default_rng(0), 4, pos_fraction=1.5)
    with pytest.raises(ValueError, match="n_instances"):
        synthetic_bags(np.random.default_rng(0), 4, n_instances=(0, 3))


def test_write_source_roundtrip(tmp_path) -> None:
    src_dir = write_synthetic_source(tmp_path, "labA", 3, 64, np.random.default_rng(5))
    assert sorted(p.name for p in (src_dir / "images").iterdir()) == [
        "labA_000.png", "labA_001.png", "labA_002.png"]
    assert not list(src_dir.rglob("*.tmp*"))
    src = read_source(src_dir)
    rng = np.random.default_rng(5)
    for i in range(3):
        image, inst, _ = synthetic_tile(rng, size=64, n_nuclei=dense_n_nuclei(64))
        assert np.array_equal(src.images[i], image)
        assert np.array_equal(src.masks[i], inst) and src.masks[i].dtype == np.uint16
        assert int(src.meta[i]["n_instances"]) == inst.max()
