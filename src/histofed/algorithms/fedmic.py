"""FedMIC: dual knowledge distillation + low-rank global parameter decomposition.

Ren, Hu, Chen, Wang, "Federated Distillation for Medical Image Classification: Towards
Trustworthy Computer-Aided Diagnosis", arXiv 2407.02261 (FedMIC). No reference code is public;
the losses and the SVD rule follow the closest published design, FedKD (Wu, Wu, Lyu, Huang,
Xie, "Communication-efficient federated learning via knowledge distillation", Nature
Communications 13, 2032, 2022).

Each hospital k keeps a private teacher T_k (larger; architectures may differ per site) that never
leaves it, and a student S (the configured ``[model]``, shared by all). Per batch (x, y), with
logits z_T, z_S (B x C), penultimate features h_T (B x d_T), h_S (B x d_S) and tempered
probabilities p^tau = softmax(z / tau):

    CE_T = CE(y, z_T),  CE_S = CE(y, z_S),  D = CE_T + CE_S
    L_rep = || h_T A_T^T - h_S A_S^T ||^2 / (B r)            (A_T: r x d_T, A_S: r x d_S)
    L_T = CE_T + [ tau^2 KL(p_S^tau || p_T^tau) + L_rep ] / D      (moves T and A_T)
    L_S = CE_S + [ tau^2 KL(p_T^tau || p_S^tau) + L_rep ] / D      (moves S and A_S)

KL(p || q) = mean_b sum_c p_bc (log p_bc - log q_bc). A_T, A_S are FedMIC's "two auxiliary
matrices": learnable projections of both representations into a common r-dimensional space
(``rep_dim``), private to the site. Decision-level (KL) and representation-level (L_rep)
distillation are each divided by D, FedKD's adaptive weighting: when both models still err on
the labels, distillation counts for little.

Global parameter decomposition (GPD; algorithms/lowrank.py): in round t (1-based, of R) the
server sends the student global weights W_g^(t); client k trains and uploads only its update
Delta_k = S_k - W_g^(t), every >= 2-D tensor as truncated SVD factors keeping energy
T(t) = T_min + t / R (T_max - T_min) (FedKD's schedule with 0-based t + 1 = our round), 1-D tensors
dense. The server rebuilds each Delta_k, averages them sample-weighted,
Delta = sum_k n_k Delta_k / sum_k n_k, re-compresses Delta with the same rule and sets
W_g^(t+1) = W_g^(t) + Delta~ (Delta~ = the rebuilt, re-compressed mean). Round t + 1 sends the
factors of Delta~ down to every sampled client that holds W_g^(t) (it took part in round t);
it adds them to its copy. A client that missed rounds gets the full W_g^(t+1) instead (it
cannot rebuild from factors it never saw): egress.jsonl shows which kind went down.

Partial participation: ``fraction`` of the clients, max(1, round(fraction N)), drawn without
replacement each round from (run seed, round).

Models: ``final_weights`` is the student (scored on a held-out site with
``[federation].unseen``); ``personal_weights`` is the site's teacher (final/personal/<site>.npz);
``evaluate`` reports the student as "global" and the teacher as "personal".

Our choices (not specified by FedMIC or FedKD):
- D is detached (a constant per step): with gradients through it, minimising L_T would
  reward a *larger* CE_S. FedKD's code does not say either way in the paper.
- KL is multiplied by tau^2 (Hinton et al. 2015), so its gradient scale does not shrink with tau.
- L_rep is computed on the input of each model's last linear layer (the penultimate features);
  both models must end in an ``nn.Linear`` head. A_T, A_S are bias-free, initialised
  N(0, 1/d) from the site's seed and kept in the site's private state across rounds. Each side
  of L_rep sees the other side detached, so each model only moves itself.
- Fresh optimisers ([train] settings) each round for both models, like every other method.
- A site with no teacher (``teacher = {}``) trains the student alone with the task loss through
  the job's trainer: with T_min = T_max = 1 this is FedAvg on the student (tested).
- ``kd = false`` (ablation "without dual KD"): teacher and student each train on CE alone;
  ``gpd = false`` (ablation "without GPD"): the update travels dense, both ways.
- Tensors whose factors would not be smaller than the tensor itself travel dense (exact and
  cheaper; lowrank.py).
- Evaluation rounds send the full student (kind "weights", phase "evaluate" in egress.jsonl);
  only training rounds use factors.

DP (``[algorithm] name = "feddp", base = "fedmic", noise = "local"``): ``client_update`` is the
client's *reconstructed, truncated* update Delta~_k (factors multiplied out). The wrapper clips
Delta~_k to C and adds N(0, sigma^2 C^2 I) to it on the site, so the noise goes on *after* the
SVD truncation: truncation is part of the client's own computation before the release (any
function of the data may precede clipping), and the clipped, noised result is what the
accountant covers. Because the Gaussian noise is full rank, the noised update travels dense
(kind "noised-update"): under DP the upload loses GPD's saving (re-truncating it on the site
would be post-processing and allowed, but the wrapper owns the upload). On the server
``apply_update`` hands the noised dense update to ``aggregate``, which averages and
re-compresses it (post-processing). Central noise is refused by the wrapper: FedMIC's
aggregation re-compresses the mean, so it is not a plain mean of updates. Record level
(DP-SGD) works only without a teacher or with ``kd = false``: the distillation terms are not a
sum over records (declared in ``extra_loss_terms``). Under FedDP keep ``fraction = 1`` and
sample with its ``q``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histofed.algorithms.aggregate import weighted_mean
from histofed.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientInfo,
    Payload,
    ServerContext,
    evaluate_model,
    prefixed,
    register_algorithm,
    require_same_architecture,
    unprefixed,
    without_namespaces,
)
from histofed.algorithms.lowrank import (
    add_update,
    check_thresholds,
    compress,
    compressed_nbytes,
    decompress,
    energy_threshold,
    shapes_from_scalar,
    shapes_to_scalar,
)
from histofed.algorithms.training import Trainer, local_train, make_optimizer, optimise, where
from histofed.algorithms.weights import get_weights, load_weights
from histofed.config import ConfigError
from histofed.options import option

_WHERE = "[algorithm] (fedmic)"
_SAMPLING = 211  # RNG stream offset of client sampling
SYNCED = "fedmic/synced"  # client state scalar: the round whose global weights it holds
DOWN = "down"  # server state namespace: factors of the last aggregated update


def default_teacher() -> dict[str, Any]:
    return {"name": "cnn", "width": 64, "depth": 3}


# ---- the losses (pure torch, tested against a float64 hand computation) -----------------------
def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean_b KL(softmax(p/tau) || softmax(q/tau)); p is the target (B x C each)."""
    log_p = F.log_softmax(p_logits / tau, dim=1)  # B x C
    log_q = F.log_softmax(q_logits / tau, dim=1)  # B x C
    return tau**2 * torch.sum(log_p.exp() * (log_p - log_q), dim=1).mean()


