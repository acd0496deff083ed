r"""FedSODA (Zhang et al., ISBI 2024; reference code github.com/yuanzhang7/FedSODA): synthetic-
driven cross-assessment (SO), dynamic stratified-layer aggregation (DA) and a self-consistency
loss (L_sc) for segmentation across heterogeneous sites.

**Client k**, every round: trains from the weights it receives; sends its weights and, with
``so``, two scalars, the intensity mean and std of its training images *in the space the model
sees* (pixels / 255, all channels pooled; no augmentation)::

    mu_k = mean(x),  sigma_k = std(x),   x in [0, 1]                      (sigma_k = 0: error)

The reference code draws its synthetic data from raw-space statistics while training on
normalised inputs; here both are the same [0, 1] space, so the synthetic inputs look like what
the models were trained on.

**Server**, round t (cos = cosine similarity, computed in float64):

1. Memory bank (SO): v_new ~ N(mu_k, sigma_k), shape B x 3 x H x W (``synthetic_batch``,
   ``synthetic_size``), from ``ServerContext.numpy_rng``; ``v_k^t = gamma v_k^{t-1} +
   (1 - gamma) v_new`` (``v_k^1 = v_new``; the reference's gamma = 0.25 weights history).
2. Cross-assessment on L stages (UNet blocks, see stages.py). With SO, model i is run on every
   client's synthetic batch and its stage-l features F_i^l compared::

       s_ij^l = cos(flatten F_i^l(v_i), flatten F_i^l(v_j))                       (j != i)

   Without SO (the "DA" ablation) no statistics are shared and the similarity is measured in
   weight space, s_ij^l = cos(theta_i^l, theta_j^l).
3. Dynamic weights and fusion, per stage l and parameter tensor p in stage l::

       w_ij^l = s_ij^l / sum_{j' != i} s_ij'^l
       theta_hat_i[p] = lambda theta_i[p] + (1 - lambda) sum_{j != i} w_ij^l theta_j[p]
       theta_g = 1/K sum_i theta_hat_i                          (sent to every client)

   Without DA (the "SO" ablation) the network is one stage: s_ij = mean_l s_ij^l. If
   sum_{j' != i} s_ij'^l <= 1e-8 the row falls back to uniform weights 1/(K-1) (counted as
   ``fallbacks`` in fedsoda.jsonl, which logs s and w every round). With ``personalised``,
   client i trains from (and is evaluated, as model "personal", on) theta_hat_i; theta_g is
   evaluated as "global" too.

**Local loss** (``lsc``, from round ``lsc_from_round`` on): the task loss (set [train].loss =
"bce") plus, with p = sigmoid(logits) and p_g the frozen global model's output on the same batch,
a hard mask w = round(|p_g - p| + alpha) (alpha = 0.4) and eps = 1e-6 placed as in the reference::

    L_sc = -1/2 [ sum(w p_g log(p + eps)) / sum(w p_g + eps)
                + sum(w (1 - p_g) log(1 - p + eps)) / sum(w (1 - p_g) + eps) ]

(the sums in the denominators run over every pixel, so eps is added once per pixel). The
reference warms up before its first fusion (here: round 1, whose global model is still the random
init) and its first training after the first fusion has no L_sc either (``if step > 0`` in its
trainer), so the first round with L_sc is round 3: ``lsc_from_round = 3``. The frozen model of
L_sc is always the aggregated global model theta_g (with ``personalised``, sent beside theta_hat_i
under ``teacher/`` keys).

``so = da = lsc = false`` is FedAvg exactly (same code path, tested). Defaults of the reference:
AdamW, lr 1e-4, betas (0.9, 0.95) ([train] table), a GroupNorm UNet, 5 local epochs per round
(``local_epochs = 5``; 0 uses [train].local_steps).

Note on lambda: the issue writes theta_hat_i = lambda theta_i + (1 - lambda) sum w theta_j with
lambda = 0.4 (this default); the reference's ``fusion_logic`` gives weight 0.6 to the own model
(``dynamic_w = 0.4`` on the others), i.e. ``lambda = 0.6`` in this notation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from histofed.algorithms.aggregate import weighted_mean
from histofed.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientInfo,
    Payload,
    ServerContext,
    evaluate_model,
    register_algorithm,
)
from histofed.algorithms.fedavg import FedAvg
from histofed.algorithms.stages import group_stages, key_stages, stage_features, unet_stage_prefixes
from histofed.algorithms.training import local_train
from histofed.algorithms.weights import get_weights, load_weights
from histofed.config import ConfigError
from histofed.models import one_torch_thread

BANK, PERSONAL, TEACHER = "bank/", "personal/", "teacher/"  # model keys never contain "/"


# ---- pure math (numpy / torch, no state) ------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b) of two flat arrays in float64; 0 when either is all zeros."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def dynamic_weights(sim: np.ndarray, tiny: float = 1e-8) -> tuple[np.ndarray, int]:
    """w_ij^l = s_ij^l / sum_{j' != i} s_ij'^l, w_ii^l = 0.

    Args:
        sim: K x K x L similarities (the diagonal is ignored).
        tiny: rows whose sum is <= tiny get uniform weights 1 / (K - 1).

    Returns:
        (K x K x L weights, number of (i, l) rows that fell back to uniform).

    Example:
        >>> s = np.array([[1, .6, .2], [.5, 1, .5], [.1, .3, 1]])[:, :, None]
        >>> dynamic_weights(s)[0][:, :, 0].round(2)
        array([[0.  , 0.75, 0.25],
               [0.5 , 0.  , 0.5 ],
               [0.25, 0.75, 0.  ]])
    """
    k = sim.shape[0]
    if k == 1:  # nobody to fuse with
        return np.zeros(sim.shape), 0
    off = np.broadcast_to(~np.eye(k, dtype=bool)[:, :, None], sim.shape)
    s = np.where(off, sim.astype(np.float64), 0.0)
    total = s.sum(axis=1, keepdims=True)  # K x 1 x L
    bad = total <= tiny
    uniform = off / (k - 1)
    w = np.where(bad, uniform, s / np.where(bad, 1.0, total))
    return w, int(bad.sum())


def fuse(models: Sequence[dict[str, np.ndarray]], weights: np.ndarray, key_stage: dict[str, int],
         lam: float) -> list[dict[str, np.ndarray]]:
    """theta_hat_i[p] = lam theta_i[p] + (1 - lam) sum_{j != i} w_ij^{stage(p)} theta_j[p].

    Args:
        models: K dicts of named arrays (same keys and shapes).
        weights: K x K x L from :func:`dynamic_weights` (zero diagonal).
        key_stage: stage index of every key.
        lam: weight of the own model, in [0, 1].

    Returns:
        K fused dicts (float64 accumulation, input dtypes). One model is returned unchanged.
    """
    if len(models) == 1:
        return [{k: v.copy() for k, v in models[0].items()}]
    out = []
    for i, own in enumerate(models):
        fused = {}
        for key, value in own.items():
            acc = lam * value.astype(np.float64)
            for j, other in enumerate(models):
                if j != i:
                    acc += (1.0 - lam) * weights[i, j, key_stage[key]] * other[key].astype(np.float64)
            fused[key] = acc.astype(value.dtype)
        out.append(fused)
    return out


def weight_spread(weights: np.ndarray) -> float:
    """max - min of the off-diagonal fusion weights w_ij^l (0 = an unweighted mean)."""
    k = weights.shape[0]
    if k < 2:
        return 0.0
    off = weights[~np.eye(k, dtype=bool)]  # (K*(K-1)) x L
    return float(off.max() - off.min())


def update_bank(previous: np.ndarray | None, new: np.ndarray, gamma: float) -> np.ndarray:
    """Memory bank v^t = gamma v^{t-1} + (1 - gamma) v_new (v^1 = v_new)."""
    if previous is None:
        return new.astype(np.float32)
    return (gamma * previous.astype(np.float64) + (1.0 - gamma) * new).astype(np.float32)


def self_consistency_loss(p: torch.Tensor, p_g: torch.Tensor, *, alpha: float = 0.4,
                          eps: float = 1e-6) -> torch.Tensor:
    """L_sc of the local model's probabilities ``p`` against the frozen global ``p_g`` (any shape).

    See the module docstring; ``torch.round`` rounds half to even, as in the reference.
    """
    w = torch.round(torch.abs(p_g - p) + alpha)
    pos = torch.sum(w * p_g * torch.log(p + eps)) / torch.sum(w * p_g + eps)
    neg = torch.sum(w * (1 - p_g) * torch.log(1 - p + eps)) / torch.sum(w * (1 - p_g) + eps)
    return -(pos + neg) / 2


def _image_arrays(dataset) -> list[np.ndarray] | None:
    if hasattr(dataset, "datasets"):  # ConcatDataset
        parts = [_image_arrays(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [a for p in parts for a in p]
    images = getattr(dataset, "images", None)
    return None if images is None else [np.asarray(im) for im in images]


def intensity_stats(dataset, *, client: str) -> tuple[float, float]:
    """(mu, sigma) of a client's training inputs in [0, 1], all pixels and channels pooled.

    Uses the raw images (``dataset.images``: H x W x 3 uint8, / 255) when the dataset has them,
    else one pass over its items (x: 3 x H x W in [0, 1]). Two passes in float64, so constant
    images give exactly sigma = 0.

    Raises:
        ValueError: sigma = 0 (or not finite), naming the client.
    """
    images = _image_arrays(dataset)
    if images is not None:
        chunks = [im.astype(np.float64) / 255.0 if im.dtype == np.uint8 else im.astype(np.float64)
                  for im in images]
    else:
        chunks = [np.asarray(dataset[i][0], dtype=np.float64) for i in range(len(dataset))]
    n = sum(c.size for c in chunks)
    mu = sum(float(c.sum()) for c in chunks) / max(n, 1)
    sigma = math.sqrt(sum(float(np.square(c - mu).sum()) for c in chunks) / max(n, 1))
    if not (n and math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"client {client!r}: its training images have intensity std sigma = {sigma} (constant "
            "or empty images); FedSODA draws synthetic inputs from N(mu, sigma) and needs sigma > 0. "
            "Check this client's data, drop it from the federation, or set [algorithm].so = false")
    return mu, sigma


# ---- the method -------------------------------------------------------------------------------
@register_algorithm("fedsoda")
@dataclass
class FedSODA(FedAvg):
    """FedSODA; the equations are in the module docstring.

    Options ([algorithm] table; the TOML key ``lambda`` sets the field ``lam``): so, da, lsc,
    lambda, gamma, stages (0 = one per UNet block), personalised, synthetic_batch,
    synthetic_size, lsc_alpha, lsc_eps, lsc_from_round, local_epochs (0 = [train].local_steps).

    Example:
        >>> FedSODA.from_options(**{"lambda": 0.6, "personalised": True}).lam
        0.6
    """

    so: bool = True
    da: bool = True
    lsc: bool = True
    lam: float = 0.4
    gamma: float = 0.25
    stages: int = 0
    personalised: bool = False
    synthetic_batch: int = 4
    synthetic_size: int = 128
    lsc_alpha: float = 0.4
    lsc_eps: float = 1e-6
    lsc_from_round: int = 3
    local_epochs: float = 0.0
    compare_raw_space: bool = False  # also log the weights the reference's 0-255 banks give

    def __post_init__(self) -> None:
        for key, value in (("lambda", self.lam), ("gamma", self.gamma)):
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ConfigError(f"[algorithm].{key} = {value!r} for fedsoda: must be in [0, 1]")
        checks = [
            (self.stages >= 0, "stages must be >= 0 (0 = one per UNet block)"),
            (self.synthetic_batch >= 1, "synthetic_batch must be >= 1"),
            (self.synthetic_size >= 8, "synthetic_size must be >= 8 (use the training crop size)"),
            (self.lsc_eps > 0, "lsc_eps must be > 0"),
            (self.lsc_from_round >= 1, "lsc_from_round must be >= 1"),
            (self.local_epochs >= 0, "local_epochs must be >= 0 (0 = use [train].local_steps)"),
            (not self.personalised or self.so or self.da,
             "personalised = true needs the fusion: set so and/or da = true"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"[algorithm] fedsoda: {message}")

    @classmethod
    def from_options(cls, **options: Any) -> Algorithm:
        if "lambda" in options:
            if "lam" in options:
                raise ConfigError("[algorithm] fedsoda: give lambda or lam, not both")
            options["lam"] = options.pop("lambda")
        return super().from_options(**options)

    @property
    def fusing(self) -> bool:
        return self.so or self.da

    @property
    def mean_aggregation(self) -> bool:  # type: ignore[override]
        return not self.fusing  # the fusion is not a mean of updates

    # ---- server ----------------------------------------------------------------------------
    def _split(self, model: torch.nn.Module) -> tuple[list[torch.nn.Module], dict[str, int]]:
        """Hook modules (last block of each stage group) and the stage of every key."""
        prefixes = unet_stage_prefixes(model)
        groups = group_stages(len(prefixes), self.stages if self.da else 0)
        hooks = [model.get_submodule(prefixes[g[-1]]) for g in groups]
        return hooks, key_stages(model, prefixes, groups)

    def _model(self, sctx: ServerContext) -> torch.nn.Module:
        return sctx.build_model(None)  # the shared architecture (FedAvg.init_state checks it)

    def init_state(self, sctx: ServerContext, init_weights: dict[str, np.ndarray]) -> Payload:
        if self.fusing:  # fail before any training: wrong model, too many stages, bad size
            model = self._model(sctx)
            hooks, _ = self._split(model)
            if self.so:
                size, problem = self.synthetic_size, ""
                try:
                    with torch.no_grad():
                        shape = tuple(model.eval()(torch.zeros(1, 3, size, size)).shape[2:])
                    problem = "" if shape == (size, size) else f"output is {shape[0]} x {shape[1]}"
                except RuntimeError as err:
                    problem = str(err).split("\n")[0]
                if problem:
                    raise ConfigError(
                        f"[algorithm].synthetic_size = {size} does not fit this UNet ({problem}); "
                        "use the training crop size (a multiple of 2^(len(channels) - 1))")
        return super().init_state(sctx, init_weights)

    @staticmethod
    def _global(state: Payload) -> dict[str, np.ndarray]:
        return {k: v for k, v in state.arrays.items() if "/" not in k}

    @staticmethod
    def _personal(state: Payload, cid: int) -> dict[str, np.ndarray]:
        prefix = f"{PERSONAL}{cid}/"
        return {k[len(prefix):]: v for k, v in state.arrays.items() if k.startswith(prefix)}

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        glob = self._global(state)
        if not self.personalised:
            payload = Payload(glob, {}, kind="weights")
            return {c.cid: payload for c in sctx.clients}
        teacher = self.lsc and sctx.round >= self.lsc_from_round
        out = {}
        for c in sctx.clients:
            own = self._personal(state, c.cid)
            arrays = dict(own or glob)
            if teacher and own:  # L_sc's frozen model is the global one, not the start point
                arrays.update({TEACHER + k: v for k, v in glob.items()})
            out[c.cid] = Payload(arrays, {}, kind="weights")
        return out

    def configure_evaluate(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        glob = self._global(state)
        if not self.personalised:
            payload = Payload(glob, {}, kind="weights")
            return {c.cid: payload for c in sctx.clients}
        return {c.cid: Payload({**glob, **{PERSONAL + k: v for k, v in
                                           self._personal(state, c.cid).items()}}, {}, kind="weights")
                for c in sctx.clients}

    def aggregate(self, sctx: ServerContext, state: Payload, results: dict[int, Payload]) -> Payload:
        if not self.fusing:
            return super().aggregate(sctx, state, results)  # FedAvg, exactly
        cids = sorted(results)
        names = {c.cid: c.name for c in sctx.clients}
        models = [results[c].arrays for c in cids]
        model = self._model(sctx)
        hooks, key_stage = self._split(model)
        new_arrays = dict(state.arrays)
        raw = None
        if self.so:
            banks = self._draw_banks(sctx, state, results, names)
            new_arrays.update({f"{BANK}{c}": banks[c] for c in cids})
            sim = self._feature_similarity(model, hooks, models, [banks[c] for c in cids])
            if self.compare_raw_space:  # 255 x the same draws = N(255 mu, 255 sigma), as the reference
                raw = self._feature_similarity(model, hooks, models,
                                               [banks[c] * np.float32(255.0) for c in cids])
        else:
            sim = self._weight_similarity(models, key_stage, len(hooks))
        if not self.da:
            sim = sim.mean(axis=2, keepdims=True)
            raw = None if raw is None else raw.mean(axis=2, keepdims=True)
            key_stage = {k: 0 for k in key_stage}
        weights, fallbacks = dynamic_weights(sim)
        fused = fuse(models, weights, key_stage, self.lam)
        new_arrays.update(weighted_mean(fused, [1.0] * len(fused)))
        if self.personalised:
            for c, theta in zip(cids, fused, strict=True):
                new_arrays.update({f"{PERSONAL}{c}/{k}": v for k, v in theta.items()})
        log = {"round": sctx.round, "clients": [names.get(c, str(c)) for c in cids],
               "similarity": np.round(sim, 6).tolist(), "weights": np.round(weights, 6).tolist(),
               "fallbacks": fallbacks, "spread": weight_spread(weights)}
        if raw is not None:
            raw_weights, _ = dynamic_weights(raw)
            log.update(weights_raw_space=np.round(raw_weights, 6).tolist(),
                       spread_raw_space=weight_spread(raw_weights))
        if self.so:
            log["stats"] = {names.get(c, str(c)): [results[c].scalars["mu"], results[c].scalars["sigma"]]
                            for c in cids}
        sctx.log("fedsoda", log)
        return Payload(new_arrays, dict(state.scalars), kind="state")

    def _draw_banks(self, sctx: ServerContext, state: Payload, results: dict[int, Payload],
                    names: dict[int, str]) -> dict[int, np.ndarray]:
        shape = (self.synthetic_batch, 3, self.synthetic_size, self.synthetic_size)
        banks = {}
        for cid in sorted(results):
            mu, sigma = results[cid].scalars.get("mu"), results[cid].scalars.get("sigma")
            ok = isinstance(mu, int | float) and isinstance(sigma, int | float)
            if not (ok and math.isfinite(mu) and math.isfinite(sigma) and sigma > 0):
                raise ValueError(
                    f"FedSODA round {sctx.round}: client {names.get(cid, cid)!r} sent mu = {mu!r}, "
                    f"sigma = {sigma!r}; need finite values with sigma > 0 (a constant-intensity "
                    "client cannot be cross-assessed: fix its data or set [algorithm].so = false)")
            rng = sctx.numpy_rng(cid)  # per (seed, round, client): independent of who reported
            new = rng.normal(mu, sigma, size=shape)  # B x 3 x H x W float64
            banks[cid] = update_bank(state.arrays.get(f"{BANK}{cid}"), new, self.gamma)
        return banks

    @staticmethod
    def _feature_similarity(model: torch.nn.Module, hooks: list[torch.nn.Module], models: list[dict],
                            banks: list[np.ndarray]) -> np.ndarray:
        """s_ij^l = cos(F_i^l(v_i), F_i^l(v_j)): K x K x L (diagonal 1).

        Model i sees all K synthetic batches in one forward pass (GroupNorm/eval-mode norms act
        per sample, so batching does not change any sample's features), on one torch thread.
        """
        k, num_stages = len(models), len(hooks)
        sim = np.ones((k, k, num_stages))
        inputs = torch.from_numpy(np.concatenate(banks))  # K*B x 3 x H x W float32
        with one_torch_thread():
            for i, arrays in enumerate(models):
                load_weights(model, arrays)  # hooks are submodules of model: they see these weights
                feats = [f.reshape(k, -1) for f in stage_features(model, hooks, inputs)]  # K x rest
                for l, f in enumerate(feats):
                    for j in range(k):
                        if j != i:
                            sim[i, j, l] = cosine(f[i], f[j])
        return sim

    @staticmethod
    def _weight_similarity(models: list[dict], key_stage: dict[str, int], num_stages: int) -> np.ndarray:
        """s_ij^l = cos(theta_i^l, theta_j^l) over each stage's flattened weights (no data)."""
        k = len(models)
        flat = [[np.concatenate([m[key].ravel() for key in sorted(key_stage) if key_stage[key] == l])
                 .astype(np.float64) for l in range(num_stages)] for m in models]
        sim = np.ones((k, k, num_stages))
        for i in range(k):
            for j in range(k):
                if j != i:
                    sim[i, j] = [cosine(flat[i][l], flat[j][l]) for l in range(num_stages)]
        return sim

    def final_weights(self, state: Payload) -> dict[str, np.ndarray]:
        return self._global(state)

    def personal_weights(self, client: ClientInfo, state: Payload,
                         client_state: Payload) -> dict[str, np.ndarray]:
        return self._personal(state, client.cid) if self.personalised else {}

    # ---- client ----------------------------------------------------------------------------
    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        load_weights(ctx.model, {k: v for k, v in payload.arrays.items() if not k.startswith(TEACHER)})
        steps = None
        if self.local_epochs > 0:
            steps = max(1, math.ceil(self.local_epochs * ctx.data.num_train / ctx.train.batch_size))
        ctx.logs.update(local_train(ctx, extra_loss=self.extra_loss(ctx, payload), steps=steps))
        scalars: dict[str, Any] = {"num_examples": ctx.data.num_train}
        if self.so:
            scalars["mu"], scalars["sigma"] = intensity_stats(ctx.data.train, client=ctx.name)
        return Payload(get_weights(ctx.model), scalars, kind="weights")

    def extra_loss_terms(self) -> list[str]:
        return ["the self-consistency loss L_sc (lsc = true)"] if self.lsc else []

    def extra_loss(self, ctx: ClientContext, payload: Payload):
        if not self.lsc or ctx.round < self.lsc_from_round:
            return None
        teacher = copy.deepcopy(ctx.model)  # holds the received start weights
        frozen = {k[len(TEACHER):]: v for k, v in payload.arrays.items() if k.startswith(TEACHER)}
        if frozen:
            load_weights(teacher, frozen)
        teacher.eval().requires_grad_(False)

        def l_sc(model, inputs, target, logits):
            if logits.shape[1] != 1:
                raise ValueError(f"FedSODA's L_sc is binary (1 logit map); got {logits.shape[1]}")
            with torch.no_grad():
                p_g = torch.sigmoid(ctx.task.forward(teacher, inputs))
            return self_consistency_loss(torch.sigmoid(logits), p_g, alpha=self.lsc_alpha,
                                         eps=self.lsc_eps)

        return l_sc

    def evaluate(self, ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
        personal = {k[len(PERSONAL):]: v for k, v in payload.arrays.items() if k.startswith(PERSONAL)}
        load_weights(ctx.model, {k: v for k, v in payload.arrays.items() if "/" not in k})
        out = evaluate_model(ctx, ctx.model, "global")
        if personal:
            load_weights(ctx.model, personal)
            out.update(evaluate_model(ctx, ctx.model, "personal"))
        return out

