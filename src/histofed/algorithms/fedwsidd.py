"""FedWSIDD: federated whole-slide classification by exchanging distilled synthetic slides
(Jin et al., MICCAI 2025, arXiv 2506.15365; reference code github f1oNae/FedWSIDD).

Each hospital keeps its own MIL model (architectures may differ: ABMIL, CLAM-SB, TransMIL) and
shares no weights. It condenses its slides into a few synthetic ones, the server pools them, and
every hospital trains its own model on its real slides plus the pooled synthetic ones.

**Distillation** (distribution matching, Zhao & Bilen, WACV 2023). Site k learns ``ipc``
synthetic bags per class c, each of ``nps`` instances, S_c (ipc x nps x D), by minimising

    L(S) = sum_c || mean_{x in B_c} phi(A(x)) - mean_{s in S_c} phi(A(s)) ||^2

where B_c is one real class-c bag drawn afresh each step (as in the reference code) and phi an
embedding; SGD with lr 1.0 and momentum 0.5 as in the paper, through
:func:`histofed.algorithms.training.optimise`. ``init = "real"`` starts S_c from instances of
the site's class-c bags (after few steps they are still close to real instances: no formal
privacy claim is made), ``"noise"`` from N(0, 1) in the site's standardised space.

- Feature space (what the method runs in a federation): bags are feature bags (N x D,
  e.g. UCSB's 708 handcrafted features or CLAM .h5 bags), S_c are synthetic *feature* bags and
  phi is a random ReLU layer ``relu(x W + b)`` (W: D x embed_dim, N(0, 1/D)) drawn afresh each
  step from a seeded generator -- DM's random-network embedding, i.e. a random-feature MMD, so
  more than the first moment is matched; ``embed = "identity"`` matches plain means. A is the
  identity (features have no stain).
- Image space (``space = "images"``, :func:`distil_images`): on an image-bag federation
  (``synthetic-image-bags``, ``monuseg-organ-bags``: data/fed_image_bags.py) S_c are ipc
  synthetic bags of nps 3 x h x w patches, phi is the federation's fixed patch encoder and A
  its *differentiable* stain normaliser (histofed.stain, Macenko to a shared reference), so
  the gradient reaches the synthetic pixels; the real side is every class-c patch of the
  site (ours; the feature version draws one bag per step). The MIL models see phi(A(x)) for
  real and synthetic patches alike. ``upload = "images"`` sends the patches (``image_dtype``
  uint8 or float16, kind "synthetic-images"; each site encodes what it receives with the same
  phi and A), ``upload = "features"`` their phi(A(S)) features as the reference code does
  (kind "synthetic-bags"). The client reports the bytes of both forms (fedwsidd.jsonl:
  ``bytes_as_images``, ``bytes_as_features``); egress.jsonl logs what was sent, by kind.

**Exchange.** Round 1: pretrain the local model on real bags, distil, upload S (kind
"synthetic-bags", float32, or float16 standardised by the synthetic set's own statistics: see
:func:`encode_bags`). Features are uploaded in the federation's *raw* feature
space: a site that standardises its features (``ucsb-breast-bags`` does, with its own training
statistics) undoes its standardisation before upload and applies its own on receipt (ours: the
reference code shares one feature extractor and no standardisation). The server pools the
uploads per class: the union (default) or, as in the reference code, the mean over sites of
each (class, index) synthetic bag. Round 2: the server sends the pooled set; each site trains
its pretrained model on real + pooled synthetic bags (one bag per step, MIL loss plus CLAM's
instance loss where the model has one) and uploads nothing.

**Why two engine rounds** (ours): the engine's ``one_shot = True`` runs a single round of
fit -> aggregate -> evaluate, and an evaluate job's private state is not kept, so the second
client step (training on the pooled set) needs a second round. Communication is still
one-shot: one upload per site (round 1) and one download (round 2); round 2 uploads nothing.
``[run].rounds`` must be 2; round 1's evaluation scores the pretrained, local-only models.

Classes a site does not hold are not distilled there (as in the reference code); the pooled set
holds every class some site has. Not supported yet: DP (feddp around this method), held-out
sites (``[federation].unseen``) see no personal model of their architecture unless one matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histofed.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientInfo,
    Payload,
    ServerContext,
    evaluate_model,
    prefixed,
    register_algorithm,
    unprefixed,
)
from histofed.algorithms.training import make_optimizer, optimise, where
from histofed.algorithms.weights import get_weights, load_weights
from histofed.config import ConfigError
from histofed.options import option


# ---- pure maths (tested on hand-made arrays) ------------------------------------------------
def random_relu_embedding(dim: int, embed_dim: int, gen: torch.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """W (dim x embed_dim, N(0, 1/dim)) and b (embed_dim, N(0, 1)) of phi(x) = relu(x W + b)."""
    w = torch.randn(dim, embed_dim, generator=gen) / dim ** 0.5
    b = torch.randn(embed_dim, generator=gen)
    return w, b


def dm_loss(real_by_class: list[torch.Tensor], syn_by_class: list[torch.Tensor],
            phi=lambda x: x) -> torch.Tensor:
    """sum_c || mean phi(real_c) - mean phi(syn_c) ||^2.

    Args:
        real_by_class: per class, real instances ``N_c x D``.
        syn_by_class: per class, synthetic instances ``M_c x D`` (all synthetic bags of c).
        phi: the embedding (``... x D -> ... x E``).
    """
    loss = torch.zeros((), dtype=syn_by_class[0].dtype)
    for real, syn in zip(real_by_class, syn_by_class, strict=True):
        loss = loss + ((phi(real).mean(0) - phi(syn).mean(0)) ** 2).sum()
    return loss


def pool_synthetic(uploads: list[tuple[np.ndarray, np.ndarray]], how: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Pool per-site synthetic bags ``(bags M_k x nps x D, labels M_k)``.

    ``how = "union"``: every bag of every site. ``"mean"``: per class c and index i, the mean of
    the i-th class-c bag over the sites that hold class c (the reference code's "mixup"); needs
    the same ``ipc`` and ``nps`` at every site. Output sorted by class (stable).
    """
    if not uploads:
        raise ValueError("no synthetic bags were uploaded (every site failed?)")
    if how == "union":
        bags = np.concatenate([b for b, _ in uploads]).astype(np.float32)
        labels = np.concatenate([y for _, y in uploads]).astype(np.int64)
        order = np.argsort(labels, kind="stable")
        return bags[order], labels[order]
    if how != "mean":
        raise ValueError(f"unknown pooling {how!r}; use 'union' or 'mean'")
    out_b, out_y = [], []
    for c in sorted({int(k) for _, y in uploads for k in y}):
        per_site = [b[y == c].astype(np.float64) for b, y in uploads if (y == c).any()]
        if len({p.shape for p in per_site}) > 1:
            raise ValueError(f"pool = 'mean' needs the same ipc and nps at every site; class {c} "
                             f"has shapes {sorted({p.shape for p in per_site})}")
        mean = np.mean(per_site, axis=0)  # ipc x nps x D
        out_b.append(mean.astype(np.float32))
        out_y.append(np.full(len(mean), c, np.int64))
    return np.concatenate(out_b), np.concatenate(out_y)


