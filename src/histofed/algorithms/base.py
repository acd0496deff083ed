"""The algorithm contract, independent of any FL engine (Flower knows nothing of it, and it
knows nothing of Flower).

A method is one object with a client part and a server part::

    server: init_state -> configure_fit -> [clients: fit] -> aggregate -> configure_evaluate
    client: fit(ctx, payload) -> Payload            evaluate(ctx, payload) -> {model: metrics}

The server part sees a :class:`ServerContext`: the roster (one :class:`ClientInfo` per site:
what the site chose to tell, never its data), a model factory built from the roster's model
specs, the task and the trainer (for methods that evaluate or optimise on the server), seeded
randomness and ``log``. The client part sees a :class:`ClientContext`: its data, its model,
``build_model`` for a second model on site, the trainer (every optimisation loop goes through
algorithms/training.py) and its private ``state``.

Everything that crosses the network is a :class:`Payload`: named numpy arrays plus JSON-able
scalars (the same shape as Flower's ArrayRecord + ConfigRecord; never a pickle). A payload's
``kind`` ("weights", "stats", "svd-factors", "synthetic-images", ...) is logged with its size in
``egress.jsonl``. What must never leave a site lives in ``ctx.state`` (also a Payload): a
teacher model, personalised weights, optimiser state, a per-client privacy accountant. Engines
persist it between rounds and in checkpoints but never send it; keep a method's keys in its own
namespace (:func:`prefixed`). The server state is a Payload too, so it checkpoints the same way.
Randomness is always derived from (run seed, round, client).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from histofed.algorithms.aggregate import weighted_mean
from histofed.config import ConfigError
from histofed.registry import Registry

if TYPE_CHECKING:
    from histofed.config import EvalConfig, TrainConfig
    from histofed.data.federation import ClientData
    from histofed.tasks import Task

Scalar = int | float | str | bool
ScalarValue = Scalar | list[Scalar]


@dataclass
class Payload:
    """Named arrays + scalars; what one party sends to another (or keeps as state).

    Example:
        >>> p = Payload({"w": np.zeros(3, np.float32)}, {"num_examples": 12})
        >>> p.nbytes()
        {'weights': 12, 'scalars': 19}
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, ScalarValue] = field(default_factory=dict)
    kind: str = "weights"

    def nbytes(self) -> dict[str, int]:
        """Bytes per kind: array bytes under ``kind``, scalars (as JSON) under "scalars"."""
        out: dict[str, int] = {}
        if self.arrays:
            out[self.kind] = int(sum(a.nbytes for a in self.arrays.values()))
        if self.scalars:
            out["scalars"] = len(json.dumps(self.scalars, separators=(",", ":")))
        return out

    def sha256(self) -> dict[str, str]:
        """SHA-256 per kind, as :meth:`nbytes` counts them: the arrays' canonical bytes under
        ``kind`` (for each name in sorted order: the UTF-8 name, NUL, ``dtype.str``, NUL, the
        shape as ``repr(tuple)``, NUL, the C-order data), the scalars' canonical JSON (sorted
        keys, no spaces) under "scalars". A site can recompute it to check the egress log.

        Example:
            >>> Payload({}, {"n": 1}).sha256()["scalars"][:12]
            '2bfd14f43d17'
        """
        out: dict[str, str] = {}
        if self.arrays:
            h = hashlib.sha256()
            for name in sorted(self.arrays):
                a = np.asarray(self.arrays[name], order="C")  # (ascontiguousarray makes 0-d 1-d)
                h.update(f"{name}\0{a.dtype.str}\0{tuple(a.shape)!r}\0".encode())
                h.update(a.reshape(-1).view(np.uint8))  # the data, without a copy
            out[self.kind] = h.hexdigest()
        if self.scalars:
            text = json.dumps(self.scalars, sort_keys=True, separators=(",", ":"))
            out["scalars"] = hashlib.sha256(text.encode()).hexdigest()
        return out

    def is_empty(self) -> bool:
        return not self.arrays and not self.scalars

    def copy(self) -> Payload:
        return Payload({k: v.copy() for k, v in self.arrays.items()}, copy.deepcopy(self.scalars),
                       self.kind)


