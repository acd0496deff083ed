"""Pure aggregation math on named arrays (no torch, no state). Tested on hand-computed arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def weighted_mean(updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Key-wise sum_k w_k x_k / sum_k w_k (FedAvg, McMahan et al. 2017, with w_k = n_k).

    Accumulates in float64 and returns the input dtype. All updates must share keys and shapes.

    Example:
        >>> weighted_mean([{"a": np.array([0.0])}, {"a": np.array([3.0])}], [2, 1])["a"]
        array([1.])
    """
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    keys = list(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if set(u) != set(keys):
            missing = set(keys) ^ set(u)
            raise KeyError(f"update {i} has different keys than update 0: {sorted(missing)[:3]}")
    out = {}
    for key in keys:
        acc = np.zeros(updates[0][key].shape, dtype=np.float64)
        for u, w in zip(updates, weights, strict=True):
            acc += (w / total) * u[key].astype(np.float64)
        out[key] = acc.astype(updates[0][key].dtype)
    return out


def difference(a: Arrays, b: Arrays) -> dict[str, np.ndarray]:
    """Key-wise a - b."""
    return {k: a[k] - b[k] for k in a}


def add(a: Arrays, b: Arrays, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Key-wise a + scale * b (keys of a; missing keys in b are left as in a)."""
    return {k: (a[k] + scale * b[k]).astype(a[k].dtype) if k in b else a[k] for k in a}


def global_l2_norm(arrays: Arrays) -> float:
    """sqrt(sum over all keys of ||x||^2), accumulated in float64."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values())))


def non_finite_keys(arrays: Arrays) -> list[str]:
    """Keys whose arrays hold NaN or inf (a client update that must not be aggregated)."""
    return [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
