"""FedBN (Li et al., ICLR 2021): FedAvg on every layer except normalisation layers, which
stay local (feature-shift across hospitals: scanners, stains). Each client evaluates the
global non-norm weights with its own norm layers, so its model is personal.

Round 1 broadcasts the full initial model; later rounds send only non-norm weights, and
clients upload only non-norm weights (egress.jsonl shows the saving).
"""

from __future__ import annotations

from dataclasses import dataclass

from histofed.algorithms.base import (
    ClientContext,
    ClientInfo,
    Payload,
    ServerContext,
    evaluate_model,
    register_algorithm,
)
from histofed.algorithms.fedavg import FedAvg
from histofed.algorithms.training import local_train
from histofed.algorithms.weights import get_weights, load_weights, norm_keys, split_arrays


@register_algorithm("fedbn")
@dataclass
class FedBN(FedAvg):
    def local_keys(self, model) -> set[str]:
        return norm_keys(model)

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        arrays = state.arrays
        if sctx.round > 1:
            _, arrays = split_arrays(arrays, self.local_keys(sctx.build_model(None)))
        return {c.cid: Payload(arrays, {}, kind="weights") for c in sctx.clients}

    def _load(self, ctx: ClientContext, payload: Payload) -> None:
        load_weights(ctx.model, payload.arrays)
        load_weights(ctx.model, ctx.state.arrays)  # this site's own norm layers (empty at first)

    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        self._load(ctx, payload)
        ctx.logs.update(local_train(ctx))
        local_norm, shared = split_arrays(get_weights(ctx.model), self.local_keys(ctx.model))
        ctx.state.arrays = local_norm
        return Payload(shared, {"num_examples": ctx.data.num_train}, kind="weights")

    def evaluate(self, ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
        self._load(ctx, payload)
        return evaluate_model(ctx, ctx.model, "personal")

    def personal_weights(self, client: ClientInfo, state: Payload, client_state: Payload) -> dict:
        # the site's norm layers live in its private state; where the engine does not hold it
        # (Flower: it stays on the node) there is no personal model to write here
        return {**state.arrays, **client_state.arrays} if client_state.arrays else {}