def dual_kd_losses(z_t: torch.Tensor, z_s: torch.Tensor, h_t: torch.Tensor, h_s: torch.Tensor,
                   y: torch.Tensor, *, proj_t: torch.Tensor, proj_s: torch.Tensor,
                   tau: float) -> dict[str, torch.Tensor]:
    """FedMIC/FedKD losses of one batch (see the module docstring).

    Args:
        z_t, z_s: teacher / student logits, B x C.
        h_t, h_s: their penultimate features, B x d_T and B x d_S.
        y: labels, B.
        proj_t, proj_s: the auxiliary matrices A_T (r x d_T) and A_S (r x d_S).
        tau: distillation temperature.

    Returns:
        {"teacher": L_T, "student": L_S, and the detached parts "ce_t", "ce_s", "kl_t", "kl_s",
        "rep"}; L_T carries gradients only to the teacher side, L_S only to the student side.
    """
    ce_t, ce_s = F.cross_entropy(z_t, y), F.cross_entropy(z_s, y)
    denom = (ce_t + ce_s).detach()
    r_t, r_s = h_t @ proj_t.T, h_s @ proj_s.T  # B x r each
    rep_t = F.mse_loss(r_t, r_s.detach())  # moves the teacher and A_T
    rep_s = F.mse_loss(r_s, r_t.detach())  # moves the student and A_S
    kl_t = kl_divergence(z_s.detach(), z_t, tau)  # KL(p_S || p_T): the student teaches T
    kl_s = kl_divergence(z_t.detach(), z_s, tau)  # KL(p_T || p_S): the teacher teaches S
    return {"teacher": ce_t + (kl_t + rep_t) / denom, "student": ce_s + (kl_s + rep_s) / denom,
            "ce_t": ce_t.detach(), "ce_s": ce_s.detach(), "kl_t": kl_t.detach(),
            "kl_s": kl_s.detach(), "rep": rep_t.detach()}


