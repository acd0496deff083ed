"""Low-rank SVD compression of model updates (FedMIC's global parameter decomposition).

Pure numpy maths, no torch and no state; tested on hand-made matrices (tests/test_fedmic.py).

A weight update Delta W of a layer with shape (out, ...) is viewed as a matrix
M = Delta W.reshape(out, -1) (a conv kernel out x in x k x k becomes out x (in*k*k)) and factorised
in float64, M = U diag(s) V^T with s_1 >= s_2 >= ... >= 0. It is truncated to the smallest rank k
that keeps a fraction T of its energy (FedKD, Wu et al., Nat. Commun. 2022, eq. 6; FedMIC,
Ren et al., arXiv 2407.02261):

    k = min { k : sum_{i <= k} s_i^2 >= T * sum_i s_i^2 },   1 <= k <= min(out, n)

and sent as U[:, :k] (out x k), s[:k] (k) and V[:, :k] (n x k), float32. The receiver rebuilds
M_k = U_k diag(s_k) V_k^T (float64), whose squared Frobenius error is sum_{i > k} s_i^2
<= (1 - T) ||M||_F^2 (Eckart-Young). The threshold grows over the rounds,

    T(t) = T_min + (t + 1) / R * (T_max - T_min),   t = 0 .. R-1  (round t + 1 of R),

so early, large updates are compressed hard and late, fine ones less.

Our choices (not in either paper): 1-D tensors (biases, norm scales) and any matrix whose factors
would not be smaller than the matrix itself (e.g. a 4 x 128 linear head: 4 * (4 + 128 + 1) >
4 * 128) travel dense, because that is both exact and cheaper; k is at least 1 (an all-zero
update is sent as one zero singular triple, never as an empty array).

Payload layout of a compressed update (``compress``): ``u/<key>``, ``s/<key>``, ``v/<key>`` for a
factorised tensor, ``d/<key>`` for a dense one; ``shapes`` maps each key to its tensor shape
(needed to fold a matrix back into a conv kernel).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from histofed.config import ConfigError


def check_thresholds(t_min: float, t_max: float, where: str = "[algorithm] (fedmic)") -> None:
    """Both energy thresholds in (0, 1] and ``t_min <= t_max``.

    Raises:
        ConfigError: naming the key and the fix.
    """
    for key, value in (("t_min", t_min), ("t_max", t_max)):
        if not (isinstance(value, int | float) and 0 < value <= 1):
            raise ConfigError(f"{where}: {key} = {value!r} is an energy fraction and must be in "
                              "(0, 1] (e.g. t_min = 0.95, t_max = 0.98; 1 = no truncation)")
    if t_min > t_max:
        raise ConfigError(f"{where}: t_min = {t_min} > t_max = {t_max}; the kept energy grows "
                          "over the rounds from t_min to t_max, so set t_min <= t_max")


def energy_threshold(round_index: int, rounds: int, t_min: float, t_max: float) -> float:
    """T(t) = T_min + (t + 1) / R * (T_max - T_min) for 0-based round ``round_index`` = t of
    ``rounds`` = R (R <= 0, unknown: T_max). Clamped to [T_min, T_max].

    Example:
        >>> energy_threshold(0, 4, 0.9, 1.0), energy_threshold(3, 4, 0.9, 1.0)
        (0.925, 1.0)
    """
    if rounds <= 0:
        return float(t_max)
    value = t_min + (round_index + 1) / rounds * (t_max - t_min)
    return float(min(max(value, t_min), t_max))


def truncation_rank(s: np.ndarray, energy: float) -> int:
    """Smallest k >= 1 with sum_{i<=k} s_i^2 >= energy * sum_i s_i^2 (``s`` sorted descending).

    Example:
        >>> truncation_rank(np.array([3.0, 2.0, 1.0]), 0.9)  # 9/14 = .64, 13/14 = .93
        2
    """
    if s.size == 0:
        return 0
    cum = np.cumsum(np.square(s.astype(np.float64)))  # cum[-1] is the total, exactly
    total = cum[-1]
    if total == 0:
        return 1
    return int(min(np.searchsorted(cum, energy * total, side="left") + 1, s.size))


def as_matrix(array: np.ndarray) -> np.ndarray:
    """out x (everything else): the matrix view of a >= 2-D weight tensor."""
    return array.reshape(array.shape[0], -1)


@dataclass
class Factors:
    """A rank-k factorisation of one tensor: u (m x k), s (k), v (n x k), float32."""

    u: np.ndarray
    s: np.ndarray
    v: np.ndarray
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return int(self.s.size)

    def nbytes(self) -> int:
        return int(self.u.nbytes + self.s.nbytes + self.v.nbytes)

    def matrix(self) -> np.ndarray:
        """U diag(s) V^T in float64 (m x n)."""
        u, s, v = (x.astype(np.float64) for x in (self.u, self.s, self.v))
        return (u * s[None, :]) @ v.T  # m x k . k x n

    def tensor(self, dtype=np.float32) -> np.ndarray:
        return self.matrix().reshape(self.shape).astype(dtype)


def decompose(array: np.ndarray, energy: float) -> Factors:
    """Truncated SVD of ``array`` (>= 2-D) keeping ``energy`` of its squared singular values."""
    if array.ndim < 2:
        raise ValueError(f"decompose needs a >= 2-D tensor, got shape {array.shape}")
    m = as_matrix(array.astype(np.float64))  # out x n
    u, s, vt = np.linalg.svd(m, full_matrices=False)  # m x r, r, r x n
    k = truncation_rank(s, energy)
    return Factors(u[:, :k].astype(np.float32), s[:k].astype(np.float32),
                   vt[:k].T.astype(np.float32), tuple(array.shape))


def factorised_is_smaller(shape: tuple[int, ...], rank: int) -> bool:
    """k (m + n + 1) < m n: the factors are smaller than the dense matrix."""
    m = shape[0]
    n = int(np.prod(shape[1:]))
    return rank * (m + n + 1) < m * n


def compress(update: Mapping[str, np.ndarray], energy: float
             ) -> tuple[dict[str, np.ndarray], dict[str, list[int]], dict[str, int]]:
    """Compress a named update: (payload arrays, shapes, rank per key; 0 = sent dense).

    Float tensors with >= 2 dims are factorised at ``energy``; others, and tensors whose factors
    would not be smaller, go dense under ``d/<key>`` (same dtype as given).
    """
    arrays: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    ranks: dict[str, int] = {}
    for key, value in update.items():
        shapes[key] = list(value.shape)
        if value.ndim >= 2 and np.issubdtype(value.dtype, np.floating):
            f = decompose(value, energy)
            if factorised_is_smaller(value.shape, f.rank):
                arrays[f"u/{key}"], arrays[f"s/{key}"], arrays[f"v/{key}"] = f.u, f.s, f.v
                ranks[key] = f.rank
                continue
        arrays[f"d/{key}"] = np.ascontiguousarray(value)
        ranks[key] = 0
    return arrays, shapes, ranks


def decompress(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, list[int]],
               dtype=np.float32) -> dict[str, np.ndarray]:
    """Inverse of :func:`compress`: the (rank-truncated) update as named tensors of ``dtype``.

    Raises:
        ValueError: a key without its shape, or factors without their partners.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        part, _, key = name.partition("/")
        if part == "d":
            out[key] = np.asarray(value)
        elif part == "u":
            try:
                f = Factors(value, arrays[f"s/{key}"], arrays[f"v/{key}"], tuple(shapes[key]))
            except KeyError as err:
                raise ValueError(f"compressed update: {key!r} lacks {err} (need u/, s/, v/ and "
                                 "its shape)") from None
            out[key] = f.tensor(dtype)
        elif part not in ("s", "v"):
            raise ValueError(f"compressed update: unexpected array {name!r} (expected u/, s/, "
                             "v/ or d/ keys)")
    return out


