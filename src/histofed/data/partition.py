"""Split sample indices into federated clients: IID, stratified, label/quantity skew, by source.

Every partitioner returns disjoint index arrays that together cover ``0..N-1`` exactly, is
reproducible from its ``seed`` and honours ``min_size`` (or raises a clear error).

These are hand-written on purpose: Flower's ``flwr-datasets`` partitioners work on Hugging Face
``datasets.Dataset`` objects (and pull that stack in), while ours split plain numpy label arrays.
The Dirichlet scheme follows Hsu et al. 2019 / Li et al. 2021 ("NIID-Bench"): for every class,
client shares are drawn from ``Dir(alpha)``; smaller ``alpha`` means stronger label skew.

Example:
    >>> p = DirichletPartitioner(labels=np.array([0, 0, 1, 1, 2, 2] * 10), alpha=0.5,
    ...                          num_partitions=3, seed=0, min_size=2)
    >>> sorted(np.concatenate([p.load_partition(i) for i in range(3)]).tolist()) == list(range(60))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histofed.registry import Registry

PARTITIONERS: Registry[type[Partitioner]] = Registry("partitioner")


class Partitioner:
    """Base class: subclasses implement ``_split(rng) -> list of index arrays``.

    Args:
        num_items: number of samples N to split.
        num_partitions: number of clients P (>= 1).
        seed: seed of the ``np.random.Generator`` used for the split.
        min_size: every partition gets at least this many samples.

    Raises:
        ValueError: when ``N < P * min_size`` (e.g. more clients than samples).
    """

    def __init__(self, *, num_items: int, num_partitions: int, seed: int = 0, min_size: int = 1):
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}")
        if num_items < num_partitions:
            raise ValueError(
                f"more clients than samples: cannot split {num_items} samples into "
                f"{num_partitions} partitions; use at most {num_items} clients"
            )
        if num_items < num_partitions * min_size:
            raise ValueError(
                f"cannot give each of {num_partitions} partitions at least {min_size} of "
                f"{num_items} samples; lower min_size or use fewer clients"
            )
        self.num_items = int(num_items)
        self.num_partitions = int(num_partitions)
        self.seed = int(seed)
        self.min_size = int(min_size)
        self._parts: list[np.ndarray] | None = None

    def _split(self, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError

    def partitions(self) -> list[np.ndarray]:
        """All partitions (computed once, then cached): a list of sorted int64 index arrays."""
        if self._parts is None:
            parts = self._split(np.random.default_rng(self.seed))
            self._parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
        return self._parts

    def load_partition(self, partition_id: int) -> np.ndarray:
        """Indices (sorted int64) of partition ``partition_id`` in ``0..num_partitions-1``."""
        if not 0 <= partition_id < self.num_partitions:
            raise IndexError(
                f"partition_id {partition_id} out of range 0..{self.num_partitions - 1}"
            )
        return self.partitions()[partition_id]

    def sizes(self) -> list[int]:
        return [len(p) for p in self.partitions()]


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    return arr


@PARTITIONERS.register("iid")
class IidPartitioner(Partitioner):
    """Shuffle, then cut into ``num_partitions`` parts whose sizes differ by at most one."""

    def _split(self, rng: np.random.Generator) -> list[np.ndarray]:
        return np.array_split(rng.permutation(self.num_items), self.num_partitions)


@PARTITIONERS.register("stratified")
class StratifiedPartitioner(Partitioner):
    """IID but stratified: every partition gets (nearly) the global class proportions.

    Per class, indices are shuffled and dealt round-robin; sizes differ by at most one.
    """

    def __init__(
        self,
        *,
        labels: Sequence[int] | np.ndarray,
        num_partitions: int,
        seed: int = 0,
        min_size: int = 1,
    ):
        self.labels = _as_labels(labels)
        super().__init__(
            num_items=len(self.labels), num_partitions=num_partitions, seed=seed, min_size=min_size
        )

    def _split(self, rng: np.random.Generator) -> list[np.ndarray]:
        order = np.concatenate(
            [rng.permutation(np.flatnonzero(self.labels == k)) for k in np.unique(self.labels)]
        )
        owner = rng.permutation(self.num_partitions)[np.arange(len(order)) % self.num_partitions]
        return [order[owner == c] for c in range(self.num_partitions)]


@PARTITIONERS.register("dirichlet")
class DirichletPartitioner(Partitioner):
    """Label skew: for each class, client shares ~ ``Dir(alpha)``.

    Common grid: alpha in {0.1, 0.3, 0.5, 1.0}; 0.1 is strongly skewed, 1.0 mildly, and
    alpha -> infinity approaches a stratified split. Draws are repeated until every partition
    has ``min_size`` samples, at most ``max_tries`` times.

    Raises:
        ValueError: alpha <= 0, or no valid draw in ``max_tries`` tries.
    """

    def __init__(
        self,
        *,
        labels: Sequence[int] | np.ndarray,
        alpha: float,
        num_partitions: int,
        seed: int = 0,
        min_size: int = 1,
        max_tries: int = 100,
    ):
        if not alpha > 0 or not np.isfinite(alpha):
            raise ValueError(
                "Dirichlet alpha must be a finite number > 0 (e.g. 0.1, 0.3, 0.5, 1.0), "
                f"got {alpha}"
            )
        self.labels = _as_labels(labels)
        self.alpha = float(alpha)
        self.max_tries = int(max_tries)
        super().__init__(
            num_items=len(self.labels), num_partitions=num_partitions, seed=seed, min_size=min_size
        )

    def _split(self, rng: np.random.Generator) -> list[np.ndarray]:
        classes = np.unique(self.labels)
        P = self.num_partitions
        for _ in range(self.max_tries):
            chunks: list[list[np.ndarray]] = [[] for _ in range(P)]
            for k in classes:
                idx = rng.permutation(np.flatnonzero(self.labels == k))
                share = rng.dirichlet(np.full(P, self.alpha))  # P, sums to 1
                cuts = np.floor(np.cumsum(share)[:-1] * len(idx) + 0.5).astype(int)
                for c, part in enumerate(np.split(idx, cuts)):
                    chunks[c].append(part)
            parts = [np.concatenate(ch) for ch in chunks]
            if min(len(p) for p in parts) >= self.min_size:
                return parts
        raise ValueError(
            f"Dirichlet(alpha={self.alpha}) gave a partition with fewer than {self.min_size} "
            f"samples in {self.max_tries} tries ({self.num_items} samples, {P} clients); "
            "raise alpha, lower min_size or use fewer clients"
        )


@PARTITIONERS.register("quantity")
class QuantityPartitioner(Partitioner):
    """Quantity skew: partition sizes ~ ``min_size + Multinomial(N - P*min_size, Dir(alpha))``.

    Labels are not looked at (shuffled uniformly); smaller ``alpha`` -> more unequal sizes.
    """

    def __init__(
        self,
        *,
        num_items: int,
        num_partitions: int,
        alpha: float = 1.0,
        seed: int = 0,
        min_size: int = 1,
    ):
        if not alpha > 0 or not np.isfinite(alpha):
            raise ValueError(f"quantity-skew alpha must be a finite number > 0, got {alpha}")
        self.alpha = float(alpha)
        super().__init__(
            num_items=num_items, num_partitions=num_partitions, seed=seed, min_size=min_size
        )

    def _split(self, rng: np.random.Generator) -> list[np.ndarray]:
        P = self.num_partitions
        share = rng.dirichlet(np.full(P, self.alpha))
        sizes = self.min_size + rng.multinomial(self.num_items - P * self.min_size, share)
        return np.split(rng.permutation(self.num_items), np.cumsum(sizes)[:-1])


@PARTITIONERS.register("by-source")
class BySourcePartitioner(Partitioner):
    """Natural split: one partition per distinct group (hospital, site, organ), sorted by name.

    Args:
        groups: N group names; ``partition_names[i]`` names partition i.
        num_partitions: optional; if given it must equal the number of distinct groups.
    """

    def __init__(
        self,
        *,
        groups: Sequence[str] | np.ndarray,
        num_partitions: int | None = None,
        seed: int = 0,
        min_size: int = 1,
    ):
        self.groups = np.asarray([str(g) for g in groups])
        self.partition_names = sorted(set(self.groups.tolist()))
        n_groups = len(self.partition_names)
        if num_partitions is not None and num_partitions != n_groups:
            raise ValueError(
                f"by-source split has {n_groups} groups {self.partition_names}, "
                f"but num_partitions={num_partitions}; drop num_partitions or fix the groups"
            )
        small = [g for g in self.partition_names if (self.groups == g).sum() < min_size]
        if small:
            raise ValueError(
                f"groups {small} have fewer than min_size={min_size} samples; "
                "merge them or lower min_size"
            )
        super().__init__(
            num_items=len(self.groups),
            num_partitions=max(n_groups, 1),
            seed=seed,
            min_size=min_size,
        )

    def _split(self, rng: np.random.Generator) -> list[np.ndarray]:
        return [np.flatnonzero(self.groups == g) for g in self.partition_names]


def partition_like(
    labels: np.ndarray, reference_counts: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split samples so each partition's class mix follows its row of ``reference_counts``.

    Used to give each client a test set drawn with its own training label distribution:
    class k's samples are shared among partitions in proportion to ``reference_counts[:, k]``.

    Args:
        labels: N int labels in ``0..K-1``.
        reference_counts: P x K counts (e.g. each client's training class histogram).
        rng: random generator for the within-class shuffle.

    Returns:
        P disjoint sorted int64 index arrays covering ``0..N-1``.
    """
    labels = _as_labels(labels)
    ref = np.asarray(reference_counts, dtype=np.float64)  # P x K
    P, K = ref.shape
    if labels.size and labels.max() >= K:
        raise ValueError(f"label {labels.max()} has no column in reference_counts ({K} classes)")
    chunks: list[list[np.ndarray]] = [[] for _ in range(P)]
    for k in range(K):
        idx = rng.permutation(np.flatnonzero(labels == k))
        w = ref[:, k] if ref[:, k].sum() > 0 else ref.sum(axis=1) + 1e-12  # unseen class
        cuts = np.floor(np.cumsum(w / w.sum())[:-1] * len(idx) + 0.5).astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            chunks[c].append(part)
    return [np.sort(np.concatenate(ch)).astype(np.int64) for ch in chunks]


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split into (train, test) index arrays, rounding ``test_fraction`` per class.

    A class with a single sample stays in train. Raises if ``test_fraction`` not in [0, 1).
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    labels = _as_labels(labels)
    train, test = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test = min(int(np.floor(test_fraction * len(idx) + 0.5)), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
