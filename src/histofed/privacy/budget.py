"""Privacy budgets without training: epsilon(delta) per round for a Gaussian mechanism, or the
noise multiplier that meets a target epsilon. Backs ``histofed privacy budget``.

Example:
    >>> table = budget_table(sigma=1.0, q=1.0, rounds=150, delta=1e-5, accountants=("rdp",),
    ...                      at=[150])
    >>> round(table[0]["rdp"], 1), round(table[0]["exact"], 1)
    (131.7, 126.4)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histofed.privacy.accountant import check_accountant, epsilon, gaussian_epsilon
from histofed.privacy.dp import check_mechanism


def checkpoints(rounds: int, every: int | None = None) -> list[int]:
    """Rounds at which to report: every ``every`` rounds (default: about ten rows) + the last."""
    if rounds < 1:
        from histofed.privacy.dp import PrivacyConfigError

        raise PrivacyConfigError(f"--rounds must be >= 1, got {rounds}")
    if every is None:
        every = max(1, int(np.ceil(rounds / 10)))
    if every < 1:
        from histofed.privacy.dp import PrivacyConfigError

        raise PrivacyConfigError(f"--every must be >= 1 (a row every N rounds), got {every}")
    return sorted({*range(every, rounds + 1, every), rounds})


def budget_table(*, sigma: float, q: float, rounds: int, delta: float,
                 accountants: Sequence[str] = ("rdp", "prv"), at: list[int] | None = None,
                 population: int | None = None) -> list[dict[str, float]]:
    """One row per reported round: ``{"round", <accountant>: epsilon, ..., "exact"}``.

    ``exact`` (closed-form Gaussian DP) is given only for q = 1, where it is exact.

    Raises:
        PrivacyConfigError: sigma < 0, q outside (0, 1], delta outside (0, 1) or
            delta >= 1 / population.
    """
    check_mechanism(sigma=sigma, q=q, delta=delta, population=population, where="budget")
    for name in accountants:
        check_accountant(name, "--accountant")
    rows = []
    for r in at or checkpoints(rounds):
        row: dict[str, float] = {"round": r}
        for name in accountants:
            row[name] = epsilon([(sigma, q, r)], delta, name)
        if q == 1:
            row["exact"] = gaussian_epsilon(sigma=sigma, steps=r, delta=delta)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    """Plain-text table with aligned columns."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [keys] + [[str(r[k]) if k == "round" else _num(r[k]) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(keys))) for c in cells)


def _num(v: float) -> str:
    if not np.isfinite(v):
        return "inf"
    return f"{v:.4g}" if abs(v) >= 1000 else f"{v:.3f}"