def compressed_nbytes(shapes: Mapping[str, list[int]], ranks: Mapping[str, int],
                      itemsize: int = 4) -> int:
    """Bytes of a compressed update from its shapes and ranks alone: k (m + n + 1) numbers for
    a tensor factorised at rank k (m = out, n = the rest), all of its numbers for a dense one."""
    total = 0
    for key, shape in shapes.items():
        m, n = (shape[0], int(np.prod(shape[1:]))) if len(shape) >= 2 else (int(np.prod(shape)), 1)
        k = ranks[key]
        total += itemsize * (k * (m + n + 1) if k else m * n)
    return total


def shapes_to_scalar(shapes: Mapping[str, list[int]]) -> str:
    """Shapes as a compact JSON string (a Payload scalar)."""
    return json.dumps(dict(shapes), separators=(",", ":"), sort_keys=True)


def shapes_from_scalar(text: str) -> dict[str, list[int]]:
    return {k: list(v) for k, v in json.loads(text).items()}


def add_update(weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
    """weights + update key-wise, in float64, cast back to each weight's dtype (keys of
    ``weights``; keys missing in ``update`` are unchanged). The server and every client call this
    same function on the same float32 arrays, so they hold bit-identical global weights."""
    return {k: (w.astype(np.float64) + update[k].astype(np.float64)).astype(w.dtype)
            if k in update else w for k, w in weights.items()}