def linear_head(model: nn.Module, which: str) -> nn.Linear:
    """The model's last ``nn.Linear`` (its classifier head), whose input is the representation."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ConfigError(f"{_WHERE}: the {which} ({type(model).__name__}) has no nn.Linear "
                          "head, so FedMIC cannot read its representation for L_rep; use a "
                          "classifier ending in a linear layer (e.g. name = \"cnn\")")
    return heads[-1]


def forward_with_features(model: nn.Module, head: nn.Linear, forward, x: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits B x C, the head's input B x d) in one forward pass."""
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    try:
        logits = forward(model, x)
    finally:
        hook.remove()
    return logits, seen[-1].flatten(1)


# ---- the method --------------------------------------------------------------------------------
@register_algorithm("fedmic")
@dataclass
class FedMIC(Algorithm):
    """Options (TOML ``[algorithm]``):

    Attributes:
        teacher: the private teacher's model spec (``{name = "cnn", width = 64}``); ``{}`` = no
            teacher (student only).
        teacher_clients: per-site overrides of ``teacher`` (heterogeneous teachers), e.g.
            ``{ "client-0" = { width = 96 } }``.
        kd: dual distillation on (off: teacher and student each learn from labels only).
        gpd: low-rank SVD compression of the updates on (off: dense updates).
        t_min, t_max: energy kept by the SVD truncation, first and last round.
        tau: distillation temperature.
        rep_dim: r, the common dimension of the auxiliary projections.
        fraction: clients sampled per round.
    """

    teacher: dict[str, Any] = option(default_factory=default_teacher,
                                     help="private teacher model spec; {} = student only")
    teacher_clients: dict[str, Any] = option(default_factory=dict,
                                             help="per-site teacher overrides")
    kd: bool = option(True, help="dual knowledge distillation")
    gpd: bool = option(True, help="SVD compression of the uploaded update")
    t_min: float = option(0.95, help="energy kept by the SVD in the first round")
    t_max: float = option(0.98, help="energy kept by the SVD in the last round")
    tau: float = option(1.0, gt=0, help="distillation temperature")
    rep_dim: int = option(64, ge=1, help="dimension of the common representation space")
    fraction: float = option(1.0, gt=0, le=1, help="fraction of clients per round")

    mean_aggregation = False  # the mean is re-compressed: not a plain mean of updates

    def __post_init__(self) -> None:
        check_thresholds(self.t_min, self.t_max, _WHERE)
        for site, spec in [("", self.teacher), *self.teacher_clients.items()]:
            if not isinstance(spec, dict):
                raise ConfigError(f"{_WHERE}: teacher{'_clients.' + site if site else ''} must "
                                  f"be a model table like {{ name = \"cnn\", width = 64 }}, got "
                                  f"{spec!r}")
        if self.teacher:
            self._check_spec(self.teacher, "teacher")
            for site, spec in self.teacher_clients.items():
                self._check_spec({**self.teacher, **spec}, f"teacher_clients.{site}")
        elif self.teacher_clients:
            raise ConfigError(f"{_WHERE}: teacher_clients overrides the teacher, but teacher = "
                              "{} (no teacher); give teacher = { name = \"cnn\", ... }")

    @staticmethod
    def _check_spec(spec: dict[str, Any], key: str) -> None:
        from histofed.models import MODELS

        if "name" not in spec:
            raise ConfigError(f"{_WHERE}: {key} needs a model name, e.g. {key} = "
                              "{ name = \"cnn\", width = 64 }")
        if "num_classes" in spec:
            raise ConfigError(f"{_WHERE}: {key} sets num_classes = {spec['num_classes']!r}, but "
                              "teacher and student must predict the same classes, which the "
                              f"data gives; remove num_classes from {key}")
        if spec["name"] not in MODELS:
            raise ConfigError(f"{_WHERE}: {key}.name = {spec['name']!r} is not a registered "
                              f"model; choose one of {', '.join(sorted(MODELS.names()))}")

    def teacher_spec(self, site: str) -> dict[str, Any]:
        """This site's teacher spec ({} = none)."""
        if not self.teacher:
            return {}
        return {**self.teacher, **self.teacher_clients.get(site, {})}

    def extra_loss_terms(self) -> list[str]:
        if self.teacher and self.kd:
            return ["the dual distillation terms (KL and L_rep between teacher and student)"]
        return []

    # ---- server side ---------------------------------------------------------------------
    def init_state(self, sctx: ServerContext, init_weights: dict[str, np.ndarray]) -> Payload:
        require_same_architecture(sctx, self.name)  # the student is shared; teachers are not
        names = {c.name for c in sctx.clients}
        unknown = sorted(set(self.teacher_clients) - names)
        if unknown:
            raise ConfigError(f"{_WHERE}: teacher_clients names {unknown}, which are not "
                              f"training sites of this federation ({', '.join(sorted(names))})")
        return Payload(dict(init_weights), {}, kind="state")

    def energy(self, sctx: ServerContext) -> float:
        """T(t) of this round (1.0 = no truncation when gpd is off)."""
        if not self.gpd:
            return 1.0
        return energy_threshold(sctx.round - 1, sctx.rounds, self.t_min, self.t_max)

    def sample(self, sctx: ServerContext) -> list[ClientInfo]:
        """max(1, round(fraction N)) clients without replacement, seeded by (seed, round)."""
        if self.fraction >= 1:
            return list(sctx.clients)
        n = len(sctx.clients)
        m = max(1, int(round(self.fraction * n)))
        chosen = sctx.numpy_rng(_SAMPLING).choice(n, size=m, replace=False)
        return [sctx.clients[i] for i in sorted(chosen)]

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        student = without_namespaces(state.arrays)
        scalars = {"energy": self.energy(sctx), "round": sctx.round}
        down = unprefixed(DOWN, state.arrays)
        last = int(state.scalars.get("down_round", 0))
        out = {}
        for c in self.sample(sctx):
            if down and last == sctx.round - 1 and \
                    int(state.scalars.get(f"synced_{c.cid}", -1)) == last:
                out[c.cid] = Payload(down, {**scalars, "base_round": last,
                                            "shapes": str(state.scalars["down_shapes"])},
                                     kind="svd-factors" if self.gpd else "update")
            else:
                out[c.cid] = Payload(student, scalars, kind="weights")
        return out

    def configure_evaluate(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        weights = Payload(without_namespaces(state.arrays), {}, kind="weights")
        return {c.cid: weights for c in sctx.clients}

    def received_update(self, upload: Payload) -> dict[str, np.ndarray]:
        """A client's update Delta_k, rebuilt from what it uploaded (factors or dense)."""
        return decompress(upload.arrays, shapes_from_scalar(str(upload.scalars["shapes"])))

    def aggregate(self, sctx: ServerContext, state: Payload, results: dict[int, Payload]) -> Payload:
        student = without_namespaces(state.arrays)
        scalars = dict(state.scalars)
        if not results:
            return state
        cids = sorted(results)
        updates = [self.received_update(results[c]) for c in cids]
        weights = [float(results[c].scalars["num_examples"]) for c in cids]
        mean = weighted_mean(updates, weights)  # Delta = sum n_k Delta_k / sum n_k
        energy = self.energy(sctx)
        if self.gpd:
            down, shapes, ranks = compress(mean, energy)
        else:
            down, shapes, ranks = prefixed("d", mean), {k: list(v.shape) for k, v in mean.items()}, {}
        new = add_update(student, decompress(down, shapes))  # the same rebuild the clients do
        scalars.update({"down_round": sctx.round, "down_shapes": shapes_to_scalar(shapes)})
        for c in cids:
            scalars[f"synced_{c}"] = sctx.round  # it holds W_g^(round) and will get the factors
        up_bytes = [int(sum(a.nbytes for a in results[c].arrays.values())) for c in cids]
        # rank each client sent per tensor (0 = dense): where the upload's bytes go
        up_ranks = {str(c): {k: int(results[c].arrays[f"s/{k}"].size)
                             if f"s/{k}" in results[c].arrays else 0 for k in shapes}
                    for c in cids}
        dense_bytes = int(sum(v.nbytes for v in mean.values()))
        sctx.log("fedmic", {"round": sctx.round, "energy": energy, "clients": len(cids),
                            "up_bytes_mean": float(np.mean(up_bytes)), "dense_bytes": dense_bytes,
                            "down_bytes": int(sum(a.nbytes for a in down.values())),
                            "down_ranks": ranks, "up_ranks": up_ranks})
        return Payload({**new, **prefixed(DOWN, down)}, scalars, kind="state")

    def final_weights(self, state: Payload) -> dict[str, np.ndarray]:
        return without_namespaces(state.arrays)

    def personal_weights(self, client: ClientInfo, state: Payload,
                         client_state: Payload) -> dict[str, np.ndarray]:
        return unprefixed("teacher", client_state.arrays)

    def personal_spec(self, client: ClientInfo) -> dict[str, Any]:
        """The personal model is the site's teacher (student-only runs: the student)."""
        teacher = self.teacher_spec(client.name)
        return {"name": client.model["name"], **teacher} if teacher else client.model

    # ---- updates, as the DP wrapper sees them ---------------------------------------------
    def client_update(self, received: Payload, upload: Payload) -> dict[str, np.ndarray]:
        """The truncated update, multiplied out (what FedDP clips and noises)."""
        return self.received_update(upload)

    def apply_update(self, received: Payload, update: dict[str, np.ndarray],
                     upload: Payload) -> Payload:
        """A (clipped, noised) dense update back into an upload ``aggregate`` reads."""
        shapes = {k: list(v.shape) for k, v in update.items()}
        return Payload(prefixed("d", update), {**upload.scalars,
                                               "shapes": shapes_to_scalar(shapes)}, kind="update")

    # ---- client side ---------------------------------------------------------------------
    def receive(self, ctx: ClientContext, payload: Payload) -> dict[str, np.ndarray]:
        """W_g^(t) from the payload (full weights, or factors added to this site's copy)."""
        if payload.kind == "weights":
            return dict(payload.arrays)
        base = int(payload.scalars["base_round"])
        held = int(ctx.state.scalars.get(SYNCED, -1))
        if held != base:
            raise RuntimeError(f"fedmic: client {ctx.name!r} was sent the update of round {base} "
                               f"but holds the global weights of round {held}; the server's "
                               "record of who holds what is out of step with the sites")
        update = decompress(payload.arrays, shapes_from_scalar(str(payload.scalars["shapes"])))
        return add_update(unprefixed("global", ctx.state.arrays), update)

    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        glob = self.receive(ctx, payload)  # W_g^(t), named arrays
        ctx.state.arrays = {**{k: v for k, v in ctx.state.arrays.items()
                               if not k.startswith("global/")}, **prefixed("global", glob)}
        ctx.state.scalars[SYNCED] = int(payload.scalars["round"])
        load_weights(ctx.model, glob)
        spec = self.teacher_spec(ctx.name)
        if not spec:
            ctx.logs.update(local_train(ctx))  # student only: exactly FedAvg's local step
        else:
            ctx.logs.update(self._train_pair(ctx, spec))
        trained = get_weights(ctx.model)
        delta = {k: (trained[k].astype(np.float64) - glob[k]).astype(glob[k].dtype)
                 for k in glob if np.issubdtype(glob[k].dtype, np.floating)}
        if self.gpd:
            arrays, shapes, ranks = compress(delta, float(payload.scalars["energy"]))
            ctx.logs["mean_rank"] = float(np.mean([r for r in ranks.values() if r] or [0]))
            ctx.logs["upload_bytes"] = compressed_nbytes(shapes, ranks)  # = egress (tested)
        else:
            arrays, shapes = prefixed("d", delta), {k: list(v.shape) for k, v in delta.items()}
        scalars = {"num_examples": ctx.data.num_train, "shapes": shapes_to_scalar(shapes)}
        return Payload(arrays, scalars, kind="svd-factors" if self.gpd else "update")

    def _teacher(self, ctx: ClientContext, spec: dict[str, Any]) -> nn.Module:
        assert ctx.build_model is not None
        teacher = ctx.build_model(spec)
        saved = unprefixed("teacher", ctx.state.arrays)
        if saved:
            load_weights(teacher, saved)
        return teacher

    def _check_classes(self, ctx: ClientContext, teacher: nn.Module, spec: dict) -> None:
        x, _ = ctx.data.train[0]
        with torch.no_grad():
            c_t = ctx.task.forward(teacher.eval(), x[None]).shape[1]
            c_s = ctx.task.forward(ctx.model.eval(), x[None]).shape[1]
        if c_t != c_s:
            raise ConfigError(f"{_WHERE}: client {ctx.name!r}: the teacher ({spec}) outputs "
                              f"{c_t} classes but the student [model] outputs {c_s}; teacher "
                              "and student must predict the same classes (drop num_classes "
                              "from the teacher spec: it is taken from the data)")

    def _projections(self, ctx: ClientContext, d_t: int, d_s: int) -> tuple[torch.Tensor, ...]:
        saved = unprefixed("proj", ctx.state.arrays)
        if saved and saved["t"].shape == (self.rep_dim, d_t) and \
                saved["s"].shape == (self.rep_dim, d_s):
            a_t, a_s = torch.from_numpy(saved["t"].copy()), torch.from_numpy(saved["s"].copy())
        else:  # first participation: N(0, 1/d) from this site's seed
            g = ctx.torch_generator(17)
            a_t = torch.randn(self.rep_dim, d_t, generator=g) / d_t**0.5  # r x d_T
            a_s = torch.randn(self.rep_dim, d_s, generator=g) / d_s**0.5  # r x d_S
        return a_t.requires_grad_(True), a_s.requires_grad_(True)

    def _train_pair(self, ctx: ClientContext, spec: dict[str, Any]) -> dict[str, float]:
        teacher, student = self._teacher(ctx, spec), ctx.model
        self._check_classes(ctx, teacher, spec)
        if not self.kd:  # ablation: two independent models (only the student may be DP-trained)
            logs = Trainer().train(ctx, teacher)
            out = {f"teacher_{k}": v for k, v in logs.items()}
            out.update(local_train(ctx))
            ctx.state.arrays = {**ctx.state.arrays, **prefixed("teacher", get_weights(teacher))}
            return out
        head_t, head_s = linear_head(teacher, "teacher"), linear_head(student, "student")
        a_t, a_s = self._projections(ctx, head_t.in_features, head_s.in_features)
        optimizers = [make_optimizer([p for p in teacher.parameters() if p.requires_grad] + [a_t],
                                     ctx.train),
                      make_optimizer([p for p in student.parameters() if p.requires_grad] + [a_s],
                                     ctx.train)]
        parts: dict[str, float] = {}

        def step(batch):
            x, y = batch
            z_t, h_t = forward_with_features(teacher, head_t, ctx.task.forward, x)
            z_s, h_s = forward_with_features(student, head_s, ctx.task.forward, x)
            losses = dual_kd_losses(z_t, z_s, h_t, h_s, y, proj_t=a_t, proj_s=a_s, tau=self.tau)
            for k in ("ce_t", "ce_s", "kl_t", "kl_s", "rep"):
                parts[k] = parts.get(k, 0.0) + float(losses[k])
            return {"teacher": losses["teacher"], "student": losses["student"]}

        logs = optimise(ctx.train.local_steps, step, optimizers, seed=ctx.seed,
                        batches=ctx.task.batches(ctx.data.train, ctx.seed), where=where(ctx),
                        modules=[teacher, student])
        logs.update({k: v / max(ctx.train.local_steps, 1) for k, v in parts.items()})
        ctx.state.arrays = {**ctx.state.arrays, **prefixed("teacher", get_weights(teacher)),
                            **prefixed("proj", {"t": a_t.detach().numpy().copy(),
                                                "s": a_s.detach().numpy().copy()})}
        return logs

    def evaluate(self, ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
        load_weights(ctx.model, payload.arrays)
        out = evaluate_model(ctx, ctx.model, "global")
        spec = self.teacher_spec(ctx.name)
        if spec and unprefixed("teacher", ctx.state.arrays):
            out.update(evaluate_model(ctx, self._teacher(ctx, spec), "personal"))
        return out


__all__ = ["FedMIC", "dual_kd_losses", "kl_divergence"]