def encode_bags(bags: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Synthetic bags (``M x nps x D`` float, raw feature space) as arrays for the wire.

    float32: as they are. float16: standardised by the synthetic set's *own* per-feature mean
    and std (sent along in float32, ``2 x D`` values), because raw features such as UCSB's
    (up to ~1e4 with a std near 1 for some) lose whole standard deviations in float16
    (measured: up to 98 std on 18 of its 708 features); standardised, the error is ~1e-3 std.
    """
    bags = np.asarray(bags, np.float32)
    if dtype == "float32":
        return {"bags": bags}
    flat = bags.reshape(-1, bags.shape[-1]).astype(np.float64)
    offset, scale = flat.mean(0), flat.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    return {"bags": ((bags - offset) / scale).astype(np.float16),
            "offset": offset.astype(np.float32), "scale": scale.astype(np.float32)}


def decode_bags(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`encode_bags`: ``M x nps x D`` float32 in the raw feature space."""
    bags = arrays["bags"].astype(np.float32)
    if "scale" in arrays:
        bags = bags * arrays["scale"] + arrays["offset"]
    return bags.astype(np.float32)


def encode_images(images: np.ndarray, dtype: str) -> np.ndarray:
    """Synthetic patches in [0, 1] (any shape) for the wire: uint8 (``round(255 x)``, 1 byte a
    value, error <= 1/510) or float16 (2 bytes, error ~5e-4)."""
    images = np.clip(np.asarray(images, np.float32), 0, 1)
    if dtype == "uint8":
        return np.round(images * 255).astype(np.uint8)
    if dtype == "float16":
        return images.astype(np.float16)
    raise ValueError(f"image_dtype must be 'uint8' or 'float16', got {dtype!r}")


def decode_images(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`encode_images` (``arrays["images"]``): float32 in [0, 1]."""
    images = arrays["images"]
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def _image_data(ctx: ClientContext):
    """The site's training ImageBagDataset (patches, phi, A), or a clear error."""
    data = ctx.data.train
    if not hasattr(data, "patches"):
        raise ValueError(f"client {ctx.name!r}: space = 'images' needs a federation of image "
                         "bags (synthetic-image-bags, monuseg-organ-bags), whose patches and "
                         "encoder phi are at hand; this federation's bags are features only")
    return data


def mil_loss(ctx: ClientContext, model: nn.Module, bag: torch.Tensor,
             target: torch.Tensor) -> torch.Tensor:
    """Task loss of one bag (``1 x N x D``), plus the model's own auxiliary loss if it has one
    (CLAM-SB's instance clustering loss)."""
    logits = ctx.task.forward(model, bag)
    loss = ctx.task.loss(logits, target)
    aux = getattr(model, "auxiliary_loss", None)
    return loss + aux(target) if aux is not None else loss


def distil_images(real_by_class: list[torch.Tensor], *, ipc: int, nps: int, size: int,
                  encoder: nn.Module, normaliser: nn.Module | None = None, steps: int = 100,
                  lr: float = 1.0, momentum: float = 0.5, init: str = "noise",
                  seed: int = 0, where_: str = "distil_images") -> tuple[torch.Tensor, dict]:
    """Image-space distribution matching with the stain normaliser A inside the loss.

    Args:
        real_by_class: per class, real patches ``P_c x 3 x size x size`` in [0, 1] (one or
            several real slides' patches).
        ipc, nps, size: synthetic slides per class, patches per slide, patch side.
        encoder: phi, fixed (e.g. models.encoders.RandomCNNEncoder).
        normaliser: A (histofed.stain), None for plain DM.
        init: "noise" (uniform in [0, 1]) or "real" (patches drawn from real_by_class).

    Returns:
        ``S`` (C x ipc x nps x 3 x size x size, detached, clamped to [0, 1]) and the trainer log
        (with ``loss_first`` / ``loss_last``: mean DM loss of the first / last tenth of steps).
    """
    gen = torch.Generator().manual_seed(seed)
    k = len(real_by_class)
    if init == "real":
        picks = [r[torch.randint(len(r), (ipc * nps,), generator=gen)] for r in real_by_class]
        syn = torch.stack(picks).reshape(k, ipc, nps, 3, size, size).clone()
    elif init == "noise":
        syn = torch.rand(k, ipc, nps, 3, size, size, generator=gen)
    else:
        raise ValueError(f"init must be 'noise' or 'real', got {init!r}")
    syn.requires_grad_(True)
    norm = normaliser if normaliser is not None else nn.Identity()
    encoder.requires_grad_(False)

    def embed(x: torch.Tensor) -> torch.Tensor:  # P x 3 x h x w -> P x E
        # pixels live in [0, 1] (optical densities need I >= 0): a pixel SGD pushes out of range
        # is clipped, and its gradient stops there, as for any clipped image
        return encoder(norm(x.clamp(0, 1)).to(x.dtype))

    with torch.no_grad():  # phi and A are fixed: the real side is computed once
        real = [embed(r) for r in real_by_class]  # per class: P_c x E

    losses: list[float] = []

    def step(_: int) -> torch.Tensor:
        syn_c = [embed(syn[c].reshape(ipc * nps, 3, size, size)) for c in range(k)]
        loss = dm_loss(real, syn_c)
        losses.append(float(loss.detach()))
        return loss

    opt = torch.optim.SGD([syn], lr=lr, momentum=momentum)
    log = optimise(steps, step, [opt], seed=seed, where=where_)
    log.update(_first_last(losses))
    return syn.detach().clamp(0, 1), log


def _first_last(losses: list[float]) -> dict[str, float]:
    """Mean loss of the first and of the last tenth of the steps (none without steps)."""
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:]))}


