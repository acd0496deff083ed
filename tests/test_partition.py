"""Partitioners: exact coverage, no overlap, seeds, min_size, measured skew, hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from histofed.data.partition import (
    PARTITIONERS,
    BySourcePartitioner,
    DirichletPartitioner,
    IidPartitioner,
    QuantityPartitioner,
    StratifiedPartitioner,
    partition_like,
    stratified_split,
)

LABELS = np.repeat([0, 1, 2, 3], [120, 60, 15, 5])  # 200 samples, imbalanced


def _make(kind: str, seed: int = 0):
    if kind == "iid":
        return IidPartitioner(num_items=len(LABELS), num_partitions=4, seed=seed)
    if kind == "stratified":
        return StratifiedPartitioner(labels=LABELS, num_partitions=4, seed=seed)
    if kind == "dirichlet":
        return DirichletPartitioner(
            labels=LABELS, alpha=0.3, num_partitions=4, seed=seed, min_size=5
        )
    if kind == "quantity":
        return QuantityPartitioner(
            num_items=len(LABELS), num_partitions=4, alpha=0.5, seed=seed, min_size=5
        )
    groups = np.array(["a", "b", "c", "d"])[LABELS]
    return BySourcePartitioner(groups=groups, seed=seed)


KINDS = ["iid", "stratified", "dirichlet", "quantity", "by-source"]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_cover_without_overlap(kind):
    p = _make(kind)
    parts = [p.load_partition(i) for i in range(p.num_partitions)]
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)  # no index twice
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(LABELS)))  # every index once
    assert all(part.dtype == np.int64 for part in parts)
    assert all(len(part) >= p.min_size for part in parts)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_partitions(kind):
    a, b = _make(kind, seed=3), _make(kind, seed=3)
    for x, y in zip(a.partitions(), b.partitions(), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["iid", "stratified", "dirichlet", "quantity"])
def test_other_seed_other_partitions(kind):
    a, b = _make(kind, seed=0), _make(kind, seed=1)
    assert any(
        not np.array_equal(x, y) for x, y in zip(a.partitions(), b.partitions(), strict=True)
    )


def test_registry_names_every_partitioner():
    assert PARTITIONERS.names() == ["by-source", "dirichlet", "iid", "quantity", "stratified"]
    assert PARTITIONERS.get("dirichlet") is DirichletPartitioner


def _skew(alpha: float, seeds=range(5)) -> float:
    """Mean total-variation distance between client and global label distributions."""
    labels = np.repeat(np.arange(4), 500)
    tv = []
    for seed in seeds:
        p = DirichletPartitioner(
            labels=labels, alpha=alpha, num_partitions=5, seed=seed, min_size=1
        )
        for part in p.partitions():
            dist = np.bincount(labels[part], minlength=4) / len(part)
            tv.append(0.5 * np.abs(dist - 0.25).sum())
    return float(np.mean(tv))


def test_smaller_alpha_more_label_skew():
    s01, s1, s100 = _skew(0.1), _skew(1.0), _skew(100.0)
    assert s01 > s1 > s100
    assert s01 > 0.4 and s100 < 0.05  # strongly skewed vs. nearly stratified


def test_dirichlet_min_size_honoured_by_resampling():
    first = DirichletPartitioner(labels=LABELS, alpha=0.3, num_partitions=5, seed=0, min_size=1)
    assert min(first.sizes()) < 20  # the first draw is too small for min_size=20 ...
    p = DirichletPartitioner(labels=LABELS, alpha=0.3, num_partitions=5, seed=0, min_size=20)
    assert min(p.sizes()) >= 20 and sum(p.sizes()) == len(LABELS)  # ... so it was redrawn


def test_dirichlet_gives_up_with_clear_error():
    p = DirichletPartitioner(
        labels=np.zeros(20, int), alpha=0.01, num_partitions=2, seed=0, min_size=10, max_tries=5
    )
    with pytest.raises(ValueError, match="in 5 tries.*raise alpha"):
        p.partitions()


@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan")])
def test_dirichlet_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        DirichletPartitioner(labels=LABELS, alpha=alpha, num_partitions=2)


def test_more_clients_than_samples_is_an_error():
    with pytest.raises(ValueError, match="more clients than samples.*3 samples into 5"):
        IidPartitioner(num_items=3, num_partitions=5)
    with pytest.raises(ValueError, match="more clients than samples"):
        DirichletPartitioner(labels=[0, 1, 1], alpha=1.0, num_partitions=4)
    with pytest.raises(ValueError, match="at least 2 of 5 samples"):
        StratifiedPartitioner(labels=[0, 1, 0, 1, 0], num_partitions=3, min_size=2)


def test_out_of_range_partition_id():
    with pytest.raises(IndexError, match="out of range 0..3"):
        _make("iid").load_partition(4)


# ---- hand-checked tiny cases ----


def test_iid_sizes_differ_by_at_most_one():
    p = IidPartitioner(num_items=5, num_partitions=2, seed=0)
    assert p.sizes() == [3, 2]  # np.array_split: first part takes the remainder


def test_stratified_tiny_case():
    # per class shuffled then dealt round-robin: 4 zeros + 2 ones over 2 clients
    p = StratifiedPartitioner(labels=[0, 0, 0, 0, 1, 1], num_partitions=2, seed=7)
    labels = np.array([0, 0, 0, 0, 1, 1])
    for part in p.partitions():
        assert np.bincount(labels[part], minlength=2).tolist() == [2, 1]


def test_by_source_tiny_case():
    p = BySourcePartitioner(groups=["b", "a", "b", "c"])
    assert p.partition_names == ["a", "b", "c"]
    assert [x.tolist() for x in p.partitions()] == [[1], [0, 2], [3]]


def test_by_source_errors():
    with pytest.raises(ValueError, match="3 groups.*num_partitions=2"):
        BySourcePartitioner(groups=["a", "b", "c"], num_partitions=2)
    with pytest.raises(ValueError, match=r"groups \['c'\] have fewer than min_size=2"):
        BySourcePartitioner(groups=["a", "a", "b", "b", "c"], min_size=2)


def test_dirichlet_huge_alpha_is_even():
    # Dir(1e6, 1e6) ~ (0.5, 0.5): 100 samples of one class -> 50 / 50
    p = DirichletPartitioner(labels=np.zeros(100, int), alpha=1e6, num_partitions=2, seed=0)
    assert p.sizes() == [50, 50]


def test_quantity_min_size_then_remainder():
    # 10 items, 3 clients, min 3 each: the single remaining item goes to one client
    p = QuantityPartitioner(num_items=10, num_partitions=3, alpha=0.5, seed=0, min_size=3)
    assert sorted(p.sizes()) == [3, 3, 4]


def test_quantity_smaller_alpha_more_unequal_sizes():
    def spread(alpha):
        return np.mean(
            [
                np.std(
                    QuantityPartitioner(
                        num_items=1000, num_partitions=5, alpha=alpha, seed=s
                    ).sizes()
                )
                for s in range(10)
            ]
        )

    assert spread(0.2) > spread(5.0) > spread(1000.0)


def test_partition_like_follows_reference_counts():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    parts = partition_like(labels, np.array([[3, 1], [1, 3]]), np.random.default_rng(0))
    assert [np.bincount(labels[p], minlength=2).tolist() for p in parts] == [[3, 1], [1, 3]]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(8))


def test_stratified_split_rounds_per_class():
    labels = np.array([0] * 10 + [1] * 5 + [2])
    train, test = stratified_split(labels, 0.2, np.random.default_rng(0))
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]  # lone class 2 -> train
    np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(16))
