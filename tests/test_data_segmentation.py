"""Segmentation datasets, the image split and the nucleus federations."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from histofed.data import build_federation
from histofed.data.datasets import SegmentationCrops, SegmentationTiles
from histofed.data.fed_nuclei import CLIENTS, split_images


def _pair(h: int = 40, w: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image whose red channel is 255 exactly on the mask (instance ids), else 0."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint16)
    mask[rng.random((h, w)) < 0.3] = 7  # instance id 7 -> foreground 1
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.where(mask > 0, 255, 0)
    image[..., 1] = np.arange(w, dtype=np.uint8)[None]  # position code
    return image, mask


def test_crops_contract_and_default_length() -> None:
    images, masks = zip(*(_pair(seed=s) for s in range(3)))
    ds = SegmentationCrops(list(images), list(masks), crop_size=32, seed=0)
    assert len(ds) == 3 * 8
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32)
    assert x.dtype == y.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    assert ds.masks[0].dtype == np.uint8 and set(np.unique(ds.masks[0])) == {0, 1}
    assert ds.images[0] is images[0]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_crops_without_augmentation_are_windows_of_the_image() -> None:
    image, mask = _pair()
    ds = SegmentationCrops([image], [mask], crop_size=16, length=20, augment=False, seed=3)
    for i in range(len(ds)):
        x, y = ds[i]
        (r, c) = ds._corner[i]
        assert torch.equal((x * 255).round().to(torch.uint8).permute(1, 2, 0),
                           torch.from_numpy(image[r : r + 16, c : c + 16]))
        assert torch.equal(y[0], torch.from_numpy((mask[r : r + 16, c : c + 16] > 0) * 1.0).float())


def test_augmentation_keeps_image_and_mask_aligned() -> None:
    image, mask = _pair()
    ds = SegmentationCrops([image], [mask], crop_size=24, length=40, seed=1,
                           hue=0.0, saturation=0.0, value=0.0)  # geometry only
    assert len(set(ds._rot.tolist())) > 1 and ds._flip.any()
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal((x[0] > 0.5).float(), y[0])


def test_colour_jitter_changes_colour_but_not_mask() -> None:
    image, mask = _pair()
    plain = SegmentationCrops([image], [mask], crop_size=24, length=10, seed=2,
                              hue=0.0, saturation=0.0, value=0.0)
    jit = SegmentationCrops([image], [mask], crop_size=24, length=10, seed=2)
    diffs = [float((plain[i][0] - jit[i][0]).abs().max()) for i in range(10)]
    assert max(diffs) > 0.01 and max(diffs) < 0.5
    assert all(torch.equal(plain[i][1], jit[i][1]) for i in range(10))


def test_reseed_reproduces_the_sequence_through_a_dataloader() -> None:
    images, masks = zip(*(_pair(seed=s) for s in range(2)))
    ds = SegmentationCrops(list(images), list(masks), crop_size=16, length=12)

    def one_pass(seed: int) -> list[torch.Tensor]:
        ds.reseed(seed)
        return [x for x, _ in DataLoader(ds, batch_size=4, num_workers=0)]

    a, b, c = one_pass(11), one_pass(11), one_pass(12)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_small_image_is_reflect_padded() -> None:
    image, mask = _pair(h=10, w=20)
    ds = SegmentationCrops([image], [mask], crop_size=32, length=4, augment=False)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32)
    assert torch.equal((x[0] > 0.5).float(), y[0])
    assert ds.images[0].shape == (10, 20, 3)  # public attribute stays unpadded


def test_tiles_and_input_validation() -> None:
    image, mask = _pair(h=30, w=20)
    ds = SegmentationTiles([image], [mask])
    x, y = ds[0]
    assert x.shape == (3, 30, 20) and y.shape == (1, 30, 20)
    assert torch.equal(y[0], torch.from_numpy(mask > 0).float())
    with pytest.raises(ValueError, match="1 images but 2 masks"):
        SegmentationTiles([image], [mask, mask])
    with pytest.raises(ValueError, match="mask is"):
        SegmentationCrops([image], [mask[:5]])


@pytest.mark.parametrize("n", [2, 3, 6, 15])
def test_split_is_a_partition_with_a_test_image(n: int) -> None:
    tr, va, te = split_images(n, client="c", seed=0, test_fraction=0.34)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(n))
    assert len(te) == max(1, round(0.34 * n)) and len(va) == 0
    if n == 2:
        assert len(tr) == 1 and len(te) == 1
    again = split_images(n, client="c", seed=0, test_fraction=0.34)
    assert all(np.array_equal(u, v) for u, v in zip((tr, va, te), again))


def test_split_depends_on_seed_and_rejects_too_few() -> None:
    splits = {tuple(split_images(15, client="c", seed=s, test_fraction=0.34)[2]) for s in range(5)}
    assert len(splits) > 1
    tr, va, te = split_images(10, client="c", seed=0, test_fraction=0.2, val_fraction=0.2)
    assert (len(tr), len(va), len(te)) == (6, 2, 2)
    with pytest.raises(ValueError, match="client 'tiny' has 2 image"):
        split_images(2, client="tiny", seed=0, test_fraction=0.34, val_fraction=0.1)


def test_synthetic_federation() -> None:
    t = time.perf_counter()
    fed = build_federation("synthetic-nuclei", data_root=None, seed=0)
    print(f"synthetic-nuclei built in {time.perf_counter() - t:.2f} s")
    assert fed.task == "segmentation" and fed.num_classes == 1
    assert fed.client_names == ["synthetic-0", "synthetic-1", "synthetic-2", "synthetic-3"]
    means = []
    for c in fed.clients:
        assert (c.info["n_train"], c.info["n_test"]) == (4, 2) and c.val is None
        assert c.num_train == len(c.train) == 32
        assert 0.05 < c.info["foreground_fraction"] < 0.3
        x, y = c.train[0]
        assert x.shape == (3, 128, 128) and y.shape == (1, 128, 128)
        x, y = c.test[0]
        assert x.shape == (3, 256, 256)
        means.append(np.mean([im.reshape(-1, 3).mean(0) for im in c.train.images], 0))
    gaps = [np.abs(means[0] - m).max() for m in means[1:]]
    assert min(gaps) > 5  # each client has its own stain (domain shift)
    same = build_federation("synthetic-nuclei", data_root=None, seed=0, num_clients=2)
    assert np.array_equal(same.clients[1].train.images[0], fed.clients[1].train.images[0])


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_client'\].*num_clients"):
        build_federation("synthetic-nuclei", data_root=None, seed=0, num_client=3)
    with pytest.raises(ValueError, match="test_fraction"):
        build_federation("synthetic-nuclei", data_root=None, seed=0, test_fraction=1.2)


def test_missing_nuclei_folder_explains_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data-root"):
        build_federation("nuclei-multisource", data_root=tmp_path, seed=0)


def test_real_federation_has_the_seven_clients(shared_data: Path) -> None:
    t = time.perf_counter()
    fed = build_federation("nuclei-multisource", data_root=shared_data, seed=0)
    print(f"nuclei-multisource built in {time.perf_counter() - t:.2f} s")
    assert fed.client_names == list(CLIENTS) == [
        "monuseg-breast", "monuseg-kidney", "monuseg-liver", "monuseg-prostate",
        "monuseg-other", "cpm15", "cryonuseg"]
    counts = {c.name: (c.info["n_train"], c.info["n_test"]) for c in fed.clients}
    assert counts == {**{n: (4, 2) for n in CLIENTS[:5]}, "cpm15": (10, 5), "cryonuseg": (1, 1)}
    other = fed.clients[4]
    assert other.info["organs"] == ["bladder", "colon", "stomach"]
    for c in fed.clients:
        assert not set(c.info["train_ids"]) & set(c.info["test_ids"])
        assert c.num_train == 8 * c.info["n_train"]
        assert {"source", "organs", "n_val", "foreground_fraction"} <= set(c.info)
    cryo = fed.clients[-1]
    assert "annotated_bbox_xyxy" in cryo.info["annotation"]
    # boxes from meta.csv: (1 201 311 500) -> 299 x 310; (0 75 507 512) -> 437 x 507
    shapes = sorted(im.shape[:2] for im in cryo.train.images + cryo.test.images)
    assert shapes == [(299, 310), (437, 507)]


def test_real_federation_options(shared_data: Path) -> None:
    fed = build_federation("nuclei-multisource", data_root=shared_data / "nuclei", seed=1,
                           sources=["cpm15", "monuseg-liver"], crop_size=64, crops_per_image=2)
    assert fed.client_names == ["monuseg-liver", "cpm15"]
    assert fed.clients[1].num_train == 20 and fed.clients[1].train[0][0].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="client 'cryonuseg' has 2 image"):
        build_federation("nuclei-multisource", data_root=shared_data, seed=0,
                         sources=["cryonuseg"], val_fraction=0.2)
    with pytest.raises(ValueError, match="unknown source 'kidney'"):
        build_federation("nuclei-multisource", data_root=shared_data, seed=0, sources=["kidney"])
