"""The client side of every engine: turns a job (round, client, payload) into a result by
calling the algorithm's client part. One ClientRuntime lives in each process that trains
clients (a worker process, a Flower ClientApp, or the main process when workers = 1)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from histofed.algorithms import build_algorithm
from histofed.algorithms.base import ClientContext, ClientTrainingError, Payload
from histofed.config import Config
from histofed.data.federation import ClientData, Federation
from histofed.models import build_model
from histofed.tasks import make_task

POOLED = -1  # cid of the centralised baseline's pooled "client"
_KIND_CODE = {"fit": 1, "evaluate": 2}


@dataclass
class ClientJob:
    kind: Literal["fit", "evaluate"]
    cid: int
    round: int
    payload: Payload
    state: Payload | None = None  # carried by the in-process engine; Flower keeps it on the node
    cost: float = 0.0  # expected work (e.g. training examples); bigger jobs start first


@dataclass
class JobResult:
    kind: str
    cid: int
    payload: Payload | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "<model>/<split>" -> metrics
    logs: dict[str, float] = field(default_factory=dict)
    state: Payload | None = None
    error: str | None = None
    seconds: float = 0.0


def job_seed(run_seed: int, rnd: int, cid: int, kind: str) -> int:
    """A 31-bit seed from (run seed, round, client, job kind): same inputs, same numbers."""
    seq = np.random.SeedSequence([run_seed, rnd, cid + 1, _KIND_CODE[kind]])
    return int(seq.generate_state(1)[0] & 0x7FFFFFFF)


def crop_size_of(config: Config, federation: Federation) -> int:
    return int(federation.info.get("crop_size", config.federation.options.get("crop_size", 128)))


def model_defaults(federation: Federation) -> dict:
    """Architecture facts that come from the data (e.g. feature dimension of MIL bags)."""
    if federation.task == "mil":
        features, _ = federation.clients[0].train[0]
        return {"in_dim": int(features.shape[-1])}
    return {}


def pooled_client(federation: Federation) -> ClientData:
    """All clients' training data in one place (the centralised baseline)."""
    return ClientData(
        name="pooled",
        train=ConcatDataset([c.train for c in federation.clients]),
        test=ConcatDataset([c.test for c in federation.clients]),
        info={"num_train": sum(c.num_train for c in federation.clients)},
    )


class ClientRuntime:
    """Runs client jobs for one experiment: builds the model, context and calls the algorithm."""

    def __init__(self, config: Config, federation: Federation) -> None:
        self.config = config
        self.federation = federation
        self.algorithm = build_algorithm(config.algorithm)
        self.task = make_task(federation.task, config.train, federation.num_classes,
                              crop_size_of(config, federation))
        self._defaults = model_defaults(federation)

    def build_model(self, cid: int | None = None) -> torch.nn.Module:
        """This client's architecture (all clients share one until per-client models exist)."""
        return build_model(self.config.model, num_classes=self.federation.num_classes,
                           **self._defaults)

    def client_data(self, cid: int) -> ClientData:
        return pooled_client(self.federation) if cid == POOLED else self.federation.clients[cid]

    def run(self, job: ClientJob) -> JobResult:
        start = time.perf_counter()
        seed = job_seed(self.config.run.seed, job.round, job.cid, job.kind)
        torch.manual_seed(seed)  # anything a method draws from the global RNG is seeded too
        data = self.client_data(job.cid)
        train_cfg = self.config.train
        if job.cid == POOLED:  # same compute per round as all clients together
            train_cfg = dataclasses.replace(
                train_cfg, local_steps=train_cfg.local_steps * len(self.federation.clients))
        ctx = ClientContext(
            cid=job.cid, name=data.name, round=job.round, seed=seed, data=data, task=self.task,
            model=self.build_model(job.cid), train=train_cfg, eval=self.config.eval,
            state=job.state if job.state is not None else Payload(kind="state"))
        result = JobResult(kind=job.kind, cid=job.cid)
        try:
            if job.kind == "fit":
                result.payload = self.algorithm.fit(ctx, job.payload)
            else:
                result.metrics = self.algorithm.evaluate(ctx, job.payload)
        except ClientTrainingError as err:
            result.error = str(err)
        result.logs, result.state = ctx.logs, ctx.state
        result.seconds = time.perf_counter() - start
        return result
