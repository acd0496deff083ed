"""Stage split of MONAI's UNet for layer-wise (stratified) aggregation, and stage features.

MONAI builds its UNet recursively: ``model.model`` is ``Sequential(down, SkipConnection(inner),
up)`` where ``inner`` is again such a ``Sequential`` or, at the deepest level, the bottom block.
Walking that nesting gives the network's natural stages in forward order::

    enc_0, enc_1, ..., enc_{n-2}, bottom, dec_{n-2}, ..., dec_0        (2n - 1 stages)

for ``n = len(channels)``; ``dec_0`` ends in the logits, like the reference code's ``out_conv``.
Every ``state_dict`` key belongs to exactly one stage (by module-name prefix), so stages never
depend on parameter order. ``group_stages`` merges neighbouring stages when fewer are configured.

Example:
    >>> from histofed.models.unet import build_unet
    >>> unet_stage_prefixes(build_unet(channels=(8, 16, 32)))
    ['model.0', 'model.1.submodule.0', 'model.1.submodule.1.submodule', 'model.1.submodule.2', 'model.2']
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class StageSplitError(ValueError):
    """The model cannot be split into the configured stages; the message says why and the fix."""


def _is_level(module: nn.Module) -> bool:
    """A UNet level: Sequential(down, SkipConnection, up)."""
    from monai.networks.layers.simplelayers import SkipConnection

    return isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)


def unet_stage_prefixes(model: nn.Module) -> list[str]:
    """Module names of the natural stages of a MONAI UNet, in forward order (see module doc).

    Raises:
        StageSplitError: ``model`` is not a MONAI UNet (no ``model`` attribute of that shape).
    """
    root = getattr(model, "model", None)
    if root is None or not _is_level(root):
        raise StageSplitError(
            f"FedSODA's stage split needs MONAI's UNet ([model] name = \"unet\"); got "
            f"{type(model).__name__}. Use the unet model or set [algorithm].so = da = false")
    names = {id(m): n for n, m in model.named_modules()}
    encoders, decoders, node = [], [], root
    while _is_level(node):
        encoders.append(names[id(node[0])])
        decoders.insert(0, names[id(node[2])])
        node = node[1].submodule
    return encoders + [names[id(node)]] + decoders


def group_stages(num_natural: int, stages: int) -> list[list[int]]:
    """Split natural stages 0..num_natural-1 into ``stages`` contiguous groups (0 = one each).

    Example:
        >>> group_stages(7, 3)
        [[0, 1, 2], [3, 4], [5, 6]]

    Raises:
        StageSplitError: more stages configured than the model has.
    """
    if stages == 0:
        stages = num_natural
    if stages > num_natural:
        raise StageSplitError(
            f"[algorithm].stages = {stages} but this UNet has only {num_natural} stages "
            f"(2 x len(channels) - 1). Set stages <= {num_natural} (0 = one per UNet block) or "
            f"add levels to [model].channels")
    return [[int(i) for i in part] for part in np.array_split(np.arange(num_natural), stages)]


def key_stages(model: nn.Module, prefixes: list[str], groups: list[list[int]]) -> dict[str, int]:
    """Map every transmitted ``state_dict`` key to its stage group index.

    Raises:
        StageSplitError: a key belongs to no stage (an unexpected architecture).
    """
    natural_to_group = {s: g for g, members in enumerate(groups) for s in members}
    out = {}
    for key in model.state_dict():
        if key.endswith("num_batches_tracked"):
            continue  # never transmitted (see weights.py)
        owner = [i for i, p in enumerate(prefixes) if key.startswith(p + ".")]
        if len(owner) != 1:
            raise StageSplitError(f"weight {key!r} belongs to {len(owner)} UNet stages, expected 1")
        out[key] = natural_to_group[owner[0]]
    return out


@torch.no_grad()
def stage_features(model: nn.Module, modules: list[nn.Module], inputs: torch.Tensor) -> list[np.ndarray]:
    """Outputs of ``modules`` (forward hooks) for ``inputs``, each flattened to float64.

    Args:
        model: the network, run once in eval mode on ``inputs`` (B x 3 x H x W).
        modules: submodules whose outputs are the stage features, in stage order.

    Returns:
        One flat float64 array per module (B * C_l * H_l * W_l values).
    """
    feats: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, k=k: feats.__setitem__(k, out.detach()))
             for k, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [feats[k].double().flatten().numpy() for k in range(len(modules))]
