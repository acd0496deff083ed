"""Centralised (pooled) baseline: all hospitals' training data in one place, one model.

The upper reference that federated methods approach without moving pixels. The engine runs
one "pooled" client over the union of the training sets, for ``local_steps x clients`` steps a
round (the same compute as a federated round) and logs the raw training data every client
would have had to send as egress of kind "raw-data". Evaluation stays per client.
"""

from __future__ import annotations

from dataclasses import dataclass

from histofed.algorithms.base import Payload, ServerContext, register_algorithm
from histofed.algorithms.fedavg import FedAvg


@register_algorithm("centralized")
@dataclass
class Centralized(FedAvg):
    pooled = True
    mean_aggregation = False  # one pooled model: nothing to average, nothing a DP wrapper may clip

    def aggregate(self, sctx: ServerContext, state: Payload, results: dict[int, Payload]) -> Payload:
        (result,) = results.values()  # the single pooled client
        return Payload({**state.arrays, **result.arrays}, state.scalars, kind="state")
