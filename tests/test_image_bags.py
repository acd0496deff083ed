"""Image-bag federations: patches seen through a fixed encoder phi and stain normaliser A."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histofed.data.federation import build_federation
from histofed.data.fed_image_bags import ImageBagDataset, monuseg_bags, to_float
from histofed.data.formats import DataFormatError
from histofed.data.synthetic import synthetic_image_bags
from histofed.models.encoders import RandomCNNEncoder
from histofed.stain import Macenko

import histofed.data.registry  # noqa: F401  (registers the federations)


def test_synthetic_image_bags_shapes_and_labels():
    bags = synthetic_image_bags(np.random.default_rng(0), 6, n_instances=(3, 5), size=16)
    assert sorted(y for _, y in bags) == [0, 0, 0, 1, 1, 1]
    assert all(b.dtype == np.uint8 and b.shape[1:] == (16, 16, 3) and 3 <= len(b) <= 5
               for b, _ in bags)


def test_image_bag_dataset_features_are_phi_of_a(one_thread):
    phi, stain = RandomCNNEncoder(width=4, depth=2, pool=1, seed=0), Macenko()
    bags = [b for b, _ in synthetic_image_bags(np.random.default_rng(1), 2, size=16)]
    data = ImageBagDataset(bags, np.array([0, 1]), phi, stain)
    x, y = data[1]
    assert x.shape == (len(bags[1]), 4) and int(y) == 1 and data.standardizer is None
    with torch.no_grad():
        torch.testing.assert_close(x, phi(stain(to_float(bags[1]))))
    assert data.patch_size == 16 and data.dim == 4
    with pytest.raises(ValueError, match="different shapes"):
        ImageBagDataset([bags[0], bags[1][:, :8, :8]], np.array([0, 1]), phi)


def test_synthetic_image_bags_federation(one_thread):
    fed = build_federation("synthetic-image-bags", data_root=None, seed=0,
                           encoder_width=4, encoder_depth=2, encoder_pool=1,
                           stain="none")
    assert fed.task == "mil" and fed.num_classes == 2 and len(fed.clients) == 2
    assert all(c.train.dim == 4 and len(c.test) >= 1 for c in fed.clients)
    with pytest.raises(ValueError, match="stain must be 'none' or 'macenko'"):
        build_federation("synthetic-image-bags", data_root=None, seed=0, stain="reinhard")


def test_monuseg_organ_bags_on_real_tiles(shared_data, one_thread):
    root = shared_data / "nuclei" / "monuseg"
    bags, labels, names = monuseg_bags(root, ["breast", "kidney"], 8, 32)  # 125 px -> 3 x 3
    assert names == ["breast", "kidney"] and np.bincount(labels).tolist() == [6, 6]
    assert all(b.shape == (9, 32, 32, 3) for b in bags)
    fed = build_federation("monuseg-organ-bags", data_root=shared_data, seed=0,
                           organs="breast,kidney", downsample=8, encoder_width=4,
                           encoder_depth=2)
    assert fed.num_classes == 2 and sum(len(c.train) + len(c.test) for c in fed.clients) == 12
    with pytest.raises(DataFormatError, match="no image of organ"):
        monuseg_bags(root, ["breast", "lung"], 8, 32)