@dataclass
class ClientInfo:
    """One roster entry: what the coordinator knows of a site, and all it knows.

    A site tells it at the start of a run (in-process: read off the federation by the client
    side of the engine; on Flower: the handshake reply of the site's SuperNode). The server side
    never builds a client's dataset.

    Attributes:
        cid: the client's index in the federation (0-based).
        name: the site's name (used in logs, file names and tables).
        num_train: training examples (tiles, patches or bags): FedAvg's weight.
        task: "segmentation" | "classification" | "mil".
        num_classes: output classes (1 for binary segmentation).
        model: the site's architecture, fully resolved (``{"name": ..., **options}``, data-given
            options such as ``in_dim`` included): ``ServerContext.build_model(cid)`` builds it.
        sizes: counts the site agrees to share, e.g. ``{"train": 24, "test": 3,
            "train_pixels": 1_500_000}``.
        facts: other facts a method may need (``crop_size``, ``raw_bytes`` for the pooled
            baseline's egress, ...).
    """

    cid: int
    name: str
    num_train: int
    task: str = "segmentation"
    num_classes: int = 1
    model: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def to_scalars(self) -> dict[str, ScalarValue]:
        """As a flat JSON-able record (for the Flower handshake)."""
        return {"roster": json.dumps(dataclasses.asdict(self), sort_keys=True)}

    @classmethod
    def from_scalars(cls, scalars: dict[str, Any]) -> ClientInfo:
        return cls(**json.loads(str(scalars["roster"])))


ModelFactory = Callable[..., torch.nn.Module]


@dataclass
class ClientContext:
    """Everything a client part sees during one job. Built by the engine on the client side.

    ``model`` is this site's architecture (weights: whatever was last loaded, fresh each job);
    ``build_model(spec)`` builds another one on site (a teacher, an encoder): ``spec`` is a
    ``{"name": ..., **options}`` dict, or None for this site's own architecture; weights are
    initialised from a generator derived from (run seed, client, ``init_offset``).
    ``trainer`` runs every optimisation loop of the job (see algorithms/training.py); a wrapper
    such as FedDP's record level swaps it for DP-SGD without the method knowing.
    """

    cid: int
    name: str
    round: int
    seed: int  # derived from (run seed, round, cid); use the helpers below
    data: ClientData
    task: Task
    model: torch.nn.Module
    train: TrainConfig
    eval: EvalConfig
    state: Payload  # private to the site, persists across rounds, never sent
    logs: dict[str, float] = field(default_factory=dict)  # local training log (stays on site)
    build_model: ModelFactory | None = None
    trainer: Any = None  # a histofed.algorithms.training.Trainer; set by the engine
    info: ClientInfo | None = None  # this site's own roster entry

    def torch_generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def numpy_rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, offset])


@dataclass
class ServerContext:
    """What the server part sees: the roster, a model factory, the task, the trainer, seeded
    randomness and a place for per-round log rows. Never a client's data.

    ``build_model(cid)`` builds client ``cid``'s architecture from its roster entry (None: the
    shared architecture every client has, for weight-averaging methods); ``task`` is the
    federation's task (losses, evaluation) for methods that evaluate or optimise on the server,
    with ``trainer`` running their loops. ``log(stem, row)`` appends a row to ``<stem>.jsonl``
    after aggregation (truncated on resume like every per-round log). ``combine(arrays,
    weights)`` is the mean a ``mean_aggregation`` method takes of its clients' uploads: the
    weighted mean, or the robust rule of ``[server].aggregator`` (algorithms/aggregate.py).
    """

    round: int
    seed: int
    clients: list[ClientInfo]
    build_model: Callable[[int | None], torch.nn.Module]
    rounds: int = 0  # planned number of rounds of the run (0 = unknown)
    task: Task | None = None
    trainer: Any = None
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    combine: Callable[[list[dict[str, np.ndarray]], list[float]], dict[str, np.ndarray]] = \
        field(default=weighted_mean)

    def numpy_rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.round, offset])

    def torch_generator(self, offset: int = 0) -> torch.Generator:
        seq = np.random.SeedSequence([self.seed, self.round, offset, 0x5E])
        return torch.Generator().manual_seed(int(seq.generate_state(1)[0]))

    def log(self, stem: str, row: dict[str, Any]) -> None:
        """Append ``row`` to ``<stem>.jsonl`` of the run once this round is aggregated."""
        self.logs.setdefault(stem, []).append(row)

    def client(self, cid: int) -> ClientInfo:
        for c in self.clients:
            if c.cid == cid:
                return c
        raise KeyError(f"no client {cid} in this round's roster")


class ClientTrainingError(RuntimeError):
    """A client's round failed (e.g. NaN loss); its update is dropped, the run stays recoverable."""


class ArchitectureMismatch(ConfigError):
    """Clients of a weight-averaging method built different architectures."""


