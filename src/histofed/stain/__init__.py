"""Differentiable stain normalisation in torch (gradients reach the input pixels).

FedWSIDD (Jin et al., MICCAI 2025, arXiv 2506.15365) normalises stains *inside* dataset
distillation, so the normaliser must pass gradients to the synthetic pixels; the usual
implementations (e.g. torchstain) detach or go through numpy. Both methods here are written
with differentiable torch operations only (``torch.linalg.eigh``, ``torch.quantile``, explicit
pseudo-inverses), and are checked with ``torch.autograd.gradcheck`` in tests/test_stain.py.

- :class:`Macenko` (Macenko et al., ISBI 2009): stain vectors from the angular extremes of
  optical densities in their principal plane, concentrations rescaled to a target.
- :class:`Reinhard` (Reinhard et al., IEEE CG&A 2001): per-channel mean/std matching in a
  perceptual colour space (CIE L*a*b* here, as most histology tools do; the paper's l-alpha-beta
  is a choice we did not implement).

Images are float tensors in [0, 1], ``B x 3 x H x W`` (or ``3 x H x W``).

Example:
    >>> import torch
    >>> norm = Reinhard.from_target(torch.rand(3, 16, 16))
    >>> norm(torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 3, 16, 16])
"""

from histofed.stain.colour import lab_to_rgb, rgb_to_lab
from histofed.stain.macenko import Macenko, macenko_stains, od_to_rgb, rgb_to_od
from histofed.stain.normalizers import Identity, Reinhard, StainNormalizer, make_normalizer

__all__ = ["Identity", "Macenko", "Reinhard", "StainNormalizer", "lab_to_rgb",
           "macenko_stains", "make_normalizer", "od_to_rgb", "rgb_to_lab", "rgb_to_od"]
