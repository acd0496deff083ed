"""FedDP: differentially private federated training wrapped around any federated method.

Pan et al. (arXiv 2411.04509) clip each client's update and add Gaussian noise (their eq. 11),
which is DP-FedAvg at client level (McMahan et al., ICLR 2018). Their "epsilon = C / sigma" is
not an (epsilon, delta) statement; here Opacus' accountants compose the rounds (privacy/).

The wrapped method (``base``, any registered method that uploads something) is never named
here: the wrapper works on what it uploads. ``Algorithm.client_update`` turns a client's upload
into the update Delta_k that is clipped (by default: uploaded weights minus received weights;
a method whose upload is already an update, e.g. low-rank factors, overrides it), and
``Algorithm.apply_update`` turns a clipped, noised update back into an upload on the server.

Client level (``level = "client"``), per round t:
  1. the server samples each client independently with probability ``q`` (Poisson);
  2. each sampled client trains as the base method does, forms Delta_k and clips it to L2 norm
     ``clip`` (C): Delta_k <- Delta_k * min(1, C / ||Delta_k||);
  3. ``noise = "central"``: the (trusted) server adds N(0, sigma^2 C^2 I) to the sum of the
     clipped updates; ``noise = "local"``: each client adds it to its own clipped update
     before it leaves the site (what protects it from a curious server; see the audit);
  4. a base whose aggregation is a mean of updates (``mean_aggregation``: FedAvg, FedProx,
     FedBN) gets DP-FedAvg's step theta_{t+1} = theta_t + server_lr * sum / (q N) with a
     *fixed* denominator (expected number of participants), so one client's presence changes
     the sum by at most C. Any other base (FedSODA's fusion) needs ``noise = "local"``: each
     noised update is turned back into an upload and the base aggregates as it always does,
     which is post-processing of already private releases.
  Accounting: central: Poisson-subsampled Gaussian (sigma, q), one step per round, adjacency =
  add/remove one client. Local: per client against the server itself, which knows whom it
  sampled (so no amplification): one Gaussian release per participation with sensitivity 2C
  (replace the client's data), i.e. noise multiplier sigma / 2 at q = 1; the max over clients is
  logged. Updates are unweighted (FedAvg's n_k weights would make the sensitivity data-dependent).

Record level (``level = "record"``): DP-SGD inside each hospital with Opacus (per-record
clipping to C and noise sigma C on each step, Poisson batches of ``batch_size / n`` records),
swapped in as the job's trainer, so the base method trains with DP-SGD without knowing; one
accountant per client in its private state, across rounds; the server aggregates as the base
does, and logs the max epsilon over clients. A record is one training image (for crop datasets
one random crop per image per pass, so each image is one record). Loss terms that are not a sum
over records (FedProx's proximal term, FedSODA's L_sc) are refused.

Bad input fails before training: sigma < 0, clip <= 0, q outside (0, 1], delta >= 1/N,
float buffers (BatchNorm running statistics) that the base uploads but no noise would cover at
record level, or that it does not keep home at client level, layers Opacus cannot handle.
Not covered by the accountant, and logged as ``released`` in privacy.jsonl: the scalars the
base uploads beside its arrays (e.g. num_examples, FedSODA's intensity mean and std), the
evaluation metrics and the local training log (loss, update norm) that the engine records.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from histofed.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    ClientContext,
    ClientInfo,
    Payload,
    ServerContext,
    register_algorithm,
)
from histofed.algorithms.training import ExtraLoss, Trainer, make_optimizer, optimise, passes, where
from histofed.config import ConfigError
from histofed.options import option
from histofed.privacy.accountant import (
    Ledger,
    check_accountant,
    gaussian_epsilon,
    noise_for_epsilon,
)
from histofed.privacy.dp import add_gaussian_noise, check_mechanism, clip_arrays, sum_arrays

SKIP = "skip"  # scalar flag of a no-op job (nobody was sampled; see configure_fit)
CLIENT_LEDGER = "feddp/dp_"  # prefix of a client's DP-SGD accountant in its private state
_SAMPLING, _SERVER_NOISE, _CLIENT_NOISE = 101, 102, 103  # RNG stream offsets
_WHERE = "[algorithm] (feddp)"


def _real(uploads: dict[int, Payload]) -> dict[int, Payload]:
    """The uploads of clients that trained (not the no-op job of a round that sampled nobody)."""
    return {c: p for c, p in uploads.items() if not p.scalars.get(SKIP)}


def _as_epsilon(value: Any) -> float:
    """A site's reported record-level epsilon; missing or NaN counts as no guarantee (inf)."""
    try:
        eps = float(value)
    except (TypeError, ValueError):
        return math.inf
    return math.inf if math.isnan(eps) else eps


