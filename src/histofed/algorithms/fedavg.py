"""FedAvg (McMahan et al., AISTATS 2017).

Each round every client starts from the global weights theta_t, trains locally to theta_k,
and the server sets theta_{t+1} = sum_k n_k theta_k / sum_k n_k  (n_k = local training
examples). Normalisation-layer buffers (BatchNorm running mean/var) are averaged like weights;
``num_batches_tracked`` stays local (see algorithms/weights.py). Every client must have the same
architecture (checked on the roster before round 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histofed.algorithms.base import (
    Algorithm,
    ClientContext,
    Payload,
    ServerContext,
    register_algorithm,
    require_same_architecture,
    without_namespaces,
)
from histofed.algorithms.training import local_train
from histofed.algorithms.weights import get_weights, load_weights
from histofed.config import ConfigError
from histofed.options import option


@register_algorithm("fedavg")
@dataclass
class FedAvg(Algorithm):
    """Options: ``weight`` = "examples" (n_k = training examples, McMahan et al.), "pixels"
    (n_k = training pixels: a site of small tiles counts for what it holds) or "uniform"."""

    mean_aggregation = True
    weight: str = option("examples", choices=("examples", "pixels", "uniform"),
                         help="what n_k in the weighted mean counts")

    def init_state(self, sctx: ServerContext, init_weights: dict[str, np.ndarray]) -> Payload:
        require_same_architecture(sctx, self.name)
        return super().init_state(sctx, init_weights)

    def client_weight(self, sctx: ServerContext, cid: int, result: Payload) -> float:
        """n_k of client ``cid`` (see ``weight``); pixels come from the site's roster entry."""
        if self.weight == "uniform":
            return 1.0
        if self.weight == "pixels":
            pixels = sctx.client(cid).sizes.get("train_pixels", 0)
            if not pixels:
                raise ConfigError(f"[algorithm].weight = \"pixels\": client "
                                  f"{sctx.client(cid).name!r} reports no pixel count (not an "
                                  "image dataset); use weight = \"examples\"")
            return float(pixels)
        return float(result.scalars["num_examples"])

    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        load_weights(ctx.model, payload.arrays)
        ctx.logs.update(local_train(ctx, extra_loss=self.extra_loss(ctx, payload)))
        return Payload(get_weights(ctx.model), {"num_examples": ctx.data.num_train}, kind="weights")

    def extra_loss(self, ctx: ClientContext, payload: Payload):
        """Hook for methods that add a term to the local loss (FedProx, FedSODA)."""
        return None

    def expected_upload(self, sctx: ServerContext, state: Payload,
                        cid: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The global weights (keys outside any namespace), minus the keys kept at home
        (FedBN's norm layers), each with its shape and dtype."""
        cache = self.__dict__.setdefault("_home_keys", {})  # one model build per run
        if cache.get("factory") is not sctx.build_model:
            cache.update(factory=sctx.build_model, keys=self.local_keys(sctx.build_model(None)))
        return {k: (v.shape, v.dtype) for k, v in without_namespaces(state.arrays).items()
                if k not in cache["keys"]}

    def aggregate(self, sctx: ServerContext, state: Payload, results: dict[int, Payload]) -> Payload:
        """theta_{t+1} = sum_k n_k theta_k / sum_k n_k, or the robust rule of
        ``[server].aggregator`` (``sctx.combine``)."""
        cids = sorted(results)
        new = sctx.combine([results[c].arrays for c in cids],
                           [self.client_weight(sctx, c, results[c]) for c in cids])
        return Payload({**state.arrays, **new}, state.scalars, kind="state")
