"""Classification and MIL federations: contracts, splits, options, and the real data sets."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from histofed.data.bags import write_bag
from histofed.data.federation import build_federation
from histofed.data.synthetic import synthetic_bags


def _all_labels(fed, split):
    return np.concatenate([getattr(c, split).labels for c in fed.clients])


def test_synthetic_patches_contract():
    # no timing assertion: a busy CI machine made it flaky (speed lives in benchmarks/)
    fed = build_federation("synthetic-patches", data_root=None, seed=0)
    assert fed.task == "classification" and fed.num_classes == 4 and len(fed.clients) == 3
    assert sum(c.num_train for c in fed.clients) == 3 * 96
    x, y = fed.clients[0].train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    for c in fed.clients:
        assert c.info["label_hist_train"] == np.bincount(c.train.labels, minlength=4).tolist()
        assert len(c.test) == 48


def test_synthetic_patches_test_follows_client_label_skew():
    fed = build_federation(
        "synthetic-patches",
        data_root=None,
        seed=1,
        alpha=0.1,
        patches_per_client=200,
        test_per_client=200,
    )
    for c in fed.clients:
        train = np.bincount(c.train.labels, minlength=4) / len(c.train)
        test = np.bincount(c.test.labels, minlength=4) / len(c.test)
        assert np.abs(train - test).max() < 0.12  # test drawn with the train class frequencies
        assert np.all(test[train == 0] == 0)


def test_synthetic_bags_contract_and_seed():
    fed = build_federation("synthetic-bags", data_root=None, seed=0)
    assert fed.task == "mil" and fed.num_classes == 2
    for c in fed.clients:  # 24 balanced bags, 25 % test, stratified
        assert np.bincount(c.train.labels).tolist() == [9, 9]
        assert np.bincount(c.test.labels).tolist() == [3, 3]
    x, y = fed.clients[1].test[0]
    assert x.ndim == 2 and x.shape[1] == 64 and x.dtype == torch.float32 and y.dtype == torch.int64
    again = build_federation("synthetic-bags", data_root=None, seed=0)
    other = build_federation("synthetic-bags", data_root=None, seed=1)
    assert torch.equal(again.clients[1].test[0][0], x)
    assert not torch.equal(other.clients[1].test[0][0][:3], x[:3])


def test_unknown_and_badly_typed_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpah'\]. Did you mean \"alpha\"\? Valid: num_clients=3"):
        build_federation("synthetic-patches", data_root=None, seed=0, alpah=0.1)
    with pytest.raises(ValueError, match="option num_clients='two' must be a int"):
        build_federation("synthetic-bags", data_root=None, seed=0, num_clients="two")
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        build_federation("synthetic-patches", data_root=None, seed=0, alpha="0")
    fed = build_federation("synthetic-bags", data_root=None, seed=0, num_clients="2")  # CLI string
    assert len(fed.clients) == 2


def _slides(tmp_path, sites=True):
    bags = synthetic_bags(np.random.default_rng(0), 12, dim=8)
    lines = ["slide_id,label,site" if sites else "slide_id,label"]
    for i, (f, xy, lab) in enumerate(bags):
        write_bag(tmp_path / "h5" / f"s{i:02d}.h5", f * 100 + 50, xy)
        lines.append(f"s{i:02d},{lab}" + (f",{'AB'[i % 2]}" if sites else ""))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")


def test_slides_bags_natural_split_by_site(tmp_path):
    _slides(tmp_path)
    fed = build_federation(
        "slides-bags",
        data_root=tmp_path,
        seed=0,
        bags_dir="h5",
        labels_csv="labels.csv",
        standardize=True,
    )
    assert fed.client_names == ["A", "B"]
    assert [len(c.train) + len(c.test) for c in fed.clients] == [6, 6]
    for c in fed.clients:  # standardised with this client's train bags only
        train = torch.cat(c.train.features)
        assert (
            train.mean(0).abs().max() < 1e-4
            and (train.std(0, unbiased=False) - 1).abs().max() < 1e-3
        )
        assert len(c.test) >= 1


def test_slides_bags_stratified_without_site(tmp_path):
    _slides(tmp_path, sites=False)
    fed = build_federation(
        "slides-bags",
        data_root=None,
        seed=0,
        bags_dir=str(tmp_path / "h5"),
        labels_csv=str(tmp_path / "labels.csv"),
        num_clients=3,
    )
    assert fed.client_names == ["client-0", "client-1", "client-2"]
    assert all(len(c.train) + len(c.test) == 4 for c in fed.clients)
    assert float(torch.cat(fed.clients[0].train.features).mean()) > 10  # not standardised


def test_slides_bags_errors(tmp_path):
    with pytest.raises(ValueError, match="needs options bags_dir=DIR and labels_csv=FILE"):
        build_federation("slides-bags", data_root=None, seed=0)
    _slides(tmp_path)
    (tmp_path / "h5" / "s03.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 5: bag 's03' has no file"):
        build_federation(
            "slides-bags", data_root=tmp_path, seed=0, bags_dir="h5", labels_csv="labels.csv"
        )


def test_ucsb_breast_bags(shared_data):
    fed = build_federation("ucsb-breast-bags", data_root=shared_data, seed=0)
    assert fed.task == "mil" and fed.num_classes == 2 and len(fed.clients) == 3
    sizes = [len(c.train) + len(c.test) for c in fed.clients]
    assert sum(sizes) == 58 and max(sizes) - min(sizes) <= 1
    assert np.bincount(np.r_[_all_labels(fed, "train"), _all_labels(fed, "test")]).tolist() == [
        32,
        26,
    ]
    for c in fed.clients:
        assert set(c.train.labels) == {0, 1} and set(c.test.labels) == {0, 1}
        train = torch.cat(c.train.features).double()  # sum(N_i) x 708
        assert train.mean(0).abs().max() < 1e-3  # fitted on train bags only ...
        test = torch.cat(c.test.features).double()
        assert test.mean(0).abs().max() > 0.05  # ... so test bags are not exactly centred
        assert float(test.abs().max()) < 1e3  # raw features reach ~1e4


def test_crchisto_dirichlet(shared_data):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        build_federation("crchisto-dirichlet", data_root=shared_data, seed=0, alpha=0)
    fed = build_federation("crchisto-dirichlet", data_root=shared_data, seed=0)
    assert fed.num_classes == 4 and len(fed.clients) == 5
    # upstream split kept (README crchisto table), patches partitioned without loss
    assert np.bincount(_all_labels(fed, "train")).tolist() == [5395, 3889, 4708, 1541]
    assert np.bincount(_all_labels(fed, "val")).tolist() == [834, 647, 491, 296]
    assert np.bincount(_all_labels(fed, "test")).tolist() == [1493, 1176, 1772, 202]
    train = np.stack([np.bincount(c.train.labels, minlength=4) for c in fed.clients])  # 5 x 4
    test = np.stack([np.bincount(c.test.labels, minlength=4) for c in fed.clients])
    train_dist = train / train.sum(1, keepdims=True)
    assert np.abs(train_dist - train_dist.mean(0)).max() > 0.3  # real label skew at alpha = 0.5
    # class k's test patches are shared like its training patches (up to rounding: 1 patch)
    expected = train / train.sum(0) * test.sum(0)
    assert np.abs(test - expected).max() <= 1.0
    x, y = fed.clients[0].test[0]
    assert (
        x.shape == (3, 32, 32)
        and y.dtype == torch.int64
        and min(c.num_train for c in fed.clients) >= 50
    )