@register_algorithm("feddp")
@dataclass
class FedDP(Algorithm):
    """DP around a base method. Options (TOML ``[algorithm]``):

    Attributes:
        base: the wrapped method's registry name (e.g. "fedavg", "fedbn", "fedsoda").
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
        server_lr: server step on the averaged noisy update (mean-aggregating bases).
    """

    base: str = "fedavg"
    base_options: dict[str, Any] = option(default_factory=dict)
    level: Literal["client", "record"] = "client"
    noise: Literal["central", "local"] = "central"
    clip: float = 1.0
    sigma: float | None = None
    target_epsilon: float | None = None
    target_rounds: int | None = None
    q: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        check_accountant(self.accountant, f"{_WHERE}: accountant")
        if (self.sigma is None) == (self.target_epsilon is None):
            raise ConfigError(f"{_WHERE}: give exactly one of sigma (noise multiplier) or "
                              "target_epsilon (with target_rounds)")
        check_mechanism(sigma=self.sigma, clip=self.clip, q=self.q, delta=self.delta,
                        where=_WHERE)
        if not self.server_lr > 0:
            raise ConfigError(f"{_WHERE}: server_lr = {self.server_lr} must be > 0")
        self._base: Algorithm = self._build_base()
        if self.target_epsilon is not None:
            if not self.target_rounds or self.target_rounds < 1:
                raise ConfigError(f"{_WHERE}: target_epsilon needs target_rounds (set it to "
                                  "[run].rounds: the rounds the budget must last)")
            if self.level == "client":  # record level: per client, in fit (needs its data size)
                self.sigma = self._client_sigma_for_target()

    def _build_base(self) -> Algorithm:
        from histofed.registry import UnknownNameError

        try:
            cls = ALGORITHMS.get(self.base)
        except UnknownNameError as err:
            raise ConfigError(f"{_WHERE}: base: {err}") from None
        if cls is FedDP or cls.pooled:
            raise ConfigError(f"{_WHERE}: base = {self.base!r} cannot be wrapped: "
                              + ("FedDP is already the wrapper" if cls is FedDP else
                                 "it pools raw data, so there is no update to protect"))
        base = cls.from_options(**self.base_options)
        if self.level == "client" and self.noise == "central" and not base.mean_aggregation:
            raise ConfigError(
                f"{_WHERE}: noise = \"central\" adds noise to the sum of client updates, which "
                f"needs a base whose aggregation is a mean of updates; {self.base!r} aggregates "
                "otherwise (e.g. a fusion of models). Use noise = \"local\" (each site noises its "
                "own update; the base then aggregates the private releases as usual)")
        terms = extra_loss_terms(base)
        if self.level == "record" and terms:
            raise ConfigError(
                f"{_WHERE}: level = \"record\" (DP-SGD) clips one gradient per record, but "
                f"{self.base!r} adds {', '.join(terms)}, which is not a sum over records, so "
                "DP-SGD would drop or mis-clip it. Turn it off in base_options or use level = "
                "\"client\"")
        return base

    def _client_sigma_for_target(self) -> float:
        assert self.target_epsilon is not None and self.target_rounds is not None
        if self.noise == "local":  # sigma/2 at q = 1 per participation (see module docstring)
            return 2 * noise_for_epsilon(target_epsilon=self.target_epsilon, delta=self.delta,
                                         q=1.0, steps=self.target_rounds,
                                         accountant=self.accountant)
        return noise_for_epsilon(target_epsilon=self.target_epsilon, delta=self.delta, q=self.q,
                                 steps=self.target_rounds, accountant=self.accountant)

    # personal parts (FedBN's norm layers, a personal model) are trained without DP: they
    # never go to another site, not even to be scored on a held-out one
    personal_models_may_travel: ClassVar[bool] = False

    @property
    def mean_aggregation(self) -> bool:  # type: ignore[override]
        return False  # already private: nothing a second wrapper may re-aggregate

    # ---- server side ---------------------------------------------------------------------
    def init_state(self, sctx: ServerContext, init_weights: dict[str, np.ndarray]) -> Payload:
        state = self._base.init_state(sctx, init_weights)  # the base's checks come first
        model = sctx.build_model(None)
        if self.level == "client":
            check_mechanism(delta=self.delta, population=len(sctx.clients), unit="clients",
                            where=_WHERE)
            self._check_buffers(model)
        else:
            check_opacus_compatible(model)
        scalars: dict[str, Any] = dict(state.scalars)
        scalars.update(Ledger().to_scalars())
        scalars["dp_participations"] = [0] * len(sctx.clients)
        scalars["dp_client_epsilon"] = [0.0] * len(sctx.clients)
        scalars["dp_participants_last"] = 0
        scalars["dp_released"] = []
        return Payload(state.arrays, scalars, kind="state")

    def _check_buffers(self, model: torch.nn.Module) -> None:
        """Float buffers (BatchNorm running stats) are computed from data: they must stay home."""
        home = self._base.local_keys(model)
        leaked = [k for k, v in model.named_buffers() if v.is_floating_point() and k not in home]
        if leaked:
            layer = leaked[0].rsplit(".", 1)[0]
            raise ConfigError(
                f"{_WHERE}: layer {layer!r} has running statistics ({leaked[0]}, {len(leaked)} "
                f"buffers in all) computed from private data, which would leave each site without "
                f'noise. Use [model].norm = "group" or "instance", or a base that keeps norm '
                f'layers at home (e.g. base = "fedbn")')

    def _update_keys(self, sctx: ServerContext, state: Payload) -> list[str]:
        """Keys a client update covers when nobody reported one: float weights, minus the
        keys the base keeps at home."""
        home = self._base.local_keys(sctx.build_model(None))
        return [k for k, v in state.arrays.items() if "/" not in k and k not in home
                and np.issubdtype(v.dtype, np.floating)]

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

    def expected_upload(self, sctx: ServerContext, state: Payload,
                        cid: int) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
        """The base's upload (record level), or its float arrays (client level: the clipped
        update covers those). None for a no-op job or a base without a structural check."""
        if cid not in {c.cid for c in self.sample(sctx)}:
            return None  # the no-op job of a round that sampled nobody (see configure_fit)
        expected = self._base.expected_upload(sctx, state, cid)
        if expected is None or self.level == "record":
            return expected
        return {k: v for k, v in expected.items() if np.issubdtype(v[1], np.floating)}

    ledger_streams = ("privacy", "privacy_clients")

    def account_released(self, sctx: ServerContext, state: Payload,
                         arrived: dict[int, Payload]) -> Payload:
        """Every upload that reached the server spent privacy, kept or rejected by the engine's
        checks: record level takes each site's own epsilon (non-finite stays: sigma = 0 has no
        guarantee), local noise counts one more release per site. Central noise spends nothing
        here: only the noised aggregate is released (aggregate's ledger step)."""
        real = _real(arrived)
        scalars = dict(state.scalars)
        if self.level == "record":
            eps = list(scalars["dp_client_epsilon"])
            for cid, p in real.items():
                eps[cid] = max(eps[cid], _as_epsilon(p.scalars.get("epsilon")))
            scalars["dp_client_epsilon"] = eps
        elif self.noise == "local":
            scalars["dp_participations"] = [n + (cid in real) for cid, n in
                                            enumerate(scalars["dp_participations"])]
        return Payload(state.arrays, scalars, kind=state.kind)

    def aggregate(self, sctx: ServerContext, state: Payload,
                  results: dict[int, Payload]) -> Payload:
        real = _real(results)
        scalars = dict(state.scalars)
        scalars["dp_participants_last"] = len(real)
        scalars["dp_released"] = sorted({k for p in real.values() for k in p.scalars})
        if self.level == "record":
            new = self._base.aggregate(sctx, state, real) if real else state
            return Payload(new.arrays, {**new.scalars, **scalars}, kind="state")
        if not self._base.mean_aggregation:  # local noise (checked): the base aggregates
            return self._aggregate_by_base(sctx, state, real, scalars)
        assert self.sigma is not None
        keys = sorted({k for p in real.values() for k in p.arrays}) or \
            self._update_keys(sctx, state)
        total = sum_arrays([real[c].arrays for c in sorted(real)],
                           {k: state.arrays[k] for k in keys})
        if self.noise == "central":
            total = add_gaussian_noise(total, self.sigma * self.clip, sctx.numpy_rng(_SERVER_NOISE))
            ledger = Ledger.from_scalars(scalars)
            ledger.step(sigma=self.sigma, q=self.q)
            scalars.update(ledger.to_scalars())
        scale = self.server_lr / (self.q * len(sctx.clients))
        arrays = dict(state.arrays)
        for k in keys:
            arrays[k] = (arrays[k].astype(np.float64) + scale * total[k]).astype(arrays[k].dtype)
        return Payload(arrays, scalars, kind="state")

    def _aggregate_by_base(self, sctx: ServerContext, state: Payload, real: dict[int, Payload],
                           scalars: dict[str, Any]) -> Payload:
        """Noised updates -> the uploads the base expects (what each client was sent, plus its
        private update) -> the base's own aggregation."""
        if not real:
            return Payload(state.arrays, scalars, kind="state")
        # the very call configure_fit made (sampling is seeded by (seed, round)): a base that
        # samples or shapes payloads from the client list must see the same list again
        sent = self._base.configure_fit(dataclasses.replace(sctx, clients=self.sample(sctx)),
                                        state)
        uploads = {c: self._base.apply_update(sent[c], p.arrays,
                                              Payload({}, dict(p.scalars), kind="weights"))
                   for c, p in real.items()}
        new = self._base.aggregate(sctx, state, uploads)
        return Payload(new.arrays, {**new.scalars, **scalars}, kind="state")

    def round_logs(self, sctx: ServerContext, state: Payload) -> dict[str, list[dict[str, Any]]]:
        s = state.scalars
        row: dict[str, Any] = {"round": sctx.round, "delta": self.delta,
                               "accountant": self.accountant, "level": self.level,
                               "clip": self.clip, "q": self.q, "base": self.base,
                               "participants": int(s["dp_participants_last"]),
                               "released": list(s.get("dp_released", []))}
        logs = self._base.round_logs(sctx, state)
        if self.level == "record":
            eps = [float(e) for e in s["dp_client_epsilon"]]
            row.update(epsilon=max(eps), mechanism="DP-SGD per hospital (Opacus), max over clients",
                       sigma=self.sigma if self.sigma is not None else "per-client target")
            per_client = [{"round": sctx.round, "client": c.name, "epsilon": eps[c.cid],
                           "delta": self.delta, "accountant": self.accountant}
                          for c in sctx.clients]
            return {**logs, "privacy": [row], "privacy_clients": per_client}
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
                       mechanism="client level, local noise: each client vs the server "
                                 "(replace-one, sigma/2, no amplification), max over clients")
        return {**logs, "privacy": [row]}

    def final_weights(self, state: Payload) -> dict[str, np.ndarray]:
        return self._base.final_weights(state)

    def personal_weights(self, client: ClientInfo, state: Payload,
                         client_state: Payload) -> dict[str, np.ndarray]:
        return self._base.personal_weights(client, state, client_state)

    def local_keys(self, model: torch.nn.Module) -> set[str]:
        return self._base.local_keys(model)

    def personal_spec(self, client: ClientInfo) -> dict[str, Any]:
        return self._base.personal_spec(client)

    # ---- client side ---------------------------------------------------------------------
    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        if payload.scalars.get(SKIP):
            return Payload({}, {SKIP: True}, kind="control")
        if self.level == "record":
            return self._fit_record_level(ctx, payload)
        upload = self._base.fit(ctx, payload)
        update = self._base.client_update(payload, upload)
        clipped, norm = clip_arrays(update, self.clip)
        ctx.logs["update_norm"] = norm  # stays in the local log (see module docstring)
        kind = "clipped-update"
        if self.noise == "local":
            assert self.sigma is not None
            clipped = add_gaussian_noise(clipped, self.sigma * self.clip,
                                         ctx.numpy_rng(_CLIENT_NOISE))
            kind = "noised-update"
        return Payload(clipped, dict(upload.scalars), kind=kind)

    def evaluate(self, ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
        return self._base.evaluate(ctx, payload)

    def _fit_record_level(self, ctx: ClientContext, payload: Payload) -> Payload:
        """The base's own fit, trained with DP-SGD; the client's accountant lives in ctx.state."""
        trainer = DPSGDTrainer(ledger=Ledger.from_scalars(ctx.state.scalars, CLIENT_LEDGER),
                               clip=self.clip, sigma=self.sigma,
                               target_epsilon=self.target_epsilon,
                               target_rounds=self.target_rounds, delta=self.delta,
                               accountant=self.accountant)
        ctx.trainer = trainer
        upload = self._base.fit(ctx, payload)
        if trainer.calls == 0:
            raise RuntimeError(f"feddp: {self.base!r} did not train through ctx.trainer, so "
                               "DP-SGD never ran; its upload is not private")
        eps = trainer.ledger.epsilon(self.delta, self.accountant)
        ctx.state.scalars.update(trainer.ledger.to_scalars(CLIENT_LEDGER))
        ctx.logs.update(epsilon=eps)
        # sigma = 0 (no noise, no guarantee) gives epsilon = inf; the server rejects non-finite
        # float scalars (engine/validate.py), so infinity travels as the string "inf"
        sent = eps if math.isfinite(eps) else "inf"
        return Payload(upload.arrays, {**upload.scalars, "epsilon": sent}, kind=upload.kind)


def extra_loss_terms(algorithm: Algorithm) -> list[str]:
    """Loss terms a method adds to the task loss (declared by ``Algorithm.extra_loss_terms``)."""
    terms = getattr(algorithm, "extra_loss_terms", ())
    return list(terms() if callable(terms) else terms)


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


class DPSGDTrainer(Trainer):
    """DP-SGD with Opacus behind the ``ClientContext.trainer`` interface (record level).

    Each ``train`` call runs ``steps`` DP-SGD steps (default ``[train].local_steps``) through
    the one loop (:func:`~histofed.algorithms.training.optimise`) on Poisson batches of records,
    with per-record clipping to ``clip`` and noise ``sigma * clip``. The client's accountant
    history ``ledger`` goes into Opacus' accountant and comes back extended. With
    ``target_epsilon`` the client picks its own sigma so that ``target_rounds * local_steps``
    steps at its sampling rate reach the target.

    Raises (from ``train``):
        PrivacyConfigError: delta >= 1 / (number of records of this client).
        ConfigError: an extra loss term (it is not a sum over records).
        ClientTrainingError: the loss became NaN/inf.
    """

    def __init__(self, *, ledger: Ledger, clip: float, sigma: float | None,
                 target_epsilon: float | None, target_rounds: int | None, delta: float,
                 accountant: str) -> None:
        self.ledger, self.clip, self.sigma = ledger, clip, sigma
        self.target_epsilon, self.target_rounds = target_epsilon, target_rounds
        self.delta, self.accountant = delta, accountant
        self.calls = 0

    def train(self, ctx: ClientContext, model: torch.nn.Module | None = None, *,
              extra_loss: ExtraLoss | None = None, steps: int | None = None) -> dict[str, float]:
        import warnings

        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        if extra_loss is not None:
            raise ConfigError(f"{_WHERE}: level = \"record\" cannot train an extra loss term "
                              "(not a sum over records); turn it off in base_options")
        model = model if model is not None else ctx.model
        if getattr(model, "auxiliary_loss", None) is not None:
            raise ConfigError(f"{_WHERE}: level = \"record\" cannot train {type(model).__name__}'s "
                              "auxiliary (instance) loss per record; use another [model] or level = "
                              "\"client\"")
        steps = steps or ctx.train.local_steps
        records = records_of(ctx.data.train)
        n = len(records)
        check_mechanism(delta=self.delta, population=n, where=_WHERE,
                        unit=f"training records (images) of client {ctx.name!r}")
        batch = min(ctx.train.batch_size, n)
        q = 1.0 / math.ceil(n / batch)  # Opacus' sampling rate: 1 / len(loader)
        sigma = self.sigma
        if sigma is None:
            assert self.target_epsilon is not None and self.target_rounds is not None
            sigma = noise_for_epsilon(target_epsilon=self.target_epsilon, delta=self.delta, q=q,
                                      steps=self.target_rounds * ctx.train.local_steps,
                                      accountant=self.accountant)
        loader = DataLoader(records, batch_size=batch, generator=ctx.torch_generator(11))
        optimizer = make_optimizer(model, ctx.train)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Secure RNG turned off")  # seeded on purpose
            warnings.filterwarnings("ignore", "Full backward hook is firing")  # inputs need no grad
            engine = PrivacyEngine(accountant=self.accountant)
            engine.accountant.history = self.ledger.to_opacus()
            private, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=self.clip, poisson_sampling=True,
                noise_generator=ctx.torch_generator(12))

            def step(batch):
                inputs, target = batch
                logits = ctx.task.forward(private, inputs)
                if len(inputs) == 0:  # empty Poisson batch: a noise-only step, still accounted
                    return logits.sum() * 0.0
                return ctx.task.loss(logits, target)

            try:
                logs = optimise(steps, step, [optimizer], seed=ctx.seed,
                                batches=passes(records, ctx.seed, lambda epoch: loader),
                                where=f"{where(ctx)} (DP-SGD)", modules=[private])
            finally:
                private._close()  # remove Opacus' hooks from the model
        self.ledger = Ledger.from_opacus(engine.accountant.history)
        self.calls += 1
        return {**logs, "sigma": sigma, "record_rate": q}
