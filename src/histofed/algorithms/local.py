"""Local-only baseline: every hospital trains alone on its own data; nothing is shared after
the common initial weights of round 1 (none when clients have different architectures: then
each site starts from its own seeded initialisation). The lower bound federated methods must
beat."""

from __future__ import annotations

from dataclasses import dataclass

from histofed.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientInfo,
    Payload,
    ServerContext,
    evaluate_model,
    register_algorithm,
)
from histofed.algorithms.training import local_train
from histofed.algorithms.weights import get_weights, load_weights


@register_algorithm("local")
@dataclass
class LocalOnly(Algorithm):

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        if sctx.round == 1:  # the shared initialisation, then silence
            return {c.cid: Payload(state.arrays, {}, kind="weights") for c in sctx.clients}
        return {c.cid: Payload(kind="none") for c in sctx.clients}

    def configure_evaluate(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        return {c.cid: Payload(kind="none") for c in sctx.clients}

    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        load_weights(ctx.model, ctx.state.arrays or payload.arrays)  # both empty: own init
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

    def personal_weights(self, client: ClientInfo, state: Payload, client_state: Payload) -> dict:
        return dict(client_state.arrays)