def require_same_architecture(sctx: ServerContext, method: str) -> None:
    """Weight averaging needs one architecture: raise naming the clients that differ.

    Raises:
        ArchitectureMismatch: two roster entries have different model specs.
    """
    from histofed.models import canonical_spec  # models import nothing of algorithms

    groups: dict[str, list[str]] = {}
    for c in sctx.clients:
        groups.setdefault(canonical_spec(c.model), []).append(c.name)
    if len(groups) > 1:
        described = "; ".join(f"{', '.join(names)}: {spec}" for spec, names in groups.items())
        raise ArchitectureMismatch(
            f"{method} averages weights, so every client needs the same [model]; these differ: "
            f"{described}. Remove the per-client [model] tables, or use a method that allows "
            "different architectures (local, or one that exchanges data instead of weights)")


# ---- private-state keys ----------------------------------------------------------------------
def prefixed(prefix: str, arrays: dict[str, Any]) -> dict[str, Any]:
    """``{prefix + "/" + k: v}``: a method's own namespace inside a shared state Payload.

    Example:
        >>> prefixed("teacher", {"w": 1})
        {'teacher/w': 1}
    """
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


def unprefixed(prefix: str, arrays: dict[str, Any]) -> dict[str, Any]:
    """The entries under ``prefix/``, with the prefix removed (inverse of :func:`prefixed`)."""
    head = f"{prefix}/"
    return {k[len(head):]: v for k, v in arrays.items() if k.startswith(head)}


def without_namespaces(arrays: dict[str, Any]) -> dict[str, Any]:
    """The entries outside any namespace (model weights: state-dict keys contain no "/")."""
    return {k: v for k, v in arrays.items() if "/" not in k}


