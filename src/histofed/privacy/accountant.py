"""Privacy accounting with Opacus' accountants, and a history that survives checkpoints.

A :class:`Ledger` is the list of Gaussian-mechanism releases so far, as Opacus keeps it:
``(noise multiplier sigma, sampling rate q, number of steps)`` with equal consecutive entries
merged. It converts to flat JSON scalars (``dp_sigma``, ``dp_rate``, ``dp_steps``) so it lives
in a :class:`~histofed.algorithms.base.Payload` (server state, or a client's private state) and
is checkpointed with it: epsilon never restarts from zero on resume.

``epsilon(history, delta, accountant)`` asks Opacus (``"rdp"``: Renyi DP, Mironov 2017, an upper
bound; ``"prv"``: privacy random variables, Gopi et al. 2021, numerically tight).
:func:`gaussian_epsilon` is the exact closed form for q = 1 (no subsampling): T Gaussian
releases with multiplier sigma equal one with mu = sqrt(T) / sigma (Gaussian DP, Dong et al.
2019), and mu-GDP holds at (epsilon, delta) iff
``delta = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2)`` (Balle & Wang 2018).

Example:
    >>> led = Ledger()
    >>> led.step(sigma=1.0, q=1.0, steps=150)
    >>> round(led.epsilon(1e-5, "rdp"), 1)
    131.7
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ACCOUNTANTS = ("rdp", "prv")
History = list[tuple[float, float, int]]


def check_accountant(name: str, where: str = "[algorithm].accountant") -> str:
    if name not in ACCOUNTANTS:
        from histofed.privacy.dp import PrivacyConfigError

        raise PrivacyConfigError(f'{where} = {name!r}: choose "rdp" or "prv"')
    return name


# PRV discretises the privacy loss on a grid; tiny sigma (or large q with small sigma) asks
# for 1e16 points (petabytes). Above this many points PRV falls back to RDP with a warning.
PRV_MAX_POINTS = 2**24  # ~134 MB per float64 array


class PRVFallbackWarning(UserWarning):
    """PRV could not be computed within memory; the epsilon given is RDP's upper bound."""


def prv_grid_points(history: History, delta: float, eps_error: float = 0.01) -> int:
    """Grid points Opacus' PRV accountant would allocate for ``history`` (its own domain rule)."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        domain = PRVAccountant()._get_domain(prvs, [n for _, _, n in history], eps_error,
                                             delta / 1000)  # get_epsilon's delta_error
    return int(domain.size)


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by ``history`` at ``delta`` (0 for an empty history, inf if any sigma is 0).

    Releases with infinite noise (sigma = inf) cost nothing. PRV falls back to RDP (an upper
    bound as well) with a :class:`PRVFallbackWarning` when its grid would exceed
    :data:`PRV_MAX_POINTS` or Opacus cannot compute it.
    """
    check_accountant(accountant)
    history = [(float(s), float(q), int(n)) for s, q, n in history
               if int(n) > 0 and not np.isposinf(float(s))]
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return float("inf")
    if accountant == "prv":
        points = prv_grid_points(history, delta)
        if points > PRV_MAX_POINTS:
            warnings.warn(PRVFallbackWarning(
                f"PRV accountant would need {points:.3g} grid points (~{points * 8 / 1e9:.3g} GB "
                f"per array) for sigma/q/steps {history}; reporting the RDP bound instead"),
                stacklevel=2)
            accountant = "rdp"
    try:
        return _opacus_epsilon(history, delta, accountant)
    except RuntimeError as err:  # PRV: "Cannot compute epsilon" at extreme settings
        if accountant != "prv":
            raise
        warnings.warn(PRVFallbackWarning(f"PRV accountant failed ({err}) for sigma/q/steps "
                                         f"{history}; reporting the RDP bound instead"),
                      stacklevel=2)
        return _opacus_epsilon(history, delta, "rdp")


