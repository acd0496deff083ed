"""Multiple-instance learning heads over feature bags (N instances x D features per slide)."""

from __future__ import annotations

import torch
from torch import nn

from histofed.models.registry import register_model


@register_model("abmil")
class GatedABMIL(nn.Module):
    """Gated attention MIL (Ilse et al., ICML 2018).

    a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ),  z = sum_i a_i h_i,  logits = W z.

    Input ``1 x N x D`` (one bag), output ``1 x C``.
    """

    def __init__(self, *, in_dim: int = 512, hidden: int = 128, num_classes: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, hidden)
        self.attn_u = nn.Linear(hidden, hidden)
        self.attn_w = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, num_classes)

    def attention(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(bag)  # B x N x H
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h)))  # B x N x 1
        return torch.softmax(scores, dim=1), h

    def forward(self, bag: torch.Tensor) -> torch.Tensor:  # B x N x D -> B x C
        a, h = self.attention(bag)
        return self.head((a * h).sum(dim=1))
