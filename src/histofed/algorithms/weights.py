"""Model weights <-> named numpy arrays, with an explicit normalisation-layer policy.

Keys are ``state_dict`` keys, never positions. ``num_batches_tracked`` buffers never travel:
they only count local steps (and only matter when BatchNorm momentum is None), so each site
keeps its own. Norm layers (BatchNorm/GroupNorm/InstanceNorm/LayerNorm) are found by module
type, so FedBN-style policies do not depend on parameter names.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys (params and buffers) that belong to normalisation layers."""
    keys = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            for name, _ in module.state_dict().items():
                keys.add(prefix + name)
    return keys


def get_weights(model: nn.Module, *, exclude: set[str] | None = None) -> dict[str, np.ndarray]:
    """Copy the model's state as float32/int arrays, without ``num_batches_tracked``."""
    exclude = exclude or set()
    return {
        k: v.detach().cpu().numpy().copy()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked") and k not in exclude
    }


def load_weights(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load named arrays into ``model`` (a subset is fine; unknown keys are an error)."""
    state = model.state_dict()
    unknown = [k for k in arrays if k not in state]
    if unknown:
        raise KeyError(
            f"payload has {len(unknown)} keys the model does not know, e.g. {unknown[:3]}: "
            "client and server built different architectures"
        )
    with torch.no_grad():
        for key, value in arrays.items():
            target = state[key]
            if tuple(target.shape) != value.shape:
                raise ValueError(
                    f"weight {key!r}: model shape {tuple(target.shape)} != payload {value.shape}"
                )
            target.copy_(torch.from_numpy(np.asarray(value)))


def split_arrays(
    arrays: dict[str, np.ndarray], keys: set[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(arrays whose key is in ``keys``, the rest)."""
    inside = {k: v for k, v in arrays.items() if k in keys}
    outside = {k: v for k, v in arrays.items() if k not in keys}
    return inside, outside