def _opacus_epsilon(history: History, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    # PRV's q = 1 path takes log(0) on purpose (masked afterwards), and RDP warns when its best
    # order is the smallest one it tries (huge epsilons: still a valid, if loose, upper bound).
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", "Optimal order is the smallest alpha")
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)  # a binary search over epsilons: seconds when q < 1
def noise_for_epsilon(*, target_epsilon: float, delta: float, q: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The smallest sigma (to Opacus' 0.01 epsilon tolerance) giving ``target_epsilon`` after
    ``steps`` releases at sampling rate ``q`` (Opacus ``get_noise_multiplier``).

    Raises:
        PrivacyConfigError: target_epsilon <= 0, steps < 1, or a budget no sigma reaches.
    """
    from histofed.privacy.dp import PrivacyConfigError

    check_accountant(accountant)
    if not target_epsilon > 0:
        raise PrivacyConfigError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise PrivacyConfigError(f"the number of rounds/steps must be >= 1, got {steps}")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=q, steps=int(steps),
                                              accountant=accountant))
    except ValueError as err:
        raise PrivacyConfigError(
            f"no noise multiplier reaches epsilon = {target_epsilon} at delta = {delta} after "
            f"{steps} steps at q = {q} ({err}); raise the target or lower the steps") from None


def _gdp_delta(eps: float, mu: float) -> float:
    """delta(eps) of mu-GDP, with the second term in log space (no overflow for large eps)."""
    from scipy.stats import norm  # lazy: scipy.stats costs a second at import

    return float(norm.cdf(-eps / mu + mu / 2) - np.exp(eps + norm.logcdf(-eps / mu - mu / 2)))


def gaussian_epsilon(*, sigma: float, steps: int, delta: float) -> float:
    """Exact epsilon of ``steps`` Gaussian releases (q = 1) with noise multiplier ``sigma``."""
    if sigma <= 0:
        return float("inf")
    if np.isposinf(sigma):
        return 0.0  # infinite noise releases nothing
    mu = np.sqrt(steps) / sigma
    if _gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while _gdp_delta(hi, mu) > delta:
        hi *= 2
    from scipy.optimize import brentq

    return float(brentq(lambda e: _gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-10, rtol=1e-12))


@dataclass
class Ledger:
    """History of (sigma, q, steps) releases, merged like Opacus' accountants merge them."""

    history: History = field(default_factory=list)

    def step(self, *, sigma: float, q: float, steps: int = 1) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (float(sigma), float(q)):
            s, r, n = self.history[-1]
            self.history[-1] = (s, r, n + int(steps))
        else:
            self.history.append((float(sigma), float(q), int(steps)))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon(self.history, delta, accountant)

    def to_scalars(self, prefix: str = "dp_") -> dict[str, list[float] | list[int]]:
        """Flat lists (JSON and Flower-record friendly): ``<prefix>sigma/rate/steps``."""
        return {f"{prefix}sigma": [s for s, _, _ in self.history],
                f"{prefix}rate": [q for _, q, _ in self.history],
                f"{prefix}steps": [n for _, _, n in self.history]}

    @classmethod
    def from_scalars(cls, scalars: Mapping[str, Any], prefix: str = "dp_") -> Ledger:
        """Inverse of :meth:`to_scalars`; an absent history is an empty ledger."""
        sig = list(scalars.get(f"{prefix}sigma", []))
        rate = list(scalars.get(f"{prefix}rate", []))
        steps = list(scalars.get(f"{prefix}steps", []))
        if not len(sig) == len(rate) == len(steps):
            raise ValueError(f"corrupt privacy history in checkpoint: {len(sig)} sigmas, "
                             f"{len(rate)} rates, {len(steps)} step counts")
        return cls([(float(s), float(q), int(n)) for s, q, n in zip(sig, rate, steps)])

    # Opacus' own accountants store the same triples; these two move a history in and out.
    def to_opacus(self) -> History:
        return list(self.history)

    @classmethod
    def from_opacus(cls, history: History) -> Ledger:
        led = cls()
        for s, q, n in history:
            led.step(sigma=s, q=q, steps=n)
        return led


def epsilon_curve(*, sigma: float, q: float, rounds: int, delta: float, accountant: str,
                  at: list[int] | None = None) -> list[tuple[int, float]]:
    """(round, epsilon) after each round in ``at`` (default: 10 evenly spaced, plus the last)."""
    if at is None:
        at = sorted({int(r) for r in np.linspace(1, rounds, min(rounds, 10)).round()})
    return [(r, epsilon([(sigma, q, r)], delta, accountant)) for r in at]
