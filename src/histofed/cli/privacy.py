"""`histofed privacy budget`: epsilon(delta) per round for a noise level, or the noise level for
a target epsilon, without training (Opacus' RDP and PRV accountants)."""

from __future__ import annotations

import json
import warnings
from typing import Annotated, Optional

import typer

from histofed.cli.errors import friendly_errors

app = typer.Typer(help="Differential-privacy budgets (no training).", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Differential-privacy budgets (no training)."""


@app.command()
@friendly_errors
def budget(
    rounds: Annotated[int, typer.Option(help="Rounds (or steps) the mechanism runs.")],
    sigma: Annotated[Optional[float], typer.Option(
        help="Noise multiplier: noise std / clipping norm C.")] = None,
    target_epsilon: Annotated[Optional[float], typer.Option(
        help="Instead of --sigma: the sigma that reaches this epsilon after --rounds.")] = None,
    q: Annotated[float, typer.Option(help="Sampling rate per round (Poisson), in (0, 1].")] = 1.0,
    delta: Annotated[float, typer.Option(help="The delta of (epsilon, delta).")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="rdp, prv or both.")] = "both",
    clients: Annotated[Optional[int], typer.Option(
        help="Number of protected units (clients or records): checks delta < 1/N.")] = None,
    every: Annotated[Optional[int], typer.Option(help="Print a row every N rounds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print epsilon after each round for a Gaussian mechanism with sampling rate q.

    \b
    Examples:
      histofed privacy budget --sigma 1 --q 1 --rounds 150 --delta 1e-5
      histofed privacy budget --target-epsilon 8 --q 0.5 --rounds 50 --accountant rdp

    One row per reported round; "exact" is the closed form for q = 1 (T Gaussian releases equal
    one with mu = sqrt(T)/sigma). Epsilon is an upper bound on privacy loss under the
    accountant's assumptions (add/remove one unit, Poisson sampling at rate q).
    """
    from histofed.privacy.accountant import PRVFallbackWarning, noise_for_epsilon
    from histofed.privacy.budget import budget_table, checkpoints, format_table
    from histofed.privacy.dp import PrivacyConfigError, check_mechanism

    if (sigma is None) == (target_epsilon is None):
        raise PrivacyConfigError("give exactly one of --sigma or --target-epsilon")
    names = ("rdp", "prv") if accountant == "both" else (accountant,)
    check_mechanism(q=q, delta=delta, population=clients, where="budget")
    found = None
    if target_epsilon is not None:
        sigma = noise_for_epsilon(target_epsilon=target_epsilon, delta=delta, q=q, steps=rounds,
                                  accountant=names[0])
        found = sigma
    assert sigma is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PRVFallbackWarning)
        rows = budget_table(sigma=sigma, q=q, rounds=rounds, delta=delta, accountants=names,
                            at=checkpoints(rounds, every), population=clients)
    notes = [str(w.message).split(" for sigma/q/steps")[0]
             for w in caught if issubclass(w.category, PRVFallbackWarning)]
    if notes:  # e.g. tiny sigma: PRV's grid would need petabytes (the last row needs the most)
        typer.echo(f"note: {notes[-1]}; the prv column shows the RDP bound in {len(notes)} "
                   "row(s)", err=True)
    if as_json:
        typer.echo(json.dumps({"sigma": sigma, "q": q, "delta": delta, "rounds": rounds,
                               "target_epsilon": target_epsilon, "rows": rows}))
        return
    if found is not None:
        typer.echo(f"sigma = {found:.4f} reaches epsilon <= {target_epsilon:g} after {rounds} "
                   f"rounds at q = {q:g}, delta = {delta:g} ({names[0]} accountant)")
    typer.echo(f"epsilon at delta = {delta:g}, sigma = {sigma:.4g}, q = {q:g}")
    typer.echo(format_table(rows))
