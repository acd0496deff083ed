"""Model builders: shapes, norm policies, clear errors."""

import pytest
import torch
from torch import nn

from histofed.config import ConfigError, NamedConfig
from histofed.models import build_model


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
@pytest.mark.parametrize("res_units", [0, 1])
def test_unet_shapes_for_every_norm(norm, res_units):
    model = build_model(NamedConfig("unet", {"channels": [8, 12], "norm": norm,
                                             "num_res_units": res_units}), num_classes=1)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_group_norm_uses_up_to_eight_groups():
    model = build_model(NamedConfig("unet", {"channels": [12, 16], "norm": "group"}), num_classes=1)
    groups = {(m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert (4, 12) in groups and (8, 16) in groups


def test_cnn_and_abmil():
    cnn = build_model(NamedConfig("cnn", {"width": 8, "depth": 2}), num_classes=4)
    assert cnn(torch.zeros(5, 3, 32, 32)).shape == (5, 4)
    mil = build_model(NamedConfig("abmil", {}), num_classes=2, in_dim=16)
    assert mil(torch.zeros(1, 7, 16)).shape == (1, 2)


def test_bad_model_options():
    with pytest.raises(ConfigError, match="norm"):
        build_model(NamedConfig("unet", {"norm": "layer"}), num_classes=1)
    with pytest.raises(ConfigError, match='unknown option .chanels.*Did you mean "channels"'):
        build_model(NamedConfig("unet", {"chanels": [8, 16]}), num_classes=1)
