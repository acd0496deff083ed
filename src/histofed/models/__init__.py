"""Model registry: the config's [model] table names one of these and passes its options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from histofed.config import ConfigError, NamedConfig
from histofed.models.cnn import SmallCNN
from histofed.models.mil import GatedABMIL
from histofed.models.unet import build_unet
from histofed.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
MODELS.add("unet", build_unet)
MODELS.add("cnn", SmallCNN)
MODELS.add("abmil", GatedABMIL)


def build_model(cfg: NamedConfig, *, num_classes: int, **defaults: Any) -> nn.Module:
    """Build the configured model; ``defaults`` (e.g. in_dim from the data) yield to the config."""
    factory = MODELS.get(cfg.name)
    kwargs = {**defaults, **cfg.options, "num_classes": num_classes}
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"[model] {cfg.name!r}: {err}. Check the option names in [model].") from None
