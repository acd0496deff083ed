"""Macenko stain normalisation (Macenko et al., "A method for normalizing histology slides for
quantitative analysis", ISBI 2009), differentiable end to end.

For an RGB image I (0..255 scale) with background intensity I_0:

    OD = -log((I + 1) / I_0)                        (Beer-Lambert optical density, per pixel)
    keep pixels whose OD exceeds beta in every channel (tissue; the mask is piecewise constant)
    v_1, v_2 = eigenvectors of cov(OD) with the two largest eigenvalues  (the stain plane)
    phi_i = atan2(OD_i . v_2, OD_i . v_1)
    s_min = [v_1 v_2] (cos, sin)(P_alpha(phi)),  s_max = [v_1 v_2] (cos, sin)(P_{100-alpha}(phi))
    HE = [s_H, s_E]   (haematoxylin = the one with the larger red-channel OD)
    C  = HE^+ OD                                     (2 x pixels, least squares)
    C' = C * (maxC_ref / P_99(C))                    (per stain)
    I' = I_0 exp(-HE_ref C')

Differentiable choices (ours): ``torch.linalg.eigh`` (gradients exist while the top
eigenvalues are distinct), ``torch.quantile`` (linear interpolation between sorted values) for
the percentiles, an explicit pseudo-inverse ``(HE^T HE)^-1 HE^T`` instead of a solver that
detaches, and eigenvector signs fixed so the stain vectors point into positive OD. The default
reference (HE_ref, maxC_ref) is the one most Macenko implementations ship; ``Macenko.fit``
takes it from a target image instead.
"""

from __future__ import annotations

import torch

HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))  # 3 x 2, columns H, E
MAX_C_REF = (1.9705, 1.0308)


def rgb_to_od(rgb: torch.Tensor, io: float = 240.0) -> torch.Tensor:
    """Optical density of ``rgb`` in [0, 1] (scaled to 0..255): ``-log((255 rgb + 1) / io)``."""
    return -torch.log((rgb * 255.0 + 1.0) / io)


def od_to_rgb(od: torch.Tensor, io: float = 240.0) -> torch.Tensor:
    """Inverse of :func:`rgb_to_od` (without clipping)."""
    return (io * torch.exp(-od) - 1.0) / 255.0


def macenko_stains(image: torch.Tensor, *, io: float = 240.0, alpha: float = 1.0,
                   beta: float = 0.15, min_pixels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Stain matrix and concentrations of one image.

    Args:
        image: ``3 x H x W`` in [0, 1].
        io, alpha, beta: background intensity, angular percentile, OD threshold (Macenko).
        min_pixels: fewer tissue pixels than this is an error.

    Returns:
        ``HE`` (3 x 2, columns haematoxylin, eosin) and ``C`` (2 x H*W concentrations).

    Raises:
        ValueError: not a 3 x H x W image, or too few tissue pixels (blank/background tile).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"macenko_stains expects one 3 x H x W image, got {tuple(image.shape)}")
    od = rgb_to_od(image, io).reshape(3, -1)  # 3 x P
    tissue = (od > beta).all(dim=0)  # P, piecewise constant: no gradient needed
    od_hat = od[:, tissue]  # 3 x T
    if od_hat.shape[1] < min_pixels:
        raise ValueError(f"Macenko: only {od_hat.shape[1]} tissue pixels (OD > {beta} in every "
                         f"channel) out of {od.shape[1]}; the tile is background. Skip it, lower "
                         "beta, or use Reinhard")
    centred = od_hat - od_hat.mean(dim=1, keepdim=True)
    cov = centred @ centred.T / max(od_hat.shape[1] - 1, 1)  # 3 x 3
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    plane = vecs[:, 1:3].flip(-1)  # 3 x 2: v_1 (largest), v_2
    plane = plane * torch.where(plane.sum(0) < 0, -1.0, 1.0).to(plane)  # point into OD > 0
    proj = plane.T @ od_hat  # 2 x T
    phi = torch.atan2(proj[1], proj[0])  # T
    lo, hi = torch.quantile(phi, torch.tensor([alpha / 100, 1 - alpha / 100]).to(phi))
    v_min = plane @ torch.stack([torch.cos(lo), torch.sin(lo)])  # 3
    v_max = plane @ torch.stack([torch.cos(hi), torch.sin(hi)])
    he = torch.where(v_min[0] > v_max[0], torch.stack([v_min, v_max], 1),
                     torch.stack([v_max, v_min], 1))  # 3 x 2: H has the larger red OD
    conc = torch.linalg.inv(he.T @ he) @ he.T @ od  # 2 x P
    return he, conc


class Macenko(torch.nn.Module):
    """Normalise images to a reference stain matrix and maximal concentrations.

    ``Macenko()(images)`` maps ``B x 3 x H x W`` (or ``3 x H x W``) in [0, 1] to the same
    shape; each image's stains are estimated on that image alone. Tiles with too few tissue
    pixels are returned unchanged when ``skip_background`` (else a ValueError).
    """

    def __init__(self, he_ref=HE_REF, max_c_ref=MAX_C_REF, *, io: float = 240.0,
                 alpha: float = 1.0, beta: float = 0.15, skip_background: bool = True,
                 clip: bool = True) -> None:
        super().__init__()
        self.register_buffer("he_ref", torch.as_tensor(he_ref, dtype=torch.float64))  # 3 x 2
        self.register_buffer("max_c_ref", torch.as_tensor(max_c_ref, dtype=torch.float64))  # 2
        self.io, self.alpha, self.beta = io, alpha, beta
        self.skip_background, self.clip = skip_background, clip

    @classmethod
    def fit(cls, target: torch.Tensor, **kwargs) -> Macenko:
        """Reference stains and 99th-percentile concentrations of a target ``3 x H x W``."""
        opts = {k: kwargs[k] for k in ("io", "alpha", "beta") if k in kwargs}
        with torch.no_grad():
            he, conc = macenko_stains(target.double(), **opts)
            max_c = torch.quantile(conc, 0.99, dim=1)
        return cls(he, max_c, **kwargs)

    def normalise_one(self, image: torch.Tensor) -> torch.Tensor:
        he, conc = macenko_stains(image, io=self.io, alpha=self.alpha, beta=self.beta)
        max_c = torch.quantile(conc, 0.99, dim=1)  # 2
        conc = conc * (self.max_c_ref.to(conc) / max_c)[:, None]
        od = self.he_ref.to(conc) @ conc  # 3 x P
        out = od_to_rgb(od, self.io).reshape(image.shape)
        return out.clamp(0, 1) if self.clip else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B x) 3 x H x W
        if images.dim() == 3:
            return self.forward(images[None])[0]
        outs = []
        for image in images:
            try:
                outs.append(self.normalise_one(image))
            except ValueError:
                if not self.skip_background:
                    raise
                outs.append(image)
        return torch.stack(outs)
