"""The server's checks of every client upload, before the method aggregates it, and the robust
mean of ``[server].aggregator`` (docs/robustness.md). Both engines run them (engine/loop.py).

Per round, each fit upload is rejected (dropped from aggregation, logged to ``rejected.jsonl``)
when, in this order:
  1. an array holds NaN or inf, or a float scalar is NaN or inf;
  2. its keys, shapes or dtypes differ from ``Algorithm.expected_upload`` (where the method
     declares one: the FedAvg family, FedDP around it);
  3. its update norm (upload minus what the client received, for weight payloads; the
     payload's norm otherwise) exceeds ``[server].norm_limit`` x the median norm of the
     round's remaining uploads (only with >= 3 uploads: a median of one or two is no
     reference).
The pure maths is in algorithms/aggregate.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histofed.algorithms.aggregate import (
    non_finite_keys,
    norm_outliers,
    robust_aggregate,
    scalar_problems,
    structure_problems,
    update_norm,
)
from histofed.algorithms.base import Algorithm, Payload, ServerContext
from histofed.config import ConfigError, ServerConfig


@dataclass
class Rejection:
    """Why one client's upload was dropped this round."""

    cid: int
    reason: str
    norm: float | None = None
    median: float | None = None


def check_uploads(algorithm: Algorithm, sctx: ServerContext, state: Payload,
                  sent: dict[int, Payload], uploads: dict[int, Payload],
                  norm_limit: float) -> tuple[dict[int, Payload], list[Rejection]]:
    """(uploads that pass, rejections) for one round; ``sent`` is what each client received."""
    rejected: list[Rejection] = []
    kept: dict[int, Payload] = {}
    for cid, up in sorted(uploads.items()):
        if up is None:
            rejected.append(Rejection(cid, "the fit job returned no upload"))
            continue
        bad = non_finite_keys(up.arrays)
        if bad:
            what = " and ".join(w for w, test in (("NaN", np.isnan), ("inf", np.isinf))
                                if any(test(up.arrays[k]).any() for k in bad))
            rejected.append(Rejection(cid, f"{what} in {len(bad)} arrays, e.g. {bad[:3]}"))
            continue
        bad = scalar_problems(up.scalars)
        if bad:
            rejected.append(Rejection(cid, f"NaN/inf in scalars {bad[:3]}"))
            continue
        expected = algorithm.expected_upload(sctx, state, cid)
        problems = structure_problems(up.arrays, expected) if expected is not None else []
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            rejected.append(Rejection(cid, "not the expected upload: " + "; ".join(problems[:3])
                                      + more))
            continue
        kept[cid] = up
    norms = {}
    for cid, up in kept.items():
        if any(np.issubdtype(a.dtype, np.floating) for a in up.arrays.values()):
            received = sent.get(cid)
            weights = up.kind == "weights" and received is not None and received.kind == "weights"
            norms[cid] = update_norm(up.arrays, received.arrays if weights else None)
    median, outliers = norm_outliers(norms, norm_limit)
    for cid in outliers:
        rejected.append(Rejection(cid, f"update norm {norms[cid]:.4g} > norm_limit {norm_limit:g}"
                                       f" x the round's median {median:.4g}",
                                  norms[cid], median))
        del kept[cid]
    for r in rejected:
        r.norm = norms.get(r.cid, r.norm)
        r.median = median
    return kept, sorted(rejected, key=lambda r: r.cid)


class Combiner:
    """``ServerContext.combine`` for a run: the weighted mean or the ``[server].aggregator``
    rule; counts its calls so the engine can tell a method that ignored it."""

    def __init__(self, server: ServerConfig) -> None:
        self.server = server
        self.calls = 0

    def __call__(self, updates: list[dict[str, np.ndarray]],
                 weights: list[float]) -> dict[str, np.ndarray]:
        self.calls += 1
        return robust_aggregate(updates, weights, self.server.aggregator,
                                trim_fraction=self.server.trim_fraction,
                                byzantine=self.server.byzantine)


def check_server_config(server: ServerConfig, algorithm: Algorithm, num_clients: int) -> None:
    """Refuse a robust aggregator where it cannot apply.

    Raises:
        ConfigError: a non-mean aggregator with a method that does not average updates
            (naming the method and why), or Krum with too few clients for ``byzantine``.
    """
    rule = server.aggregator
    if rule == "mean":
        return
    where = f'[server].aggregator = "{rule}"'
    if algorithm.name == "feddp":
        raise ConfigError(
            f"{where} cannot be used with feddp: its privacy analysis bounds the influence of "
            "one client on a (noised) mean of clipped updates; a median, trimmed mean or Krum "
            "selection changes that sensitivity. Use aggregator = \"mean\" (clipping already "
            "bounds each client's influence, and norm_limit still rejects outliers)")
    if not algorithm.mean_aggregation:
        raise ConfigError(
            f"{where} replaces the mean of client updates, but {algorithm.name!r} does not "
            "aggregate by a mean (it fuses, distils, re-compresses or pools what the sites "
            "send). Use aggregator = \"mean\"; [server].norm_limit and the NaN/shape checks "
            "still apply to every method")
    if rule in ("krum", "multi-krum") and num_clients < 2 * server.byzantine + 3:
        raise ConfigError(
            f"{where} with byzantine = {server.byzantine} needs at least "
            f"2 x byzantine + 3 = {2 * server.byzantine + 3} training clients (Blanchard et "
            f"al. 2017); this federation has {num_clients}. Lower [server].byzantine or use "
            "\"median\"")
