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


# ---- robust aggregation (Byzantine clients) ------------------------------------------------
# Each rule replaces the weighted mean of FedAvg-family methods: rule(updates, weights) ->
# arrays. All are translation-equivariant (rule(x + c) = rule(x) + c), so applied to uploaded
# weights that all started from the same theta_t they equal theta_t + rule(updates).


def _stacked(updates: Sequence[Arrays], key: str) -> np.ndarray:
    return np.stack([np.asarray(u[key], dtype=np.float64) for u in updates])  # K x *shape


def _check_keys(updates: Sequence[Arrays]) -> list[str]:
    if not updates:
        raise ValueError("robust aggregation needs at least one update")
    keys = list(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if set(u) != set(keys):
            raise KeyError(f"update {i} has different keys than update 0: "
                           f"{sorted(set(keys) ^ set(u))[:3]}")
    return keys


def coordinate_median(updates: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """Coordinate-wise median (Yin et al., ICML 2018), ignoring NaN: each coordinate is the
    median of the clients' finite values. Unweighted. Returns the input dtype.

    Hand-written (one ``np.nanmedian``) because Flower's ``aggregate_median`` / ``FedMedian``
    use ``np.median``, which returns NaN for a coordinate where any client sent NaN.

    Example:
        >>> coordinate_median([{"a": np.array([1.0, np.nan])}, {"a": np.array([5.0, 2.0])},
        ...                    {"a": np.array([3.0, 4.0])}])["a"]
        array([3., 3.])
    """
    keys = _check_keys(updates)
    out = {}
    for k in keys:
        x = _stacked(updates, k)  # K x *shape
        # np.nanmedian over few rows goes through masked arrays (~40x slower): only with NaN
        med = np.nanmedian(x, axis=0) if np.isnan(x).any() else np.median(x, axis=0)
        out[k] = np.asarray(med).astype(updates[0][k].dtype)
    return out


def trimmed_mean(updates: Sequence[Arrays], fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate drop the
    ``int(fraction * K)`` smallest and largest of the K values, average the rest. Unweighted.
    With ``int(fraction * K) = 0`` (few clients) it is the plain mean. Flower's ``trim_mean``
    does the maths (float64 here). Returns the input dtype.

    Example:
        >>> ups = [{"a": np.array([v])} for v in (0.0, 1.0, 2.0, 3.0, 100.0)]
        >>> trimmed_mean(ups, 0.2)["a"]  # drops 0 and 100
        array([2.])
    """
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    keys = _check_keys(updates)
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim fraction {fraction} must be in [0, 0.5)")
    return {k: np.asarray(trim_mean(_stacked(updates, k), fraction)).astype(updates[0][k].dtype)
            for k in keys}


def krum_select(updates: Sequence[Arrays], byzantine: int, keep: int) -> list[int]:
    """Indices chosen by (multi-)Krum (Blanchard et al., NeurIPS 2017): each update's score is
    the sum of squared L2 distances to its K - f - 2 nearest others; the ``keep`` lowest scores
    win (``keep = 1``: Krum). Flower's ``select_multikrum`` does the selection.

    Example:
        >>> ups = [{"a": np.array([v])} for v in (0.0, 0.1, 0.2, 0.3, 50.0)]
        >>> krum_select(ups, byzantine=1, keep=4)
        [0, 1, 2, 3]
    """
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    keys = sorted(_check_keys(updates))
    records = [RecordDict({"arrays": ArrayRecord([np.asarray(u[k], dtype=np.float64)
                                                  for k in keys])}) for u in updates]
    chosen = select_multikrum(records, num_malicious_nodes=byzantine,
                              num_nodes_to_select=max(1, min(keep, len(updates))))
    return sorted(i for i, r in enumerate(records) if any(r is c for c in chosen))


def robust_aggregate(updates: Sequence[Arrays], weights: Sequence[float], rule: str, *,
                     trim_fraction: float = 0.2, byzantine: int = 1) -> dict[str, np.ndarray]:
    """One of ``histofed.config.AGGREGATORS`` over the clients' arrays.

    "mean": :func:`weighted_mean` (FedAvg); "median" / "trimmed-mean": unweighted,
    coordinate-wise; "krum": the one update Krum selects; "multi-krum": the weighted mean of
    the K - f updates multi-Krum selects (all of them when nobody is an outlier: FedAvg).
    """
    if rule == "mean":
        return weighted_mean(updates, weights)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed-mean":
        return trimmed_mean(updates, trim_fraction)
    if rule in ("krum", "multi-krum"):
        keep = 1 if rule == "krum" else len(updates) - byzantine
        chosen = krum_select(updates, byzantine, keep)
        return weighted_mean([updates[i] for i in chosen], [weights[i] for i in chosen])
    raise ValueError(f"unknown aggregator {rule!r}; choose mean, median, trimmed-mean, krum or "
                     "multi-krum")


# ---- update validation ---------------------------------------------------------------------
def update_norm(upload: Arrays, received: Arrays | None = None) -> float:
    """L2 norm of what a client changed: ``upload - received`` over the keys both hold with the
    same shape (weight payloads), plus the norm of any other uploaded float array as it is
    (``received=None``: the norm of the whole payload: factors, synthetic data, updates).

    Example:
        >>> update_norm({"a": np.array([4.0, 6.0])}, {"a": np.array([1.0, 2.0])})
        5.0
    """
    received = received or {}
    total = 0.0
    for k, v in upload.items():
        if not np.issubdtype(v.dtype, np.floating):
            continue
        x = v.astype(np.float64)
        base = received.get(k)
        if base is not None and base.shape == v.shape:
            x = x - base.astype(np.float64)
        total += float(np.sum(np.square(x)))
    return float(np.sqrt(total))


def norm_outliers(norms: Mapping[int, float], limit: float, *,
                  min_clients: int = 3) -> tuple[float | None, list[int]]:
    """(median norm, clients whose norm > ``limit`` x median). No check (None, []) when
    ``limit`` is 0, fewer than ``min_clients`` norms (a median of one or two is no reference),
    or the median is 0.

    Example:
        >>> norm_outliers({0: 1.0, 1: 1.2, 2: 0.9, 3: 50.0}, 10.0)
        (1.1, [3])
    """
    if limit <= 0 or len(norms) < min_clients:
        return None, []
    median = float(np.median(list(norms.values())))
    if median <= 0:
        return None, []
    return median, sorted(c for c, n in norms.items() if n > limit * median)


def scalar_problems(scalars: Mapping[str, object]) -> list[str]:
    """Names of scalars (or list entries) that are NaN or infinite."""
    bad = []
    for k, v in scalars.items():
        values = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(x, float) and not np.isfinite(x) for x in values):
            bad.append(k)
    return bad


def structure_problems(arrays: Arrays,
                       expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> list[str]:
    """What differs from ``expected`` ({name: (shape, dtype)}): missing or unexpected keys,
    wrong shapes, wrong dtypes; one message each (empty: as expected).

    Example:
        >>> structure_problems({"a": np.zeros(2, np.float32), "b": np.zeros(1)},
        ...                    {"a": ((3,), np.dtype("float32"))})
        ["unexpected key 'b'", "'a' has shape (2,), expected (3,)"]
    """
    out = [f"missing key {k!r}" for k in expected if k not in arrays]
    out += [f"unexpected key {k!r}" for k in arrays if k not in expected]
    for k, v in arrays.items():
        if k not in expected:
            continue
        shape, dtype = expected[k]
        if tuple(v.shape) != tuple(shape):
            out.append(f"{k!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
        elif v.dtype != np.dtype(dtype):
            out.append(f"{k!r} has dtype {v.dtype}, expected {np.dtype(dtype)}")
    return out
