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

Scores. Raw PSNR punishes what no attacker can recover: with InstanceNorm/GroupNorm after the
first convolution the gradient is (up to zero-padded borders) invariant to a positive rescaling
and a per-channel shift of the image, so a perfect reconstruction of the structure at another
contrast scores badly. Every reconstruction is therefore also scored after a per-channel affine
fit (least squares a_c * x_c + b_c onto the original, a generous allowance: it also forgives
per-channel scales the model would see) by PSNR and SSIM, and by the Pearson correlation of its
pixels with the original's (per channel, averaged). Each score has a flat-colour baseline (the
tile's per-channel mean everywhere, which is also what the affine fit makes of any flat guess;
its correlation is 0): a reconstruction that does not beat it learnt nothing but the colour.
The affine fit can always fall back to that mean (slope 0), so its PSNR is never below the flat
baseline: "beats flat" asks for a margin of ``MARGIN_DB`` = 1 dB, i.e. the fit explains ~21% of
the tile's variance (1 - 10^(-0.1); a pixel correlation of about 0.45).

Restarts are selected by the attacker's own objective (the gradient-matching loss of the
returned image), never by a score against the original, which the attacker cannot see.

Failing to invert is not a privacy guarantee: it only shows that this attack did not succeed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
        restarts: independent random starts; the one whose final image has the lowest
            gradient-matching objective is kept (the attacker's own criterion).
        known_target: segmentation only: give the attacker the true mask (it optimises the image
            only: the "labels known" attacker of iDLG, for masks).
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


@dataclass(frozen=True)
class Inversion:
    """Result of :func:`invert`.

    Attributes:
        image: the kept reconstruction, 1 x 3 x H x W in [0, 1].
        loss: its objective (cosine distance + TV term), recomputed at the returned image.
        cosine: its cosine distance alone.
        restart_losses: the final objective of every restart, in order (``loss`` is their min).
    """

    image: torch.Tensor
    loss: float
    cosine: float
    restart_losses: tuple[float, ...]


def _objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, observed: list[torch.Tensor],
               loss_fn: LossFn, tv_weight: float, *,
               create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, cosine distance) of image ``x`` with target ``y`` against ``observed``."""
    grads = parameter_gradients(model, x, y, loss_fn, create_graph=create_graph)
    cos = cosine_distance(grads, observed)
    return cos + tv_weight * total_variation(x), cos


def invert(model: nn.Module, observed: list[torch.Tensor], shape: tuple[int, ...], *,
           task: str, cfg: AttackConfig, generator: torch.Generator,
           target: torch.Tensor | None = None) -> Inversion:
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
        The restart with the lowest final objective (never chosen by a score against the
        original: this function does not see it).
    """
    observed = [g.detach() for g in observed]
    if task == "classification":
        label = torch.tensor([recover_label(observed, model)])
        loss_fn: LossFn = F.cross_entropy
    elif task == "segmentation":
        loss_fn = segmentation_loss
        if cfg.known_target and target is None:
            raise ValueError("known_target needs the true mask: pass target=")
    else:
        raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
    best, best_loss, best_cos, losses = None, float("inf"), float("inf"), []
    for _ in range(cfg.restarts):
        x = torch.rand(shape, generator=generator).requires_grad_(True)  # 1 x 3 x H x W
        params = [x]
        mask_logits = None
        if task == "segmentation" and not cfg.known_target:
            mask_logits = torch.randn((shape[0], 1, *shape[2:]), generator=generator)
            mask_logits.requires_grad_(True)  # 1 x 1 x H x W
            params.append(mask_logits)

        def label_of() -> torch.Tensor:
            if task == "classification":
                return label
            return torch.sigmoid(mask_logits) if mask_logits is not None else target

        opt = torch.optim.Adam(params, lr=cfg.lr)
        steps = [int(cfg.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=0.1)
        for _ in range(cfg.iterations):
            opt.zero_grad()
            objective, _ = _objective(model, x, label_of(), observed, loss_fn, cfg.tv_weight,
                                      create_graph=True)
            objective.backward()
            for p in params:
                p.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(0, 1)
        final, cos = _objective(model, x, label_of().detach(), observed, loss_fn,
                                cfg.tv_weight, create_graph=False)
        losses.append(float(final.detach()))
        if losses[-1] < best_loss:
            best, best_loss, best_cos = x.detach().clone(), losses[-1], float(cos)
    assert best is not None
    return Inversion(best, best_loss, best_cos, tuple(losses))


def affine_fit(original: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """``recon`` mapped per channel by the least-squares a_c * recon_c + b_c onto ``original``,
    clipped to [0, 1] (both H x W x C). A flat channel maps to the original's channel mean.

    The fitted values are the projection of the original onto span{recon_c, 1}, so any affine
    copy a * recon + b (a != 0) of a reconstruction gets exactly the same fit (numpy lstsq).
    """
    out = np.empty(original.shape, dtype=np.float64)
    for c in range(original.shape[-1]):
        x = recon[..., c].astype(np.float64).ravel()
        design = np.stack([x, np.ones_like(x)], axis=1)  # HW x 2
        coef, *_ = np.linalg.lstsq(design, original[..., c].astype(np.float64).ravel(),
                                   rcond=None)
        out[..., c] = (design @ coef).reshape(original.shape[:-1])
    return np.clip(out, 0.0, 1.0)


def pixel_correlation(original: np.ndarray, recon: np.ndarray) -> float:
    """Pearson correlation of the pixels, per channel, averaged (0 for a flat channel)."""
    rs = []
    for c in range(original.shape[-1]):
        a, b = original[..., c].ravel(), recon[..., c].ravel()
        rs.append(0.0 if np.ptp(a) == 0 or np.ptp(b) == 0 else float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(rs))


SCORES = ("psnr", "ssim", "psnr_affine", "ssim_affine", "corr")
MARGIN_DB = 1.0  # affine-fit PSNR over the flat baseline that counts as "beats flat"


def image_scores(original: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """Scores of a reconstruction; both H x W x 3 float in [0, 1] (PSNR/SSIM: scikit-image).

    Returns:
        psnr (dB) and ssim of the raw reconstruction; psnr_affine and ssim_affine after the
        per-channel affine fit (:func:`affine_fit`); corr (:func:`pixel_correlation`).
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    def psnr(x: np.ndarray) -> float:  # identical images: infinite (skimage warns on log10(0))
        return float("inf") if np.array_equal(original, x) else float(
            peak_signal_noise_ratio(original, x, data_range=1.0))

    def ssim(x: np.ndarray) -> float:
        return float(structural_similarity(original, x, data_range=1.0, channel_axis=-1))

    fitted = affine_fit(original, recon)
    return {"psnr": psnr(recon), "ssim": ssim(recon), "psnr_affine": psnr(fitted),
            "ssim_affine": ssim(fitted), "corr": pixel_correlation(original, recon)}


def flat_baseline(original: np.ndarray) -> np.ndarray:
    """The image's own mean colour everywhere: what "learning nothing but the colour" scores."""
    return np.broadcast_to(original.mean(axis=(0, 1), keepdims=True), original.shape).copy()


def run_start_weights(run_dir: Path | None) -> tuple[dict[str, np.ndarray], str]:
    """The global weights a client of a run would start from: final, else the last
    checkpoint's; ``({}, note)`` when the run has neither (attack the initial weights)."""
    from histofed.engine.rundir import list_checkpoints, load_payload

    if run_dir is None:
        return {}, "initial weights (seeded)"
    if (Path(run_dir) / "final" / "global.npz").exists():
        return load_payload(Path(run_dir) / "final" / "global").arrays, "final global weights"
    ckpts = list_checkpoints(Path(run_dir))
    if ckpts:
        return load_payload(ckpts[-1] / "server").arrays, f"checkpoint {ckpts[-1].name}"
    return {}, "initial weights (no checkpoint yet)"


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
        cfg: attack hyperparameters (``known_target``: the attacker is given the mask).
        seed: seeds the defence noise and the attack's random starts.

    Returns:
        (rows: one dict per tile x defence with every score of :data:`SCORES`, its flat-colour
         baseline ``flat_<score>``, the kept restart's ``cosine_distance`` and ``loss``,
         reconstructions: per tile, one S x S x 3 array per defence).
    """
    model.train()
    loss_fn: LossFn = segmentation_loss if task == "segmentation" else F.cross_entropy
    rows, recons = [], []
    for i, (tile, mask) in enumerate(zip(tiles, masks, strict=True)):
        x = torch.from_numpy(tile).permute(2, 0, 1)[None].float()  # 1 x 3 x S x S
        if task == "segmentation":
            target = torch.from_numpy(np.asarray(mask, np.float64))[None, None].float()  # 1x1xSxS
        else:
            target = torch.tensor([int(np.mean(mask) > 0.25)])
        grads = parameter_gradients(model, x, target, loss_fn)
        flat = image_scores(tile, flat_baseline(tile))
        per_tile = []
        for j, d in enumerate(defences):
            noise = torch.Generator().manual_seed(int(seed) * 1_000_003 + 1009 * i + j)
            observed = defend(grads, clip=d.clip, sigma=d.sigma, generator=noise)
            start = torch.Generator().manual_seed(int(seed) * 1_000_003 + 1009 * i + 997)
            inv = invert(model, observed, tuple(x.shape), task=task, cfg=cfg,  # same start
                         generator=start, target=target if task == "segmentation" else None)
            rec_np = inv.image[0].permute(1, 2, 0).double().numpy()  # S x S x 3
            row = {"tile": i, "defence": d.label, "clip": d.clip, "sigma": d.sigma,
                   **image_scores(tile, rec_np), **{f"flat_{k}": v for k, v in flat.items()},
                   "cosine_distance": inv.cosine, "loss": inv.loss,
                   "restart_losses": list(inv.restart_losses)}
            if task == "classification":
                row["label_recovered"] = recover_label(observed, model) == int(target.item())
            rows.append(row)
            per_tile.append(rec_np)
        recons.append(per_tile)
    return rows, recons


def summarize(rows: list[dict]) -> list[dict]:
    """Mean of every score and its flat baseline per defence (in first-seen order).

    ``beats_flat``: the scale-invariant affine-fit PSNR beats the flat baseline by at least
    ``MARGIN_DB`` (the fit never scores below it); ``beats_flat_raw``: raw PSNR above flat.
    """
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["defence"], {"defence": r["defence"], "clip": r["clip"],
                                      "sigma": r["sigma"], "_rows": []})["_rows"].append(r)
    summary = []
    for d in out.values():
        rs = d.pop("_rows")
        keys = [*SCORES, *(f"flat_{k}" for k in SCORES), "cosine_distance"]
        d.update({k: float(np.mean([r[k] for r in rs])) for k in keys})
        d["tiles"] = len(rs)
        d["beats_flat"] = d["psnr_affine"] >= d["flat_psnr_affine"] + MARGIN_DB
        d["beats_flat_raw"] = d["psnr"] > d["flat_psnr"]
        summary.append(d)
    return summary
