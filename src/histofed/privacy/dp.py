"""The Gaussian mechanism of DP-FedAvg (McMahan et al., ICLR 2018) as small functions.

Client-level DP-FedAvg, one round, clients sampled independently with probability q::

    Delta_k  <- Delta_k * min(1, C / ||Delta_k||_2)                  (clip each update)
    theta    <- theta + (sum_k Delta_k + N(0, sigma^2 C^2 I)) / (q N)  (noise, fixed denominator)

The sum has L2 sensitivity C when one client is added or removed, so the noise multiplier
``sigma`` is what the accountant needs. Noise is drawn from the generator passed in (seeded,
reproducible). A deployment that must resist an attacker who knows the seed should pass a
generator seeded from ``secrets`` instead; numpy's generators are not cryptographic.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

Arrays = Mapping[str, np.ndarray]


class PrivacyConfigError(ValueError):
    """A privacy parameter is out of range; the message names it and the fix."""


def check_mechanism(*, sigma: float | None = None, clip: float | None = None,
                    q: float | None = None, delta: float | None = None,
                    population: int | None = None, unit: str = "clients",
                    where: str = "[algorithm]") -> None:
    """Validate the parameters of a Gaussian mechanism before anything trains.

    Args:
        sigma: noise multiplier (std / C); 0 means no noise (no guarantee), < 0 is an error.
        clip: L2 clipping bound C, > 0.
        q: sampling rate in (0, 1].
        delta: target delta in (0, 1); must also be < 1 / population.
        population: number of protected units (clients or records).
        unit: what the units are, for the message.
        where: config location, for the message.

    Raises:
        PrivacyConfigError: the first parameter out of range, with the fix.
    """
    if sigma is not None and not sigma >= 0:
        raise PrivacyConfigError(f"{where}: sigma = {sigma}: the noise multiplier must be >= 0 "
                                 "(0 = clipping only, no privacy guarantee)")
    if clip is not None and not clip > 0:
        raise PrivacyConfigError(f"{where}: clip = {clip}: the clipping norm C must be > 0")
    if q is not None and not 0 < q <= 1:
        raise PrivacyConfigError(f"{where}: q = {q}: the sampling rate must be in (0, 1] "
                                 "(1 = every client every round)")
    if delta is not None and not 0 < delta < 1:
        raise PrivacyConfigError(f"{where}: delta = {delta}: delta must be in (0, 1), e.g. 1e-5")
    if delta is not None and population is not None and delta >= 1.0 / population:
        raise PrivacyConfigError(
            f"{where}: delta = {delta} is >= 1/{population} (number of {unit}): such a delta "
            f"allows publishing one of the {population} {unit}' data outright. Use "
            f"delta < {1.0 / population:.3g}, e.g. {_suggest_delta(population):g}")


def _suggest_delta(population: int) -> float:
    """A power of ten below 1 / population**1.1 (a common rule of thumb: delta << 1/n)."""
    return 10.0 ** np.floor(np.log10(1.0 / population ** 1.1))


def clip_arrays(arrays: Arrays, clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale named arrays jointly to global L2 norm <= ``clip``.

    Returns:
        (clipped arrays, in their input dtypes; the norm before clipping).

    Example:
        >>> out, norm = clip_arrays({"a": np.array([3.0]), "b": np.array([4.0])}, 1.0)
        >>> norm, out["a"], out["b"]
        (5.0, array([0.6]), array([0.8]))
    """
    from histofed.algorithms.aggregate import global_l2_norm  # lazy: algorithms imports privacy

    norm = global_l2_norm(arrays)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (v.astype(np.float64) * scale).astype(v.dtype) for k, v in arrays.items()}, norm


def add_gaussian_noise(arrays: Arrays, std: float,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``arrays + N(0, std^2 I)``, drawn in sorted key order (independent of dict order)."""
    out = {}
    for key in sorted(arrays):
        value = arrays[key]
        noise = rng.standard_normal(value.shape) * std if std > 0 else 0.0
        out[key] = (value.astype(np.float64) + noise).astype(value.dtype)
    return {k: out[k] for k in arrays}


def sum_arrays(updates: list[Arrays], like: Arrays) -> dict[str, np.ndarray]:
    """Key-wise sum of ``updates`` in float64 (zeros shaped like ``like`` when there are none)."""
    out = {k: np.zeros(v.shape, np.float64) for k, v in like.items()}
    for u in updates:
        for k in out:
            out[k] += u[k].astype(np.float64)
    return out


def clip_and_noise(tensors: list[torch.Tensor], *, clip: float | None, sigma: float,
                   generator: torch.Generator) -> list[torch.Tensor]:
    """Torch twin of clip + noise for a list of tensors (the gradient-inversion audit).

    ``clip=None`` skips clipping; then ``sigma`` is the absolute noise std.
    """
    out = [t.detach().double() for t in tensors]
    if clip is not None:
        norm = torch.sqrt(sum((t * t).sum() for t in out))
        scale = min(1.0, clip / float(norm)) if float(norm) > 0 else 1.0
        out = [t * scale for t in out]
    std = sigma * (clip if clip is not None else 1.0)
    if std > 0:
        out = [t + std * torch.randn(t.shape, generator=generator, dtype=torch.float64)
               for t in out]
    return [o.to(t.dtype) for o, t in zip(out, tensors, strict=True)]
