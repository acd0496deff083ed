"""Gradient-inversion audit: hand-checked pieces (scores, the scale-invariant affine fit,
restart selection), and the attack's headline behaviour on small synthetic tiles (the probe:
succeeds undefended, still succeeds with clipping, fails with noise; a norm-free UNet: the
known-mask segmentation attack succeeds)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histofed.privacy.invert import (
    AttackConfig,
    MARGIN_DB,
    AttackConfig as _AttackConfig,
    Defence,
    ProbeLeNet,
    affine_fit,
    audit,
    cosine_distance,
    defend,
    flat_baseline,
    image_scores,
    invert,
    parameter_gradients,
    pixel_correlation,
    pick_tiles,
    recover_label,
    summarize,
    total_variation,
)


def _tile(size: int) -> np.ndarray:
    """A smooth, textured RGB tile in [0, 1] (size x size x 3)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    return np.stack([0.5 + 0.4 * np.sin(6 * xx + 1), 0.5 + 0.4 * np.cos(5 * yy),
                     0.5 + 0.3 * np.sin(4 * (xx + yy))], -1)


def test_objective_pieces_by_hand():
    e1, e2 = [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]
    assert float(cosine_distance(e1, e2)) == pytest.approx(1.0)
    assert float(cosine_distance(e1, [torch.tensor([3.0, 0.0])])) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance(e1, [torch.tensor([-1.0, 0.0])])) == pytest.approx(2.0)
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # 1 x 1 x 2 x 2: one step of 1 along x
    assert float(total_variation(x)) == pytest.approx(1.0)


def test_scores_by_hand():
    orig = np.zeros((8, 8, 3))
    assert image_scores(orig, orig + 0.1)["psnr"] == pytest.approx(20.0)  # MSE 0.01 -> 20 dB
    tile = _tile(8)
    assert image_scores(tile, tile)["ssim"] == pytest.approx(1.0)
    flat = flat_baseline(tile)
    np.testing.assert_allclose(flat[3, 5], tile.mean(axis=(0, 1)))


def test_affine_scores_ignore_a_per_channel_rescaling():
    tile = _tile(16)
    # an exact per-channel affine copy of the tile is a perfect reconstruction after the fit
    copy = tile * np.array([0.5, 0.2, 0.9]) + np.array([0.3, 0.1, 0.05])
    np.testing.assert_allclose(affine_fit(tile, copy), tile, atol=1e-12)
    assert image_scores(tile, copy)["corr"] == pytest.approx(1.0)
    assert image_scores(tile, copy)["psnr"] < 30  # the raw score punishes the scale
    # any reconstruction and its rescaled copy score the same after the fit
    recon = np.clip(tile[::-1] + 0.2 * _tile(16)[:, ::-1], 0, 1)
    scaled = recon * np.array([0.4, 0.7, 0.25]) + np.array([0.5, 0.0, 0.6])
    a, b = image_scores(tile, recon), image_scores(tile, scaled)
    for key in ("psnr_affine", "ssim_affine", "corr"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    # the flat guess: the fit maps any flat image to the tile's per-channel mean; corr 0
    np.testing.assert_allclose(affine_fit(tile, np.full_like(tile, 0.7)), flat_baseline(tile))
    flat = image_scores(tile, flat_baseline(tile))
    assert flat["psnr_affine"] == pytest.approx(flat["psnr"]) and flat["corr"] == 0.0
    assert pixel_correlation(tile, 1 - tile) == pytest.approx(-1.0)


def test_restarts_are_kept_by_matching_loss(one_thread):
    tile = _tile(8)
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float()
    net = ProbeLeNet(size=8, generator=torch.Generator().manual_seed(0))
    observed = parameter_gradients(net, x, torch.tensor([1]), F.cross_entropy)
    cfg = _AttackConfig(iterations=15, restarts=3)
    inv = invert(net, observed, tuple(x.shape), task="classification", cfg=cfg,
                 generator=torch.Generator().manual_seed(0))
    assert len(inv.restart_losses) == 3 and len(set(inv.restart_losses)) == 3
    assert inv.loss == min(inv.restart_losses)
    # the kept image's own objective is the reported one (the attacker's criterion)
    grads = parameter_gradients(net, inv.image, torch.tensor([1]), F.cross_entropy)
    recomputed = float(cosine_distance(grads, observed) + cfg.tv_weight * total_variation(
        inv.image))
    assert recomputed == pytest.approx(inv.loss, rel=1e-5)
    with pytest.raises(ValueError, match="known_target needs the true mask"):
        invert(net, observed, tuple(x.shape), task="segmentation",
               cfg=_AttackConfig(known_target=True), generator=torch.Generator())


def test_idlg_recovers_the_label():
    x = torch.from_numpy(_tile(8)).permute(2, 0, 1)[None].float()
    net = ProbeLeNet(size=8, num_classes=3, generator=torch.Generator().manual_seed(0))
    for label in range(3):
        grads = parameter_gradients(net, x, torch.tensor([label]), F.cross_entropy)
        assert recover_label(grads, net) == label


def test_defence_clips_to_c_and_adds_sigma_c_noise():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]  # norm 13
    gen = torch.Generator().manual_seed(0)
    clipped = defend(grads, clip=0.5, sigma=0.0, generator=gen)
    np.testing.assert_allclose(torch.cat(clipped).numpy(), [3 / 26, 4 / 26, 12 / 26], rtol=1e-6)
    noisy = defend([torch.zeros(40000)], clip=0.5, sigma=0.2, generator=gen, update_norm=0.0)
    assert float(noisy[0].std()) == pytest.approx(0.1, rel=0.03)  # sigma * C