# ---- the method ---------------------------------------------------------------------------------
@register_algorithm("fedwsidd")
@dataclass
class FedWSIDD(Algorithm):
    """Options (see the module docstring): ``ipc`` synthetic bags per class, ``nps`` instances
    per bag, ``dm_steps`` / ``dm_lr`` / ``dm_momentum`` of the distillation, ``init`` ("real":
    instances of real bags; "noise": N(0, 1) in the site's standardised space), ``embed``
    ("random-relu" or "identity") with ``embed_dim``, ``pool`` ("union" | "mean"),
    ``upload_dtype`` ("float16" | "float32"), ``finetune_steps`` (0: [train].local_steps),
    ``use_synthetic`` (false: nothing is distilled or sent and round 2 trains on real bags only --
    the local-only ablation with the very same models and steps); ``space`` ("features" |
    "images"), ``upload`` ("features" | "images", image space only) and ``image_dtype``
    ("uint8" | "float16") of uploaded patches."""

    ipc: int = option(2, ge=1, help="synthetic bags per class")
    nps: int = option(16, ge=1, help="instances per synthetic bag")
    dm_steps: int = option(200, ge=0, help="distillation steps")
    dm_lr: float = option(1.0, gt=0, help="SGD learning rate of the synthetic bags")
    dm_momentum: float = option(0.5, ge=0, lt=1)
    init: str = option("real", choices=("real", "noise"))
    embed: str = option("random-relu", choices=("random-relu", "identity"))
    embed_dim: int = option(256, ge=1)
    pool: str = option("union", choices=("union", "mean"))
    upload_dtype: str = option("float16", choices=("float16", "float32"))
    space: str = option("features", choices=("features", "images"),
                        help="distil feature bags, or image bags through phi and A")
    upload: str = option("features", choices=("features", "images"),
                         help="image space: send the synthetic patches or their features")
    image_dtype: str = option("uint8", choices=("uint8", "float16"))
    finetune_steps: int = option(0, ge=0, help="round-2 steps (0: [train].local_steps)")
    use_synthetic: bool = True

    # ---- server ------------------------------------------------------------------------------
    def init_state(self, sctx: ServerContext, init_weights: dict[str, np.ndarray]) -> Payload:
        if sctx.rounds != 2:
            raise ConfigError(
                f"fedwsidd communicates once and needs [run].rounds = 2 (round 1: pretrain, "
                f"distil and upload; round 2: train on real + pooled synthetic bags), got "
                f"{sctx.rounds}")
        if self.upload == "images" and self.space != "images":
            raise ConfigError('fedwsidd: upload = "images" needs space = "images" (feature-space '
                              "distillation has no patches to send)")
        tasks = {c.task for c in sctx.clients}
        if tasks != {"mil"}:
            raise ConfigError(f"fedwsidd distils feature bags: it needs a MIL federation "
                              f"(e.g. ucsb-breast-bags, slides-bags), got task(s) {sorted(tasks)}")
        return Payload({}, {}, kind="state")  # no global model: every site keeps its own

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        if sctx.round == 1:
            return {c.cid: Payload(kind="none") for c in sctx.clients}
        if not self.use_synthetic:
            return {c.cid: Payload(kind="none") for c in sctx.clients}
        synthetic = unprefixed("synthetic", state.arrays)  # sent in the dtype it was uploaded in
        if "images" in synthetic:
            pooled = Payload({"images": encode_images(synthetic["images"], self.image_dtype),
                              "labels": synthetic["labels"]}, {}, kind="synthetic-images")
        else:
            pooled = Payload({**encode_bags(synthetic["bags"], self.upload_dtype),
                              "labels": synthetic["labels"]}, {}, kind="synthetic-bags")
        return {c.cid: pooled for c in sctx.clients}

    def configure_evaluate(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        return {c.cid: Payload(kind="none") for c in sctx.clients}

    def aggregate(self, sctx: ServerContext, state: Payload, results: dict[int, Payload]) -> Payload:
        results = {c: p for c, p in results.items() if {"bags", "images"} & set(p.arrays)}
        if sctx.round != 1 or not results:  # round 2, or the no-exchange ablation
            return state
        key = "images" if all("images" in p.arrays for p in results.values()) else "bags"
        decode = decode_images if key == "images" else decode_bags
        uploads = [(decode(results[c].arrays), results[c].arrays["labels"])
                   for c in sorted(results)]
        bags, labels = pool_synthetic(uploads, self.pool)
        for c in sorted(results):
            up = results[c]
            sctx.log("fedwsidd", {"round": sctx.round, "client": sctx.client(c).name,
                                  "synthetic_bags": int(len(up.arrays["labels"])),
                                  "classes": sorted({int(k) for k in up.arrays["labels"]}),
                                  "upload_bytes": int(sum(a.nbytes for a in up.arrays.values())),
                                  "upload_kind": up.kind,
                                  **{k: int(up.scalars[k]) for k in ("bytes_as_images",
                                                                     "bytes_as_features")
                                     if k in up.scalars},
                                  "dm_loss_first": up.scalars.get("dm_loss_first"),
                                  "dm_loss_last": up.scalars.get("dm_loss_last")})
        sctx.log("fedwsidd", {"round": sctx.round, "pooled_bags": int(len(labels)),
                              "pool": self.pool,
                              "per_class": np.bincount(labels).tolist()})
        return Payload(prefixed("synthetic", {key: bags, "labels": labels}), {}, kind="state")

    def final_weights(self, state: Payload) -> dict:
        return {}

    def personal_weights(self, client: ClientInfo, state: Payload, client_state: Payload) -> dict:
        return unprefixed("model", client_state.arrays)

    # ---- client ------------------------------------------------------------------------------
    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        if ctx.round == 1:
            return self._pretrain_and_distil(ctx)
        load_weights(ctx.model, unprefixed("model", ctx.state.arrays))
        items = self._real_items(ctx)
        if self.use_synthetic:
            items += self._received_items(ctx, payload)
        steps = self.finetune_steps or ctx.train.local_steps
        ctx.logs.update(self._train(ctx, items, steps, offset=2))
        ctx.logs["synthetic_bags_used"] = float(len(items) - ctx.data.num_train)
        ctx.state.arrays = prefixed("model", get_weights(ctx.model))
        return Payload(kind="none")

    def evaluate(self, ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
        load_weights(ctx.model, unprefixed("model", ctx.state.arrays))
        return evaluate_model(ctx, ctx.model, "personal")

    # ---- client helpers ----------------------------------------------------------------------
    def _real_items(self, ctx: ClientContext) -> list[tuple[torch.Tensor, int]]:
        items = [ctx.data.train[i] for i in range(len(ctx.data.train))]
        empty = [i for i, (x, _) in enumerate(items) if x.shape[0] == 0]
        if empty:
            raise ValueError(f"client {ctx.name!r}: training bag(s) {empty[:5]} have no instances; "
                             "drop them from the labels CSV or re-extract those slides")
        return [(x, int(y)) for x, y in items]

    def _received_items(self, ctx: ClientContext, payload: Payload) -> list[tuple[torch.Tensor, int]]:
        if "images" in payload.arrays:  # M x nps x 3 x h x w -> this site's phi(A(.))
            images = torch.from_numpy(decode_images(payload.arrays))
            data = _image_data(ctx)
            bags = np.stack([data.encode(b).numpy() for b in images])  # M x nps x D
            return [(torch.from_numpy(b), int(y))
                    for b, y in zip(bags, payload.arrays["labels"], strict=True)]
        if "bags" not in payload.arrays:
            raise ValueError(f"client {ctx.name!r}, round {ctx.round}: no pooled synthetic bags "
                             "arrived (kind 'synthetic-bags'); was round 1 aggregated?")
        bags = decode_bags(payload.arrays)  # M x nps x D, raw feature space
        std = getattr(ctx.data.train, "standardizer", None)
        if std is not None:
            bags = std(bags)
        return [(torch.from_numpy(np.ascontiguousarray(b)), int(y))
                for b, y in zip(bags, payload.arrays["labels"], strict=True)]

    def _train(self, ctx: ClientContext, items: list[tuple[torch.Tensor, int]], steps: int,
               offset: int) -> dict[str, float]:
        model = ctx.model
        optimizer = make_optimizer(model, ctx.train)

        def batches():
            epoch = 0
            while True:
                for i in np.random.default_rng([ctx.seed, offset, epoch]).permutation(len(items)):
                    x, y = items[int(i)]
                    yield x[None], torch.tensor([y])  # 1 x N x D, 1
                epoch += 1

        return optimise(steps, lambda b: mil_loss(ctx, model, *b), [optimizer],
                        batches=batches(), seed=ctx.seed + offset, where=where(ctx),
                        modules=[model])

    def _pretrain_and_distil(self, ctx: ClientContext) -> Payload:
        items = self._real_items(ctx)
        log = self._train(ctx, items, ctx.train.local_steps, offset=1)
        ctx.logs.update({f"pretrain_{k}": v for k, v in log.items()})
        ctx.state.arrays = prefixed("model", get_weights(ctx.model))
        if not self.use_synthetic:  # the local-only ablation: nothing is distilled or sent
            return Payload(kind="none")
        by_class: dict[int, list[torch.Tensor]] = {}
        for x, y in items:
            by_class.setdefault(y, []).append(x)
        classes = sorted(by_class)
        if self.space == "images":
            return self._distil_image_bags(ctx, classes)
        bags, dm_log = self._distil_features(ctx, by_class, classes)
        std = getattr(ctx.data.train, "standardizer", None)
        raw = bags.numpy()  # K*ipc x nps x D in this site's standardised space
        if std is not None:  # back to the federation's raw feature space for the wire
            raw = raw * std.std + std.mean
        labels = np.repeat(np.asarray(classes, np.int64), self.ipc)
        ctx.logs.update({f"dm_{k}": v for k, v in dm_log.items()})
        ctx.logs["classes_distilled"] = float(len(classes))
        return Payload({**encode_bags(raw, self.upload_dtype), "labels": labels},
                       {"num_examples": ctx.data.num_train,
                        "dm_loss_first": float(dm_log.get("loss_first", np.nan)),
                        "dm_loss_last": float(dm_log.get("loss_last", np.nan))},
                       kind="synthetic-bags")

    def _distil_image_bags(self, ctx: ClientContext, classes: list[int]) -> Payload:
        """Image-space DM through the federation's phi and A; upload patches or features."""
        from histofed.data.fed_image_bags import to_float

        data = _image_data(ctx)
        real = [torch.cat([to_float(p) for p, y in zip(data.patches, data.labels) if y == c])
                for c in classes]  # per class: P_c x 3 x h x w in [0, 1]
        size = data.patch_size
        syn, dm_log = distil_images(real, ipc=self.ipc, nps=self.nps, size=size,
                                    encoder=data.encoder, normaliser=data.normaliser,
                                    steps=self.dm_steps, lr=self.dm_lr, momentum=self.dm_momentum,
                                    init=self.init, seed=ctx.seed + 3,
                                    where_=f"{where(ctx)} (image distillation)")
        syn = syn.reshape(len(classes) * self.ipc, self.nps, 3, size, size)  # M x nps x 3 x h x w
        labels = np.repeat(np.asarray(classes, np.int64), self.ipc)
        as_images = {"images": encode_images(syn.numpy(), self.image_dtype)}
        as_features = encode_bags(np.stack([data.encode(b).numpy() for b in syn]),
                                  self.upload_dtype)  # M x nps x D
        sizes = {"bytes_as_images": float(sum(a.nbytes for a in as_images.values())),
                 "bytes_as_features": float(sum(a.nbytes for a in as_features.values()))}
        ctx.logs.update({f"dm_{k}": v for k, v in dm_log.items() if np.isscalar(v)})
        ctx.logs["classes_distilled"] = float(len(classes))
        arrays, kind = ((as_images, "synthetic-images") if self.upload == "images"
                        else (as_features, "synthetic-bags"))
        return Payload({**arrays, "labels": labels},
                       {"num_examples": ctx.data.num_train, **sizes,
                        "dm_loss_first": float(dm_log.get("loss_first", np.nan)),
                        "dm_loss_last": float(dm_log.get("loss_last", np.nan))}, kind=kind)

    def _distil_features(self, ctx: ClientContext, by_class: dict[int, list[torch.Tensor]],
                         classes: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        gen = ctx.torch_generator(offset=11)
        dim = by_class[classes[0]][0].shape[1]
        init = []
        for c in classes:  # ipc x nps x D per class
            if self.init == "real":
                pool = torch.cat(by_class[c])  # all class-c instances of this site
                idx = torch.randint(len(pool), (self.ipc * self.nps,), generator=gen)
                init.append(pool[idx].reshape(self.ipc, self.nps, dim))
            else:
                init.append(torch.randn(self.ipc, self.nps, dim, generator=gen))
        syn = torch.cat(init).clone().requires_grad_(True)  # K*ipc x nps x D
        rng = ctx.numpy_rng(offset=12)
        embed_gen = ctx.torch_generator(offset=13)
        losses: list[float] = []

        def step(_: int) -> torch.Tensor:
            if self.embed == "random-relu":
                w, b = random_relu_embedding(dim, self.embed_dim, embed_gen)
                phi = lambda x: F.relu(x @ w + b)  # noqa: E731
            else:
                phi = lambda x: x  # noqa: E731
            real = [by_class[c][int(rng.integers(len(by_class[c])))] for c in classes]
            syn_c = [syn[i * self.ipc:(i + 1) * self.ipc].reshape(-1, dim)
                     for i in range(len(classes))]
            loss = dm_loss(real, syn_c, phi)
            losses.append(float(loss.detach()))
            return loss

        opt = torch.optim.SGD([syn], lr=self.dm_lr, momentum=self.dm_momentum)
        log = optimise(self.dm_steps, step, [opt], seed=ctx.seed + 3,
                       where=f"{where(ctx)} (distillation)")
        log.update(_first_last(losses))
        return syn.detach(), log
