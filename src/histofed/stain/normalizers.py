"""Reinhard colour transfer, the identity, and :func:`make_normalizer` (by name).

Reinhard et al., "Color transfer between images", IEEE CG&A 2001: in a decorrelated colour
space, shift and scale each channel of the source to the target's mean and standard deviation,

    lab' = (lab - mu_src) / sigma_src * sigma_tgt + mu_tgt,      rgb' = lab^-1(lab')

computed per image over all its pixels (CIE L*a*b* here; see histofed.stain.colour).
"""

from __future__ import annotations

import torch

from histofed.stain.colour import lab_to_rgb, rgb_to_lab
from histofed.stain.macenko import Macenko

StainNormalizer = torch.nn.Module


class Identity(torch.nn.Module):
    """No stain normalisation (DM without A)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


class Reinhard(torch.nn.Module):
    """Match per-image L*a*b* channel means/stds to a target's.

    Args:
        target_mean, target_std: 3 values each (L*, a*, b*).
        eps: added to the source std (a flat tile would divide by zero).
    """

    def __init__(self, target_mean, target_std, *, eps: float = 1e-6, clip: bool = True) -> None:
        super().__init__()
        self.register_buffer("target_mean", torch.as_tensor(target_mean, dtype=torch.float64))
        self.register_buffer("target_std", torch.as_tensor(target_std, dtype=torch.float64))
        self.eps, self.clip = eps, clip

    @classmethod
    def from_target(cls, target: torch.Tensor, **kwargs) -> Reinhard:
        """Target statistics of one ``3 x H x W`` image (or a ``B x 3 x H x W`` batch, pooled)."""
        with torch.no_grad():
            lab = rgb_to_lab(target.double()).movedim(-3, 0).reshape(3, -1)  # 3 x P
            return cls(lab.mean(1), lab.std(1), **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B x) 3 x H x W
        lab = rgb_to_lab(images)
        mean = lab.mean(dim=(-2, -1), keepdim=True)  # (B x) 3 x 1 x 1
        std = lab.std(dim=(-2, -1), keepdim=True)
        tm = self.target_mean.to(lab)[:, None, None]
        ts = self.target_std.to(lab)[:, None, None]
        return lab_to_rgb((lab - mean) / (std + self.eps) * ts + tm, clip=self.clip)


def make_normalizer(name: str, target: torch.Tensor | None = None) -> torch.nn.Module:
    """``"none"``, ``"macenko"`` (default reference, or fitted to ``target``) or ``"reinhard"``
    (needs ``target``: a 3 x H x W template image in [0, 1])."""
    if name == "none":
        return Identity()
    if name == "macenko":
        return Macenko() if target is None else Macenko.fit(target)
    if name == "reinhard":
        if target is None:
            raise ValueError("Reinhard normalisation needs a target image (its L*a*b* mean/std)")
        return Reinhard.from_target(target)
    raise ValueError(f"unknown stain normaliser {name!r}; choose 'none', 'macenko' or 'reinhard'")
