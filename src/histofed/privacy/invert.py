"""Gradient-inversion audit (Geiping et al., NeurIPS 2020, "Inverting Gradients"), torch only.

An honest-but-curious server sees one client's update and tries to rebuild the training image
from it. We play that server in the setting most favourable to it: the update is one SGD step
on a single image (the gradient itself, up to the step size), the attacker knows the model and
the weights the client started from. Reconstruction:

    x* = argmin_x  1 - cos(grad L(x, y), g_observed)  +  tv_weight * TV(x)

with the cosine taken over all parameter gradients at once, Adam on the *sign* of the
gradient w.r.t. x, the image kept in [0, 1], and step decay at 3/8, 5/8, 7/8 of the iterations
(all as in the paper). Labels: for classification the label is read from the last layer's bias
gradient (iDLG, Zhao et al. 2020: only the true class has a negative bias gradient under
cross-entropy); for segmentation no such trick exists, so the mask is optimised jointly with
the image (as logits), or given to the attacker (``known_target=True``, a stronger attacker).

The defences applied to the observed update are DP-FedAvg's (privacy/dp.py): clipping to norm
C and Gaussian noise of standard deviation sigma * C. Clipping only rescales the update, and the
cosine objective ignores scale, so clipping alone cannot defend (the audit shows it).

Failing to invert is not a privacy guarantee: it only shows that this attack did not succeed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histofed.privacy.dp import clip_and_noise

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackConfig:
    """Hyperparameters of the inversion (defaults: small, CPU-friendly versions of the paper's).

    Attributes:
        iterations: Adam steps.
        lr: Adam step size on the signed image gradient.
        tv_weight: weight of the total-variation prior.
        restarts: independent random starts; the one with the lowest objective is kept.
        known_target: segmentation only: give the attacker the true mask.
    """

    iterations: int = 300
    lr: float = 0.1
    tv_weight: float = 1e-2
    restarts: int = 1
    known_target: bool = False


class ProbeLeNet(nn.Module):
    """The model of "Deep Leakage from Gradients" (Zhu et al. 2019), the standard probe of
    gradient leakage: three 5x5 conv layers of 12 channels with sigmoid, one linear layer;
    weights drawn uniformly from [-0.5, 0.5] as in that paper. Input B x 3 x S x S, S % 4 == 0.
    """

    def __init__(self, *, size: int = 32, num_classes: int = 2,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"ProbeLeNet needs a tile size divisible by 4, got {size}")
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid())
        self.fc = nn.Linear(12 * (size // 4) ** 2, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.rand(p.shape, generator=generator) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x 3 x S x S -> B x classes
        return self.fc(self.body(x).flatten(1))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE on logits (B x 1 x H x W), the first term of histofed's segmentation loss."""
    return F.binary_cross_entropy_with_logits(logits, target)


def parameter_gradients(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                        loss_fn: LossFn, *, create_graph: bool = False) -> list[torch.Tensor]:
    """Gradient of ``loss_fn(model(inputs), target)`` w.r.t. every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(inputs), target)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def defend(grads: list[torch.Tensor], *, clip: float | None, sigma: float,
           generator: torch.Generator, update_norm: float | None = None) -> list[torch.Tensor]:
    """What the server sees of a client update under DP-FedAvg's defence.

    The update is taken as the gradient rescaled to L2 norm ``update_norm`` (default: ``clip``,
    an update right at the clipping bound, the case most favourable to the attacker among
    clipped updates), then clipped to ``clip`` (None: no clipping) and given Gaussian noise of
    standard deviation ``sigma * clip`` per coordinate (privacy/dp.py). The cosine objective
    ignores the overall scale, so only the noise-to-signal ratio sigma * sqrt(d) matters when
    the update is at or above the bound.
    """
    grads = [g.detach() for g in grads]
    target = update_norm if update_norm is not None else clip
    if target is not None:
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        grads = [g * (target / norm) for g in grads] if norm > 0 else grads
    return clip_and_noise(grads, clip=clip, sigma=sigma, generator=generator)


def recover_label(grads: list[torch.Tensor], model: nn.Module) -> int:
    """iDLG: the class whose last-layer bias gradient is negative (single image, cross-entropy).

    Raises:
        ValueError: the model's last parameter is not a bias vector (no label to read).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names[-1].endswith("bias") or grads[-1].ndim != 1:
        raise ValueError(f"iDLG needs a final bias vector; the last parameter is {names[-1]!r}")
    return int(torch.argmin(grads[-1]).item())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (x: B x C x H x W)."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    return dx + dy


def cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """1 - <a, b> / (|a| |b|) over all tensors together (the paper's objective)."""
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    na = torch.sqrt(sum((x * x).sum() for x in a))
    nb = torch.sqrt(sum((y * y).sum() for y in b))
    return 1 - dot / (na * nb + 1e-12)


def invert(model: nn.Module, observed: list[torch.Tensor], shape: tuple[int, ...], *,
           task: str, cfg: AttackConfig, generator: torch.Generator,
           target: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Reconstruct one input from observed parameter gradients.

    Args:
        model: the model the client started from, in the mode it trained in.
        observed: gradients (or a scaled update) per trainable parameter, in parameter order.
        shape: input shape, e.g. (1, 3, 32, 32).
        task: "segmentation" or "classification".
        cfg: attack hyperparameters.
        generator: seeds the random starts.
        target: the true mask (segmentation with ``cfg.known_target``).

    Returns:
        (reconstruction 1 x 3 x H x W in [0, 1], final cosine distance).
    """
    observed = [g.detach() for g in observed]
    if task == "classification":
        label = torch.tensor([recover_label(observed, model)])
        loss_fn: LossFn = F.cross_entropy
    elif task == "segmentation":
        loss_fn = segmentation_loss
    else:
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
    best, best_score = None, float("inf")
    for _ in range(cfg.restarts):
        x = torch.rand(shape, generator=generator).requires_grad_(True)
        params = [x]
        mask_logits = None
        if task == "segmentation" and not cfg.known_target:
            mask_logits = torch.randn((shape[0], 1, *shape[2:]), generator=generator)
            mask_logits.requires_grad_(True)
            params.append(mask_logits)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        steps = [int(cfg.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=0.1)
        for _ in range(cfg.iterations):
            opt.zero_grad()
            if task == "classification":
                y = label
            elif mask_logits is not None:
                y = torch.sigmoid(mask_logits)
            else:
                assert target is not None, "known_target needs the true mask"
                y = target
            grads = parameter_gradients(model, x, y, loss_fn, create_graph=True)
            objective = cosine_distance(grads, observed) + cfg.tv_weight * total_variation(x)
            objective.backward()
            for p in params:
                p.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(0, 1)
        score = float(objective.detach())
        if score < best_score:
            best, best_score = x.detach().clone(), score
    assert best is not None
    return best, best_score


def image_scores(original: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of a reconstruction; both H x W x 3 float in [0, 1] (skimage)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    same = np.array_equal(original, recon)  # PSNR is infinite; skimage would warn on log10(0)
    psnr = float("inf") if same else float(peak_signal_noise_ratio(original, recon, data_range=1.0))
    ssim = float(structural_similarity(original, recon, data_range=1.0, channel_axis=-1))
    return {"psnr": psnr, "ssim": ssim}


def flat_baseline(original: np.ndarray) -> np.ndarray:
    """The image's own mean colour everywhere: what "learning nothing but the colour" scores."""
    return np.broadcast_to(original.mean(axis=(0, 1), keepdims=True), original.shape).copy()


@dataclass(frozen=True)
class Defence:
    """One column of the audit: clip to ``clip`` (None: no clipping), noise std ``sigma * clip``."""

    label: str
    clip: float | None = None
    sigma: float = 0.0


def pick_tiles(images: list[np.ndarray], masks: list[np.ndarray], *, n: int, size: int,
               rng: np.random.Generator,
               candidates: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` textured ``size`` x ``size`` crops (the most textured of ``candidates`` random
    crops per image, images taken in turn), so a flat-colour guess does not already score well.

    Returns:
        (tiles, each size x size x 3 float64 in [0, 1]; masks, each size x size float64 in {0, 1}).
    """
    tiles, tmasks = [], []
    for i in range(n):
        img, mask = images[i % len(images)], masks[i % len(masks)]
        h, w = img.shape[:2]
        if h < size or w < size:
            raise ValueError(f"image {i % len(images)} is {h} x {w}, smaller than the {size} tile")
        best, best_psnr = None, float("inf")
        for _ in range(candidates):
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            tile = img[y:y + size, x:x + size].astype(np.float64) / 255.0  # S x S x 3
            psnr = image_scores(tile, flat_baseline(tile))["psnr"]
            if psnr < best_psnr:
                crop_mask = (mask[y:y + size, x:x + size] > 0).astype(np.float64)  # S x S
                best, best_psnr = (tile, crop_mask), psnr
        assert best is not None
        tiles.append(best[0])
        tmasks.append(best[1])
    return tiles, tmasks


def audit(model: nn.Module, tiles: list[np.ndarray], masks: list[np.ndarray],
          defences: list[Defence], *, task: str, cfg: AttackConfig,
          seed: int) -> tuple[list[dict], list[list[np.ndarray]]]:
    """Attack every tile under every defence; score against the original and a flat guess.

    Args:
        model: the attacked architecture with the weights the client starts from (train mode).
        tiles: S x S x 3 float in [0, 1]; masks: S x S in {0, 1} (segmentation targets; for
            classification the label is 1 when more than a quarter of the tile is nucleus).
        defences: columns of the audit.
        task: "segmentation" or "classification".
        cfg: attack hyperparameters.
        seed: seeds the defence noise and the attack's random starts.

    Returns:
        (rows: one dict per tile x defence with psnr/ssim/flat_psnr/flat_ssim/cosine,
         reconstructions: per tile, one S x S x 3 array per defence).
    """
    model.train()
    loss_fn: LossFn = segmentation_loss if task == "segmentation" else F.cross_entropy
    rows, recons = [], []
    for i, (tile, mask) in enumerate(zip(tiles, masks, strict=True)):
        x = torch.from_numpy(tile).permute(2, 0, 1)[None].float()  # 1 x 3 x S x S
        if task == "segmentation":
            target = torch.from_numpy(mask)[None, None].float()  # 1 x 1 x S x S
        else:
            target = torch.tensor([int(mask.mean() > 0.25)])
        grads = parameter_gradients(model, x, target, loss_fn)
        flat = image_scores(tile, flat_baseline(tile))
        per_tile = []
        for j, d in enumerate(defences):
            noise = torch.Generator().manual_seed(int(seed) * 1_000_003 + 1009 * i + j)
            observed = defend(grads, clip=d.clip, sigma=d.sigma, generator=noise)
            start = torch.Generator().manual_seed(int(seed) * 1_000_003 + 1009 * i + 997)
            rec, score = invert(model, observed, tuple(x.shape), task=task, cfg=cfg,  # same start
                                generator=start, target=target if task == "segmentation" else None)
            rec_np = rec[0].permute(1, 2, 0).double().numpy()  # S x S x 3
            row = {"tile": i, "defence": d.label, "clip": d.clip, "sigma": d.sigma,
                   **image_scores(tile, rec_np), "flat_psnr": flat["psnr"],
                   "flat_ssim": flat["ssim"], "cosine_distance": score}
            if task == "classification":
                row["label_recovered"] = recover_label(observed, model) == int(target.item())
            rows.append(row)
            per_tile.append(rec_np)
        recons.append(per_tile)
    return rows, recons


def summarize(rows: list[dict]) -> list[dict]:
    """Mean PSNR/SSIM per defence (in first-seen order), with the flat-colour baseline."""
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["defence"], {"defence": r["defence"], "clip": r["clip"],
                                      "sigma": r["sigma"], "_rows": []})["_rows"].append(r)
    summary = []
    for d in out.values():
        rs = d.pop("_rows")
        d.update({k: float(np.mean([r[k] for r in rs]))
                  for k in ("psnr", "ssim", "flat_psnr", "flat_ssim")})
        d["tiles"] = len(rs)
        d["beats_flat"] = d["psnr"] > d["flat_psnr"]
        summary.append(d)
    return summary
