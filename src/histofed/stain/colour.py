"""sRGB <-> CIE L*a*b* (D65, 2 degree observer) in torch, differentiable.

The same constants and piecewise formulas as scikit-image's ``rgb2lab`` / ``lab2rgb`` (tested
against them): linearise sRGB, ``XYZ = M @ rgb``, divide by the D65 white, then
``f(t) = t^(1/3)`` above (6/29)^3 and ``7.787 t + 16/116`` below;
``L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z))``.
Both branches of every piecewise function are evaluated on clamped inputs, so no NaN gradient
leaks out of the branch that ``torch.where`` discards.
"""

from __future__ import annotations

import torch

_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS = 0.008856  # (6/29)^3
_KAPPA = 7.787


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-3] != 3:
        raise ValueError(f"expected RGB images ... x 3 x H x W, got shape {tuple(x.shape)}")
    return x.movedim(-3, -1)  # ... x H x W x 3


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """``... x 3 x H x W`` sRGB in [0, 1] -> L*a*b* (L in [0, 100])."""
    x = _channels_last(rgb)
    lin = torch.where(x > 0.04045, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = _XYZ_FROM_RGB.to(lin)
    xyz = lin @ m.T / _WHITE_D65.to(lin)  # ... x H x W x 3
    f = torch.where(xyz > _EPS, xyz.clamp_min(_EPS) ** (1 / 3), _KAPPA * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-1)
    lab = torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-1)
    return lab.movedim(-1, -3)


def lab_to_rgb(lab: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`; ``clip`` clamps to [0, 1] (as scikit-image does)."""
    L, a, b = _channels_last(lab).unbind(-1)
    fy = (L + 16) / 116
    f = torch.stack([a / 500 + fy, fy, (fy - b / 200).clamp_min(0)], dim=-1)
    t0 = 0.2068966  # 6/29
    xyz = torch.where(f > t0, f.clamp_min(t0) ** 3, (f - 16 / 116) / _KAPPA)
    lin = (xyz * _WHITE_D65.to(xyz)) @ torch.linalg.inv(_XYZ_FROM_RGB).to(xyz).T
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0.0031308) ** (1 / 2.4) - 0.055,
                      12.92 * lin)
    if clip:
        rgb = rgb.clamp(0, 1)
    return rgb.movedim(-1, -3)
