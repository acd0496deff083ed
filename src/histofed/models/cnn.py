"""Small CNN for nucleus-patch / tile classification (e.g. 32 x 32 CRCHisto patches)."""

from __future__ import annotations

import torch
from torch import nn

from histofed.models.registry import register_model


@register_model("cnn")
class SmallCNN(nn.Module):
    """conv-norm-relu blocks with max-pooling, global average pooling, linear head.

    Args:
        num_classes: output logits.
        width: channels of the first block (doubles per block).
        depth: number of blocks.
        norm: "group" (default: no running statistics to average across sites) | "batch" |
            "none".
    """

    def __init__(self, *, num_classes: int = 4, in_channels: int = 3, width: int = 32,
                 depth: int = 3, norm: str = "group") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(depth):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x 3 x H x W -> B x C
        return self.head(self.features(x).mean(dim=(2, 3)))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()
