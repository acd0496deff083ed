"""FedDP: differentially private federated training wrapped around FedAvg / FedProx / FedBN.

Pan et al. (arXiv 2411.04509) clip each client's update and add Gaussian noise (their eq. 11),
which is DP-FedAvg at client level (McMahan et al., ICLR 2018). Their "epsilon = C / sigma" is
not an (epsilon, delta) statement; here Opacus' accountants compose the rounds (privacy/).

Client level (``level = "client"``), per round t:
  1. the server samples each client independently with probability ``q`` (Poisson);
  2. each sampled client trains as the ``base`` method does, forms Delta_k = theta_k - theta_t
     over what it would upload, and clips it to L2 norm ``clip`` (C);
  3. ``noise = "central"``: the (trusted) server adds N(0, sigma^2 C^2 I) to the sum of the
     clipped updates; ``noise = "local"``: each client adds it to its own clipped update
     before it leaves the site (what protects it from a curious server; see the audit);
  4. theta_{t+1} = theta_t + server_lr * sum / (q N), a *fixed* denominator (expected number of
     participants), so one client's presence changes the sum by at most C.
  Accounting: central: Poisson-subsampled Gaussian (sigma, q), one step per round, adjacency =
  add/remove one client. Local: per client against the server itself, which knows whom it
  sampled (so no amplification): one Gaussian release per participation with sensitivity 2C
  (replace the client's data), i.e. noise multiplier sigma / 2 at q = 1; the max over clients is
  logged. Updates are unweighted (FedAvg's n_k weights would make the sensitivity data-dependent).

Record level (``level = "record"``): DP-SGD inside each hospital with Opacus (per-record
clipping to C and noise sigma C on each step, Poisson batches of ``batch_size / n`` records);
one accountant per client in its private state, across rounds; the server aggregates as the base
method does, and logs the max epsilon over clients. A record is one training image (for crop
datasets one random crop per image per pass, so each image is one record).

Bad input fails before training: sigma < 0, clip <= 0, q outside (0, 1], delta >= 1/N,
BatchNorm running statistics that would leave a site un-noised, layers Opacus cannot handle.
Not covered by the accountant: evaluation metrics and the local training log (loss, update
norm) that the engine records; treat them as released.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from histofed.algorithms import ALGORITHMS, register_algorithm
from histofed.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientInfo,
    ClientTrainingError,
    Payload,
    ServerContext,
)
from histofed.algorithms.weights import get_weights, load_weights, norm_keys, split_arrays
from histofed.config import ConfigError
from histofed.privacy.accountant import (
    Ledger,
    check_accountant,
    gaussian_epsilon,
    noise_for_epsilon,
)
from histofed.privacy.dp import add_gaussian_noise, check_mechanism, clip_arrays, sum_arrays

BASES = ("fedavg", "fedprox", "fedbn")
SKIP = "skip"  # scalar flag of a no-op job (nobody was sampled; see configure_fit)
_SAMPLING, _SERVER_NOISE, _CLIENT_NOISE = 101, 102, 103  # RNG stream offsets
_WHERE = "[algorithm] (feddp)"


@register_algorithm
@dataclass
class FedDP(Algorithm):
    """DP-FedAvg around a base method. Options (TOML ``[algorithm]``):

    Attributes:
        base: "fedavg" | "fedprox" | "fedbn".
        base_options: the base method's own options, e.g. ``{ mu = 0.01 }``.
        level: "client" (protects a hospital's whole dataset) | "record" (one image, DP-SGD).
        noise: "central" | "local" (client level only).
        clip: C, the L2 bound of a client update (client level) or a per-record gradient.
        sigma: noise multiplier (noise std = sigma * C). Give this or ``target_epsilon``.
        target_epsilon: find sigma with Opacus so epsilon(delta) reaches it after
            ``target_rounds`` rounds (set it to [run].rounds).
        target_rounds: rounds the target budget is for.
        q: client sampling rate per round (Poisson); 1 = every client every round.
        delta: the delta of the reported (epsilon, delta).
        accountant: "rdp" | "prv".
        server_lr: server step on the averaged noisy update.
    """

    name = "feddp"
    base: str = "fedavg"
    base_options: dict[str, Any] = field(default_factory=dict)
    level: str = "client"
    noise: str = "central"
    clip: float = 1.0
    sigma: float | None = None
    target_epsilon: float | None = None
    target_rounds: int | None = None
    q: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ConfigError(f"{_WHERE}: base = {self.base!r}: choose one of {', '.join(BASES)}")
        if self.level not in ("client", "record"):
            raise ConfigError(f'{_WHERE}: level = {self.level!r}: choose "client" or "record"')
        if self.noise not in ("central", "local"):
            raise ConfigError(f'{_WHERE}: noise = {self.noise!r}: choose "central" or "local"')
        if self.level == "record" and self.base == "fedprox":
            raise ConfigError(f"{_WHERE}: level = \"record\" cannot wrap fedprox: its proximal "
                              "term has no per-record gradient, so DP-SGD would drop it. Use "
                              'base = "fedavg" or "fedbn"')
        check_accountant(self.accountant, f"{_WHERE}: accountant")
        if (self.sigma is None) == (self.target_epsilon is None):
            raise ConfigError(f"{_WHERE}: give exactly one of sigma (noise multiplier) or "
                              "target_epsilon (with target_rounds)")
        check_mechanism(sigma=self.sigma, clip=self.clip, q=self.q, delta=self.delta,
                        where=_WHERE)
        if not self.server_lr > 0:
            raise ConfigError(f"{_WHERE}: server_lr = {self.server_lr} must be > 0")
        if self.target_epsilon is not None:
            if not self.target_rounds or self.target_rounds < 1:
                raise ConfigError(f"{_WHERE}: target_epsilon needs target_rounds (set it to "
                                  "[run].rounds: the rounds the budget must last)")
            if self.level == "client":  # record level: per client, in fit (needs its data size)
                self.sigma = self._client_sigma_for_target()
        self._base: Algorithm = ALGORITHMS.get(self.base).from_options(**self.base_options)

    def _client_sigma_for_target(self) -> float:
        assert self.target_epsilon is not None and self.target_rounds is not None
        if self.noise == "local":  # sigma/2 at q = 1 per participation (see module docstring)
            return 2 * noise_for_epsilon(target_epsilon=self.target_epsilon, delta=self.delta,
                                         q=1.0, steps=self.target_rounds,
                                         accountant=self.accountant)
        return noise_for_epsilon(target_epsilon=self.target_epsilon, delta=self.delta, q=self.q,
                                 steps=self.target_rounds, accountant=self.accountant)

    # ---- server side ---------------------------------------------------------------------
    def init_state(self, sctx: ServerContext, init_weights: dict[str, np.ndarray]) -> Payload:
        model = sctx.build_model(None)
        if self.level == "client":
            check_mechanism(delta=self.delta, population=len(sctx.clients), unit="clients",
                            where=_WHERE)
            self._check_buffers(model)
        else:
            check_opacus_compatible(model)
        state = self._base.init_state(sctx, init_weights)
        scalars: dict[str, Any] = dict(state.scalars)
        scalars.update(Ledger().to_scalars())
        scalars["dp_participations"] = [0] * len(sctx.clients)
        scalars["dp_client_epsilon"] = [0.0] * len(sctx.clients)
        scalars["dp_participants_last"] = 0
        return Payload(state.arrays, scalars, kind="state")

    def _check_buffers(self, model: torch.nn.Module) -> None:
        """Float buffers (BatchNorm running stats) are computed from data: they must stay home."""
        local = norm_keys(model) if self.base == "fedbn" else set()
        leaked = [k for k, v in model.named_buffers() if v.is_floating_point() and k not in local]
        if leaked:
            layer = leaked[0].rsplit(".", 1)[0]
            raise ConfigError(
                f"{_WHERE}: layer {layer!r} has running statistics ({leaked[0]}, {len(leaked)} "
                f"buffers in all) computed from private data, which would leave each site without "
                f'noise. Use [model].norm = "group" or "instance", or base = "fedbn" (keeps '
                f"norm layers at home)")

    def _update_keys(self, sctx: ServerContext, state: Payload) -> list[str]:
        """Keys a client update covers: float weights, minus norm layers under FedBN."""
        local = norm_keys(sctx.build_model(None)) if self.base == "fedbn" else set()
        return [k for k, v in state.arrays.items()
                if k not in local and np.issubdtype(v.dtype, np.floating)]

    def sample(self, sctx: ServerContext) -> list[ClientInfo]:
        """Poisson sampling: each client independently with probability q (seeded per round)."""
        if self.q >= 1:
            return list(sctx.clients)
        draws = sctx.numpy_rng(_SAMPLING).random(len(sctx.clients))
        return [c for c, u in zip(sctx.clients, draws, strict=True) if u < self.q]

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        sampled = self.sample(sctx)
        if not sampled:
            # Nobody sampled: the engine needs at least one job per round, so one client gets a
            # no-op job (no weights, no training); aggregation still adds the central noise.
            return {sctx.clients[0].cid: Payload({}, {SKIP: True}, kind="control")}
        return self._base.configure_fit(dataclasses.replace(sctx, clients=sampled), state)

    def configure_evaluate(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        return self._base.configure_evaluate(sctx, state)

    def aggregate(self, sctx: ServerContext, state: Payload,
                  results: dict[int, Payload]) -> Payload:
        real = {c: p for c, p in results.items() if not p.scalars.get(SKIP)}
        scalars = dict(state.scalars)
        scalars["dp_participants_last"] = len(real)
        if self.level == "record":
            eps = list(scalars["dp_client_epsilon"])
            for cid, p in real.items():
                eps[cid] = float(p.scalars["epsilon"])
            scalars["dp_client_epsilon"] = eps
            new = self._base.aggregate(sctx, state, real) if real else state
            return Payload(new.arrays, {**new.scalars, **scalars}, kind="state")
        assert self.sigma is not None
        keys = self._update_keys(sctx, state)
        total = sum_arrays([real[c].arrays for c in sorted(real)],
                           {k: state.arrays[k] for k in keys})
        if self.noise == "central":
            total = add_gaussian_noise(total, self.sigma * self.clip, sctx.numpy_rng(_SERVER_NOISE))
            ledger = Ledger.from_scalars(scalars)
            ledger.step(sigma=self.sigma, q=self.q)
            scalars.update(ledger.to_scalars())
        else:
            counts = list(scalars["dp_participations"])
            for cid in real:
                counts[cid] += 1
            scalars["dp_participations"] = counts
        scale = self.server_lr / (self.q * len(sctx.clients))
        arrays = dict(state.arrays)
        for k in keys:
            arrays[k] = (arrays[k].astype(np.float64) + scale * total[k]).astype(arrays[k].dtype)
        return Payload(arrays, scalars, kind="state")

    def round_logs(self, sctx: ServerContext, state: Payload) -> dict[str, list[dict[str, Any]]]:
        s = state.scalars
        row: dict[str, Any] = {"round": sctx.round, "delta": self.delta,
                               "accountant": self.accountant, "level": self.level,
                               "clip": self.clip, "q": self.q,
                               "participants": int(s["dp_participants_last"])}
        if self.level == "record":
            eps = [float(e) for e in s["dp_client_epsilon"]]
            row.update(epsilon=max(eps), mechanism="DP-SGD per hospital (Opacus), max over clients",
                       sigma=self.sigma if self.sigma is not None else "per-client target")
            per_client = [{"round": sctx.round, "client": c.name, "epsilon": eps[c.cid],
                           "delta": self.delta, "accountant": self.accountant}
                          for c in sctx.clients]
            return {"privacy": [row], "privacy_clients": per_client}
        assert self.sigma is not None
        row.update(sigma=self.sigma, noise=self.noise, expected_clients=self.q * len(sctx.clients))
        if self.noise == "central":
            ledger = Ledger.from_scalars(s)
            row.update(epsilon=ledger.epsilon(self.delta, self.accountant),
                       mechanism="DP-FedAvg, client level, Poisson-subsampled Gaussian, "
                                 "central noise")
            if self.q == 1:  # no subsampling: the closed form is exact (accountant.py)
                row["epsilon_exact"] = gaussian_epsilon(sigma=self.sigma, steps=ledger.steps,
                                                        delta=self.delta)
        else:
            worst = max(int(n) for n in s["dp_participations"])
            led = Ledger()
            led.step(sigma=self.sigma / 2, q=1.0, steps=worst)
            row.update(epsilon=led.epsilon(self.delta, self.accountant),
                       mechanism="DP-FedAvg, client level, local noise: each client vs the "
                                 "server (replace-one, sigma/2, no amplification), max over "
                                 "clients")
        return {"privacy": [row]}

    def final_weights(self, state: Payload) -> dict[str, np.ndarray]:
        return self._base.final_weights(state)

    def personal_weights(self, state: Payload, client_state: Payload) -> dict[str, np.ndarray]:
        return self._base.personal_weights(state, client_state)

    # ---- client side ---------------------------------------------------------------------
    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        if payload.scalars.get(SKIP):
            return Payload({}, {SKIP: True}, kind="control")
        if self.level == "record":
            return self._fit_record_level(ctx, payload)
        out = self._base.fit(ctx, payload)
        missing = [k for k in out.arrays if k not in payload.arrays]
        if missing:
            raise RuntimeError(f"feddp: the {self.base} client returned weights it never received "
                               f"({missing[:3]}); cannot form an update")
        delta = {k: (v.astype(np.float64) - payload.arrays[k]).astype(v.dtype)
                 for k, v in out.arrays.items() if np.issubdtype(v.dtype, np.floating)}
        clipped, norm = clip_arrays(delta, self.clip)
        ctx.logs["update_norm"] = norm  # stays in the local log (see module docstring)
        kind = "clipped-update"
        if self.noise == "local":
            assert self.sigma is not None
            clipped = add_gaussian_noise(clipped, self.sigma * self.clip,
                                         ctx.numpy_rng(_CLIENT_NOISE))
            kind = "noised-update"
        return Payload(clipped, {"num_examples": out.scalars.get("num_examples", 0)}, kind=kind)

    def evaluate(self, ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
        return self._base.evaluate(ctx, payload)

    def _fit_record_level(self, ctx: ClientContext, payload: Payload) -> Payload:
        """DP-SGD (Opacus) from the received weights; the client's accountant lives in ctx.state."""
        if self.base == "fedbn":
            load_weights(ctx.model, payload.arrays)
            load_weights(ctx.model, ctx.state.arrays)
        else:
            load_weights(ctx.model, payload.arrays)
        ledger = Ledger.from_scalars(ctx.state.scalars)
        logs, ledger = dp_sgd_train(
            ctx, ledger=ledger, clip=self.clip, sigma=self.sigma,
            target_epsilon=self.target_epsilon, target_rounds=self.target_rounds,
            delta=self.delta, accountant=self.accountant)
        ctx.logs.update(logs)
        ctx.state.scalars.update(ledger.to_scalars())
        weights = get_weights(ctx.model)
        if self.base == "fedbn":
            local_norm, weights = split_arrays(weights, norm_keys(ctx.model))
            ctx.state.arrays = local_norm
        return Payload(weights, {"num_examples": ctx.data.num_train, "epsilon": logs["epsilon"]},
                       kind="weights")


def check_opacus_compatible(model: torch.nn.Module) -> None:
    """Raise ConfigError naming the first layer Opacus' DP-SGD cannot train."""
    import torch.nn as nn
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    problems = []
    for name, module in model.named_modules():
        inplace_act = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Hardtanh)
        if getattr(module, "inplace", False) and isinstance(module, inplace_act):
            problems.append(f"{name} ({type(module).__name__} with inplace=True)")
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None and validator(module):
            problems.append(f"{name} ({type(module).__name__}: mixes records within a batch)")
    if problems:
        raise ConfigError(
            f"{_WHERE}: level = \"record\" (DP-SGD) cannot train layer {problems[0]}"
            f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}. Use "
            '[model].norm = "group" (or "instance") and no in-place activations')


