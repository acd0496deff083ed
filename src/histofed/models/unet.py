"""Segmentation UNet: MONAI's residual UNet, sized for CPUs by default.

``norm`` is explicit because federated methods treat norm layers differently: "group" (the
default: no running statistics, so nothing data-dependent is averaged across hospitals; FedSODA's
reference code; what DP-SGD needs), "instance", "batch" (FedBN keeps these local), "none" (no norm layers: the classical UNet; the
gradient-inversion audit's norm-free control, privacy/invert.py). Measured on
real nuclei data with a held-out hospital (benchmarks/results/defaults.md), BatchNorm made
FedAvg's global model markedly worse on every split.
"""

from __future__ import annotations

import math

from torch import nn

from histofed.config import ConfigError

from histofed.models.registry import register_model

# "group": built with 1 group (valid for any width, including MONAI's 1-channel output
# unit), then every GroupNorm gets gcd(8, C) groups, i.e. 8 wherever C allows.
_NORMS = {"batch": "batch", "instance": "instance", "group": ("group", {"num_groups": 1}),
          "none": None}
_GROUPS = 8


@register_model("unet")
def build_unet(
    *,
    num_classes: int = 1,
    in_channels: int = 3,
    channels: tuple[int, ...] | list[int] = (16, 32, 64, 128),
    strides: tuple[int, ...] | list[int] | None = None,
    num_res_units: int = 1,
    norm: str = "group",
    dropout: float = 0.0,
) -> nn.Module:
    """A 2-D UNet producing ``num_classes`` logit maps (B x 3 x H x W -> B x C x H x W).

    Example:
        >>> import torch
        >>> build_unet(channels=(8, 16))(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1, 64, 64])
    """
    if norm not in _NORMS:
        raise ConfigError(f"[model].norm = {norm!r}: choose one of {', '.join(_NORMS)}")
    channels = tuple(channels)
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ConfigError(f"[model].channels = {list(channels)!r}: a list of positive integers, "
                          "e.g. [16, 32, 64, 128]")
    if len(channels) < 2:
        raise ConfigError("[model].channels needs at least two levels, e.g. [16, 32, 64, 128]")
    strides = tuple(strides) if strides else (2,) * (len(channels) - 1)
    from monai.networks.nets import UNet  # imported here: MONAI takes seconds to import

    net = UNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
               channels=channels, strides=strides, num_res_units=num_res_units,
               norm=_NORMS[norm], dropout=dropout)
    if norm == "group":
        _regroup(net)
    return net


def _regroup(net: nn.Module) -> None:
    """Replace each GroupNorm(1, C) by GroupNorm(gcd(8, C), C) in place."""
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm):
                groups = math.gcd(_GROUPS, child.num_channels)
                setattr(parent, name, nn.GroupNorm(groups, child.num_channels, eps=child.eps,
                                                   affine=child.affine))