def test_attack_succeeds_without_noise_and_fails_with_it(one_thread):
    tile = _tile(16)
    probe = ProbeLeNet(size=16, generator=torch.Generator().manual_seed(0))
    defences = [Defence("none"), Defence("clip only", clip=0.1),
                Defence("noise", clip=0.1, sigma=0.05)]
    rows, recons = audit(probe, [tile], [tile[..., 0] > 0.5], defences, task="classification",
                         cfg=AttackConfig(iterations=200), seed=0)
    by = {s["defence"]: s for s in summarize(rows)}
    flat = by["none"]["flat_psnr"]
    assert by["none"]["psnr"] > max(20.0, flat + 5)  # the attack works
    assert by["clip only"]["psnr"] > flat + 5  # clipping alone does not defend
    assert by["noise"]["psnr"] < flat and not by["noise"]["beats_flat"]  # noise does
    assert by["none"]["corr"] > 0.8 and abs(by["noise"]["corr"]) < 0.3
    assert all(r["label_recovered"] for r in rows)
    assert recons[0][0].shape == (16, 16, 3)


def test_pick_tiles_takes_the_most_textured_crop():
    img = np.zeros((64, 64, 3), np.uint8)
    img[40:, 40:] = (255 * _tile(24)).astype(np.uint8)  # texture only in one corner
    tiles, masks = pick_tiles([img], [np.ones((64, 64), np.uint8)], n=2, size=16,
                              rng=np.random.default_rng(0), candidates=50)
    assert len(tiles) == 2 and tiles[0].shape == (16, 16, 3) and masks[0].shape == (16, 16)
    assert all(t.std() > 0.05 for t in tiles)  # never the flat black background
    with pytest.raises(ValueError, match="smaller than the 128 tile"):
        pick_tiles([img], [img[..., 0]], n=1, size=128, rng=np.random.default_rng(0))


def test_segmentation_attack_succeeds_on_a_norm_free_unet(one_thread):
    """The known-mask attacker (the mask is the label) on a norm-free UNet rebuilds a 16 x 16
    tile well beyond the flat-colour guess under the scale-invariant scores."""
    from histofed.models.unet import build_unet

    tile = _tile(16)
    torch.manual_seed(0)
    net = build_unet(channels=(16, 32, 64), norm="none", num_res_units=0)
    assert not any("norm" in type(m).__name__.lower() for m in net.modules())
    cfg = _AttackConfig(iterations=150, tv_weight=0.05, known_target=True)
    rows, _ = audit(net, [tile], [(tile[..., 0] > 0.5).astype(float)], [Defence("none")],
                    task="segmentation", cfg=cfg, seed=0)
    (s,) = summarize(rows)
    assert s["beats_flat"] and s["psnr_affine"] > s["flat_psnr_affine"] + 3 * MARGIN_DB
    assert s["corr"] > 0.6 and s["ssim_affine"] > s["flat_ssim_affine"] + 0.3
