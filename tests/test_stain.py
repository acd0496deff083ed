"""Differentiable stain normalisation: gradients reach the pixels (gradcheck), forward values
match independent computations (scikit-image's L*a*b*, a numpy Macenko, stains we planted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histofed.stain import (
    Identity,
    Macenko,
    Reinhard,
    lab_to_rgb,
    macenko_stains,
    make_normalizer,
    od_to_rgb,
    rgb_to_lab,
    rgb_to_od,
)

HE_TRUE = np.array([[0.65, 0.25], [0.70, 0.85], [0.29, 0.45]])  # H and E columns (OD > 0.15)
HE_TRUE = HE_TRUE / np.linalg.norm(HE_TRUE, axis=0)


def he_tile(h: int, w: int, seed: int, pure: bool = False) -> torch.Tensor:
    """A 3 x h x w float64 tile made by Beer-Lambert from HE_TRUE and random concentrations
    (with ``pure``: a third of the pixels only H, a third only E)."""
    rng = np.random.default_rng(seed)
    conc = rng.uniform(0.3, 1.2, size=(2, h * w))
    if pure:
        third = h * w // 3
        conc[0, :third] += 0.5  # pure pixels still count as tissue (OD > beta)
        conc[1, third:2 * third] += 0.5
        conc[1, :third] = 0.0
        conc[0, third:2 * third] = 0.0
    od = torch.as_tensor(HE_TRUE @ conc)
    return od_to_rgb(od).reshape(3, h, w)


def test_lab_matches_scikit_image():
    color = pytest.importorskip("skimage.color")
    rgb = np.random.default_rng(0).uniform(0, 1, size=(6, 7, 3))
    rgb[0, 0] = 0.0  # the linear branches
    rgb[0, 1] = 0.01
    lab = rgb_to_lab(torch.as_tensor(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(lab, color.rgb2lab(rgb), atol=1e-4)
    back = lab_to_rgb(torch.as_tensor(lab).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, color.lab2rgb(color.rgb2lab(rgb)), atol=1e-5)
    np.testing.assert_allclose(back, rgb, atol=1e-5)


def test_od_round_trip_by_hand():
    # OD of a pixel 239/255 with I_0 = 240 is -log(240/240) = 0; 59/255 -> -log(60/240) = log 4
    rgb = torch.tensor([239.0, 59.0, 0.0]).reshape(3, 1, 1) / 255
    np.testing.assert_allclose(rgb_to_od(rgb).flatten().numpy(), [0.0, np.log(4), np.log(240)],
                               rtol=1e-6)
    torch.testing.assert_close(od_to_rgb(rgb_to_od(rgb)), rgb)


def test_macenko_recovers_the_stains_it_was_made_of():
    he, conc = macenko_stains(he_tile(24, 24, seed=1, pure=True))
    cos = (he / he.norm(dim=0)).T @ torch.as_tensor(HE_TRUE)  # 2 x 2
    assert cos[0, 0] > 0.999 and cos[1, 1] > 0.999  # H first, E second
    assert conc.shape == (2, 24 * 24)


def numpy_macenko_stains(img: np.ndarray, io=240.0, alpha=1.0, beta=0.15) -> np.ndarray:
    """The algorithm as usually written in numpy (H x W x 3 in 0..255), independently."""
    od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1) / io)
    od_hat = od[~np.any(od < beta, axis=1)]
    _, eigvecs = np.linalg.eigh(np.cov(od_hat.T))
    t_hat = od_hat @ eigvecs[:, 1:3]
    phi = np.arctan2(t_hat[:, 1], t_hat[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v_min = eigvecs[:, 1:3] @ np.array([np.cos(lo), np.sin(lo)])
    v_max = eigvecs[:, 1:3] @ np.array([np.cos(hi), np.sin(hi)])
    he = np.array([v_min, v_max]).T if v_min[0] > v_max[0] else np.array([v_max, v_min]).T
    return he * np.sign(he.sum(axis=0))  # eigenvector signs are arbitrary: point into OD > 0


def test_macenko_stains_match_a_numpy_implementation():
    tile = he_tile(20, 20, seed=2)
    tile = (tile + 0.03 * torch.rand(tile.shape, generator=torch.Generator().manual_seed(0),
                                     dtype=tile.dtype)).clamp(0, 1)  # off the stain plane
    he, _ = macenko_stains(tile)
    ref = numpy_macenko_stains(tile.permute(1, 2, 0).numpy() * 255)
    np.testing.assert_allclose(he.numpy(), ref, atol=1e-8)


def test_macenko_normalises_to_the_reference():
    """A tile made from the reference stains with the reference max concentrations is mapped
    to itself; any tile ends with the reference stain matrix."""
    norm = Macenko(clip=False)
    tile = he_tile(16, 16, seed=3, pure=True)
    out = norm(tile)
    he_out, conc_out = macenko_stains(out)
    cos = (he_out / he_out.norm(dim=0)).T @ (norm.he_ref / norm.he_ref.norm(dim=0))
    assert cos[0, 0] > 0.999 and cos[1, 1] > 0.999
    np.testing.assert_allclose(torch.quantile(conc_out, 0.99, dim=1).numpy(),
                               norm.max_c_ref.numpy() * (norm.he_ref.norm(dim=0) /
                                                         he_out.norm(dim=0)).numpy(), rtol=0.02)
    fitted = Macenko.fit(tile, clip=False)
    torch.testing.assert_close(fitted(tile), tile, atol=1e-8, rtol=1e-6)  # own reference: identity


def test_macenko_gradcheck_reaches_every_pixel():
    tile = he_tile(4, 4, seed=4).requires_grad_(True)  # 48 inputs, 48 outputs
    norm = Macenko(clip=False)
    assert torch.autograd.gradcheck(norm.normalise_one, (tile,), eps=1e-6, atol=1e-5)
    norm(tile[None]).sum().backward()
    assert tile.grad is not None and (tile.grad.abs() > 0).all()


def test_reinhard_matches_target_statistics_and_gradcheck():
    target = he_tile(12, 12, seed=5)
    source = he_tile(12, 12, seed=6) * 0.9 + 0.05
    norm = Reinhard.from_target(target, clip=False)
    lab = rgb_to_lab(norm(source)).reshape(3, -1)
    tlab = rgb_to_lab(target).reshape(3, -1)
    np.testing.assert_allclose(lab.mean(1).numpy(), tlab.mean(1).numpy(), atol=1e-6)
    np.testing.assert_allclose(lab.std(1).numpy(), tlab.std(1).numpy(), rtol=1e-5)
    small = source[:, :4, :4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(norm, (small,), eps=1e-6, atol=1e-5)


def test_background_tiles_and_names():
    blank = torch.ones(3, 6, 6, dtype=torch.float64)  # white: OD < beta everywhere
    with pytest.raises(ValueError, match="only 0 tissue pixels.*background"):
        macenko_stains(blank)
    assert torch.equal(Macenko()(blank), blank)  # skip_background: left as it is
    with pytest.raises(ValueError, match="background"):
        Macenko(skip_background=False)(blank)
    assert isinstance(make_normalizer("none"), Identity)
    with pytest.raises(ValueError, match="needs a target"):
        make_normalizer("reinhard")
    with pytest.raises(ValueError, match="choose 'none', 'macenko' or 'reinhard'"):
        make_normalizer("vahadane")
