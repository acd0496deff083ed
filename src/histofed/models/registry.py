"""The model registry (its own module so model files can register themselves on import)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from histofed.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register_model("unet")`` adds a model factory (function or class)."""
    return MODELS.register(name)
