"""Local-only baseline: every hospital trains alone on its own data; nothing is shared after
the common initial weights of round 1. The lower bound federated methods must beat."""

from __future__ import annotations

from dataclasses import dataclass

from histofed.algorithms.base import Algorithm, ClientContext, Payload, ServerContext, evaluate_model
from histofed.algorithms.training import local_train
from histofed.algorithms.weights import get_weights, load_weights


@dataclass
class LocalOnly(Algorithm):
    name = "local"

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        if sctx.round == 1:  # the shared initialisation, then silence
            return {c.cid: Payload(state.arrays, {}, kind="weights") for c in sctx.clients}
        return {c.cid: Payload(kind="none") for c in sctx.clients}

    def configure_evaluate(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        return {c.cid: Payload(kind="none") for c in sctx.clients}

    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        load_weights(ctx.model, ctx.state.arrays or payload.arrays)
        ctx.logs.update(local_train(ctx))
        ctx.state.arrays = get_weights(ctx.model)
        return Payload(kind="none")

    def aggregate(self, sctx: ServerContext, state: Payload, results: dict[int, Payload]) -> Payload:
        return state

    def evaluate(self, ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
        load_weights(ctx.model, ctx.state.arrays)
        return evaluate_model(ctx, ctx.model, "personal")

    def final_weights(self, state: Payload) -> dict:
        return {}

    def personal_weights(self, state: Payload, client_state: Payload) -> dict:
        return dict(client_state.arrays)
