"""The algorithm contract, independent of any FL engine (Flower knows nothing of it, and it
knows nothing of Flower).

A method is one object with a client part and a server part::

    server: init_state -> configure_fit -> [clients: fit] -> aggregate -> configure_evaluate
    client: fit(ctx, payload) -> Payload            evaluate(ctx, payload) -> {model: metrics}

Everything that crosses the network is a :class:`Payload`: named numpy arrays plus JSON-able
scalars (the same shape as Flower's ArrayRecord + ConfigRecord; never a pickle). A payload's
``kind`` ("weights", "stats", "svd-factors", "synthetic-images", ...) is logged with its size in
``egress.jsonl``. What must never leave a site lives in ``ctx.state`` (also a Payload): a
teacher model, personalised weights, optimiser state, a per-client privacy accountant. Engines
persist it between rounds and in checkpoints but never send it.

The server state (global weights, memory banks, accountant history, ...) is a Payload too, so
it checkpoints the same way. Randomness is always derived from (run seed, round, client).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

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

    def is_empty(self) -> bool:
        return not self.arrays and not self.scalars

    def copy(self) -> Payload:
        return Payload({k: v.copy() for k, v in self.arrays.items()}, copy.deepcopy(self.scalars),
                       self.kind)


@dataclass
class ClientInfo:
    """What the server may know about a client: its index, name and training-set size."""

    cid: int
    name: str
    num_train: int


@dataclass
class ClientContext:
    """Everything a client part sees during one job. Built by the engine on the client side."""

    cid: int
    name: str
    round: int
    seed: int  # derived from (run seed, round, cid); use the helpers below
    data: ClientData
    task: Task
    model: torch.nn.Module  # this client's architecture; weights are whatever was last loaded
    train: TrainConfig
    eval: EvalConfig
    state: Payload  # private to the site, persists across rounds, never sent
    logs: dict[str, float] = field(default_factory=dict)  # local training log (stays on site)

    def torch_generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def numpy_rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, offset])


@dataclass
class ServerContext:
    """What the server part sees: the clients, a model factory and seeded randomness."""

    round: int
    seed: int
    clients: list[ClientInfo]
    build_model: Callable[[int | None], torch.nn.Module]  # cid -> that client's architecture
    rounds: int = 0  # planned number of rounds of the run (0 = unknown)

    def numpy_rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.round, offset])


class ClientTrainingError(RuntimeError):
    """A client's round failed (e.g. NaN loss); its update is dropped, the run stays recoverable."""


class Algorithm:
    """Base class of every federated method. Subclasses override the fewest hooks.

    Class attributes:
        name: registry name.
        one_shot: the method communicates once (the engine runs a single round).
        pooled: centralised baseline: the engine trains one model on the pooled data.
    """

    name: ClassVar[str] = ""
    one_shot: ClassVar[bool] = False
    pooled: ClassVar[bool] = False

    # ---- server side -------------------------------------------------------------------
    def init_state(self, sctx: ServerContext, init_weights: dict[str, np.ndarray]) -> Payload:
        """Initial server state; by default the global model weights."""
        return Payload(dict(init_weights), {}, kind="state")

    def configure_fit(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        """Per-client payloads for this round's training; default: broadcast global weights."""
        weights = Payload(state.arrays, {}, kind="weights")
        return {c.cid: weights for c in sctx.clients}

    def aggregate(
        self, sctx: ServerContext, state: Payload, results: dict[int, Payload]
    ) -> Payload:
        """Combine client payloads into the new server state."""
        raise NotImplementedError

    def configure_evaluate(self, sctx: ServerContext, state: Payload) -> dict[int, Payload]:
        """Per-client payloads for evaluation; default: the same as for training."""
        return self.configure_fit(sctx, state)

    def final_weights(self, state: Payload) -> dict[str, np.ndarray]:
        """The global model to save as final (empty for methods without one)."""
        return state.arrays

    def round_logs(self, sctx: ServerContext, state: Payload) -> dict[str, list[dict[str, Any]]]:
        """Extra per-round log rows by file stem, e.g. ``{"privacy": [{"round": r, "epsilon": e}]}``
        is appended to ``privacy.jsonl`` after aggregation (and truncated on resume)."""
        return {}

    def personal_weights(self, state: Payload, client_state: Payload) -> dict[str, np.ndarray]:
        """A client's personalised model, where the method keeps one (empty otherwise)."""
        return {}

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
        """Build from config options, rejecting unknown keys with a suggestion."""
        import dataclasses

        from histofed.config import check_options

        valid = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        check_options(f"algorithm {cls.name!r}", options, valid)
        return cls(**options)


def evaluate_model(ctx: ClientContext, model: torch.nn.Module, label: str) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on every configured split this client has; keys "<label>/<split>"."""
    out = {}
    for split in ctx.eval.splits:
        dataset = getattr(ctx.data, split, None)
        if dataset is not None and len(dataset) > 0:
            out[f"{label}/{split}"] = ctx.task.evaluate(model, dataset, ctx.eval)
    return out