class Algorithm:
    """Base class of every federated method. Subclasses override the fewest hooks.

    Class attributes:
        name: registry name (set by ``@register_algorithm("name")``).
        one_shot: the method communicates once (the engine runs a single round).
        pooled: centralised baseline: the engine trains one model on the pooled data.
        mean_aggregation: ``aggregate`` is theta + a (weighted) mean of client updates, so a
            DP wrapper may replace it by a noisy fixed-denominator sum (central noise), and a
            robust ``[server].aggregator`` may replace the mean (``aggregate`` takes it from
            ``sctx.combine``; the engine checks that it did).
        personal_models_may_travel: a site's personal model may be sent to a held-out site
            to be scored there (in-process evaluation). False for DP methods: personal parts
            (e.g. FedBN's norm layers) are not covered by the privacy accounting.

    Options are dataclass fields; ``from_options`` validates them from the annotations and
    ``histofed.options.option`` constraints (unknown key, type, range: a ConfigError).
    """

    name: ClassVar[str] = ""
    one_shot: ClassVar[bool] = False
    pooled: ClassVar[bool] = False
    mean_aggregation: ClassVar[bool] = False
    personal_models_may_travel: ClassVar[bool] = True

    # ---- server side -------------------------------------------------------------------
    def init_state(self, sctx: ServerContext, init_weights: dict[str, np.ndarray]) -> Payload:
        """Initial server state; by default the global model weights (``init_weights``: the
        shared architecture, seeded by (run seed, "global"); empty when clients differ)."""
        return Payload(dict(init_weights), {}, kind="state")

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        """Per-client payloads for this round's training; default: broadcast global weights."""
        weights = Payload(state.arrays, {}, kind="weights")
        return {c.cid: weights for c in sctx.clients}

    def aggregate(
        self, sctx: ServerContext, state: Payload, results: dict[int, Payload]
    ) -> Payload:
        """Combine client payloads into the new server state (log rows: ``sctx.log``)."""
        raise NotImplementedError

    # streams of round_logs that are ledgers: written even in a round whose every upload was
    # rejected (what reached the server was released whether or not it is used)
    ledger_streams: ClassVar[tuple[str, ...]] = ()

    def account_released(self, sctx: ServerContext, state: Payload,
                         arrived: dict[int, Payload]) -> Payload:
        """The server state after noting what reached the server this round, *before* the
        engine's upload checks: every payload in ``arrived`` was released by its site, even one
        the engine then rejects. Privacy ledgers count here, not in ``aggregate`` (which sees
        the kept uploads only). Default: the state unchanged."""
        return state

    def expected_upload(self, sctx: ServerContext, state: Payload,
                        cid: int) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
        """What client ``cid``'s fit upload must hold this round, ``{name: (shape, dtype)}``,
        given the server ``state`` before aggregation; the engine rejects an upload with other
        keys, shapes or dtypes before ``aggregate`` sees it. None (default): no structural
        check (NaN/inf and the norm check still apply)."""
        return None

    def configure_evaluate(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        """Per-client payloads for evaluation; default: the same as for training."""
        return self.configure_fit(sctx, state)

    def final_weights(self, state: Payload) -> dict[str, np.ndarray]:
        """The global model to save as final (empty for methods without one)."""
        return state.arrays

    def round_logs(self, sctx: ServerContext, state: Payload) -> dict[str, list[dict[str, Any]]]:
        """Extra per-round log rows derived from the new state, by file stem, e.g.
        ``{"privacy": [{"round": r, "epsilon": e}]}`` -> ``privacy.jsonl``. Rows computed during
        aggregation go through ``sctx.log`` instead."""
        return {}

    def personal_weights(self, client: ClientInfo, state: Payload,
                         client_state: Payload) -> dict[str, np.ndarray]:
        """``client``'s personalised model, where the method keeps one (empty otherwise).

        ``client_state`` is the site's private state where the engine holds it (in-process),
        else empty (Flower: it stays on the node).
        """
        return {}

    def local_keys(self, model: torch.nn.Module) -> set[str]:
        """State-dict keys of ``model`` that never leave a site (FedBN: its norm layers)."""
        return set()

    def extra_loss_terms(self) -> list[str]:
        """Names of loss terms the method adds to the task loss (e.g. FedProx's proximal term);
        a DP-SGD wrapper refuses them (they are not sums over records)."""
        return []

    def personal_spec(self, client: ClientInfo) -> dict[str, Any]:
        """The architecture of ``client``'s personal model (default: the site's own [model];
        a method whose personal model is a teacher of another architecture returns its spec)."""
        return client.model

    # ---- updates, as a DP wrapper sees them -------------------------------------------------
    def client_update(self, received: Payload, upload: Payload) -> dict[str, np.ndarray]:
        """The update a client-level DP wrapper clips and noises: by default, for payloads of
        kind "weights", the float arrays minus what the client received (same keys)."""
        missing = [k for k in upload.arrays if k not in received.arrays]
        if missing:
            raise ValueError(f"{self.name}: the client uploaded arrays it never received "
                             f"({missing[:3]}), so no update can be formed; override "
                             "Algorithm.client_update for this method")
        return {k: (v.astype(np.float64) - received.arrays[k]).astype(v.dtype)
                for k, v in upload.arrays.items() if np.issubdtype(v.dtype, np.floating)}

    def apply_update(self, received: Payload, update: dict[str, np.ndarray],
                     upload: Payload) -> Payload:
        """Inverse of :meth:`client_update` on the server: the payload the method's own
        ``aggregate`` expects, rebuilt from a (clipped, noised) update."""
        arrays = dict(upload.arrays)  # anything uploaded as it is (nothing, under DP)
        for k, d in update.items():
            base = received.arrays[k]
            arrays[k] = (base.astype(np.float64) + d).astype(base.dtype)
        return Payload(arrays, dict(upload.scalars), kind=upload.kind)

    # ---- client side -------------------------------------------------------------------
    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        raise NotImplementedError

    def evaluate(self, ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
        """Metrics per evaluated model ("global" and/or "personal") per split.

        Returns ``{"global/test": {...}, "global/val": {...}}`` style keys: "<model>/<split>".
        Default: load the received weights and evaluate them.
        """
        from histofed.algorithms.weights import load_weights

        load_weights(ctx.model, payload.arrays)
        return evaluate_model(ctx, ctx.model, "global")

    # ---- helpers -------------------------------------------------------------------------
    @classmethod
    def from_options(cls, **options: Any) -> Algorithm:
        """Build from config options, validated from the dataclass annotations.

        Raises:
            ConfigError: unknown key (with the closest valid one), wrong type or out of range.
        """
        from histofed.options import check_values, dataclass_params

        params = dataclass_params(cls) if dataclasses.is_dataclass(cls) else {}
        return cls(**check_values(f"[algorithm] {cls.name!r}", params, options))


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: ``@register_algorithm("fedavg")`` adds the method under that name."""

    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        ALGORITHMS.add(name, cls)
        return cls

    return decorator


def evaluate_model(ctx: ClientContext, model: torch.nn.Module, label: str) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on every configured split this client has; keys "<label>/<split>"."""
    out = {}
    for split in ctx.eval.splits:
        dataset = getattr(ctx.data, split, None)
        if dataset is not None and len(dataset) > 0:
            out[f"{label}/{split}"] = ctx.task.evaluate(model, dataset, ctx.eval)
    return out