class OneCropPerImage(Dataset):
    """A crop dataset seen as one record per source image (item i = a crop of image i).

    ``SegmentationCrops`` item i comes from image ``i % n_images``, so items 0..n_images-1 are
    one crop of each image; ``reseed`` draws new crops for each pass.
    """

    def __init__(self, crops: Dataset) -> None:
        self.crops = crops
        self.n = len(crops.images)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.crops[i]

    def reseed(self, seed: int) -> None:
        self.crops.reseed(seed)  # type: ignore[attr-defined]


def records_of(dataset: Dataset) -> Dataset:
    """The privacy unit of a training set: images for crop datasets, items otherwise."""
    from histofed.data.datasets import SegmentationCrops

    return OneCropPerImage(dataset) if isinstance(dataset, SegmentationCrops) else dataset


def dp_sgd_train(ctx: ClientContext, *, ledger: Ledger, clip: float, sigma: float | None,
                 target_epsilon: float | None, target_rounds: int | None, delta: float,
                 accountant: str) -> tuple[dict[str, float], Ledger]:
    """``ctx.train.local_steps`` DP-SGD steps on ``ctx.model`` with Opacus (Poisson batches).

    The client's accountant history ``ledger`` goes into Opacus' accountant and comes back
    extended by this round's steps. With ``target_epsilon`` the client picks its own sigma so
    that ``target_rounds * local_steps`` steps at its sampling rate reach the target.

    Raises:
        PrivacyConfigError: delta >= 1 / (number of records of this client).
        ClientTrainingError: the loss became NaN/inf.
    """
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from histofed.tasks import make_optimizer

    records = records_of(ctx.data.train)
    n = len(records)
    check_mechanism(delta=delta, population=n, where=_WHERE,
                    unit=f"training records (images) of client {ctx.name!r}")
    batch = min(ctx.train.batch_size, n)
    q = 1.0 / math.ceil(n / batch)  # Opacus' sampling rate: 1 / len(loader)
    if sigma is None:
        assert target_epsilon is not None and target_rounds is not None
        sigma = noise_for_epsilon(target_epsilon=target_epsilon, delta=delta, q=q,
                                  steps=target_rounds * ctx.train.local_steps,
                                  accountant=accountant)
    loader = DataLoader(records, batch_size=batch, generator=ctx.torch_generator(11))
    optimizer = make_optimizer(ctx.model, ctx.train)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Secure RNG turned off")  # seeded on purpose
        warnings.filterwarnings("ignore", "Full backward hook is firing")  # inputs need no grad
        engine = PrivacyEngine(accountant=accountant)
        engine.accountant.history = ledger.to_opacus()
        model, optimizer, loader = engine.make_private(
            module=ctx.model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=clip, poisson_sampling=True, noise_generator=ctx.torch_generator(12))
        try:
            total, steps = _dp_sgd_steps(ctx, model, optimizer, loader, records)
        finally:
            model._close()  # remove Opacus' hooks from ctx.model
    ledger = Ledger.from_opacus(engine.accountant.history)
    eps = ledger.epsilon(delta, accountant)
    return {"loss": total / steps, "steps": steps, "epsilon": eps, "sigma": sigma,
            "record_rate": q}, ledger


def _dp_sgd_steps(ctx: ClientContext, model, optimizer, loader, records) -> tuple[float, int]:
    """The DP-SGD loop: ``local_steps`` Poisson batches, new crops every pass over the records."""
    from histofed.tasks import reseed

    model.train()
    steps, total, epoch = 0, 0.0, 0
    while steps < ctx.train.local_steps:
        reseed(records, ctx.seed + 104729 * epoch)
        for inputs, target in loader:
            if steps >= ctx.train.local_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            logits = ctx.task.forward(model, inputs)
            if len(inputs) == 0:  # empty Poisson batch: a noise-only step, still accounted
                loss = logits.sum() * 0.0
            else:
                loss = ctx.task.loss(logits, target)
                if not torch.isfinite(loss):
                    raise ClientTrainingError(
                        f"client {ctx.name!r}, round {ctx.round}, DP-SGD step {steps + 1}: loss is "
                        f"{loss.item()} (lower [train].lr); its update is dropped this round")
                total += loss.item()
            loss.backward()
            optimizer.step()
            steps += 1
        epoch += 1
    return total, steps
