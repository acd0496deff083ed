"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term in each client's loss,

    L_k(theta) = task_loss(theta) + mu / 2 * ||theta - theta_t||^2,

which keeps local models near the global one theta_t under heterogeneous data.
Aggregation is FedAvg's. ``mu = 0`` is exactly FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from histofed.algorithms.base import ClientContext, Payload, register_algorithm
from histofed.algorithms.fedavg import FedAvg
from histofed.options import option


@register_algorithm("fedprox")
@dataclass
class FedProx(FedAvg):
    mu: float = option(0.01, ge=0, help="weight of the proximal term")

    def extra_loss_terms(self) -> list[str]:
        return [f"the proximal term (mu = {self.mu})"] if self.mu else []

    def extra_loss(self, ctx: ClientContext, payload: Payload):
        if self.mu == 0:
            return None
        anchors = {name: torch.from_numpy(payload.arrays[name]).clone()
                   for name, _ in ctx.model.named_parameters()}

        def proximal(model, inputs, target, logits):
            return 0.5 * self.mu * sum(
                torch.sum((p - anchors[n]) ** 2) for n, p in model.named_parameters())

        return proximal
