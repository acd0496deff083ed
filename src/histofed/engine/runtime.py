"""The client side of every engine: a site's roster entry, and jobs (round, client, payload)
turned into results by calling the algorithm's client part.

One ClientRuntime lives wherever client data lives: a worker process of the in-process engine
(or the main process when workers = 1), a Flower ClientApp on a SuperNode. It is the only
place that builds datasets. The server side learns each site from :meth:`ClientRuntime.roster`
(in-process) or from the Flower handshake, which sends the same entries.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from histofed.algorithms import build_algorithm
from histofed.algorithms.base import (
    ClientContext,
    ClientInfo,
    ClientTrainingError,
    Payload,
    evaluate_model,
)
from histofed.algorithms.training import Trainer
from histofed.config import Config
from histofed.data.federation import ClientData, Federation
from histofed.models import build_model, client_model_spec, init_seed
from histofed.tasks import make_task

POOLED = -1  # cid of the centralised baseline's pooled "client"
_KIND_CODE = {"fit": 1, "evaluate": 2, "score": 3}


@dataclass
class ClientJob:
    kind: Literal["fit", "evaluate", "score"]  # score: evaluate the sent weights as they are
    cid: int
    round: int
    payload: Payload
    state: Payload | None = None  # carried by the in-process engine; Flower keeps it on the node
    cost: float = 0.0  # expected work (e.g. training examples); bigger jobs start first
    evaluate_after: bool = False  # fit: also score the model just trained ("finetuned")


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


def data_model_defaults(task: str, client: ClientData) -> dict[str, Any]:
    """Architecture facts that come from a site's own data (e.g. the feature size of MIL bags)."""
    if task == "mil":
        features, _ = client.train[0]
        return {"in_dim": int(features.shape[-1])}
    return {}


def dataset_nbytes(dataset) -> int:
    """Bytes of raw data a dataset holds (what pooling it would move off-site)."""
    if hasattr(dataset, "datasets"):
        return sum(dataset_nbytes(d) for d in dataset.datasets)
    total = 0
    for attr in ("images", "masks", "features"):
        items = getattr(dataset, attr, None)
        if items is not None:
            total += sum(np.asarray(x).nbytes for x in items)
    if total == 0 and len(dataset):
        first = dataset[0]
        total = len(dataset) * sum(np.asarray(x).nbytes for x in first)
    return int(total)


def dataset_pixels(dataset) -> int:
    """Pixels of the images a dataset holds (FedAvg's ``weight = "pixels"``); 0 if unknown."""
    if hasattr(dataset, "datasets"):
        return sum(dataset_pixels(d) for d in dataset.datasets)
    images = getattr(dataset, "images", None)
    return int(sum(int(np.asarray(im).shape[0]) * int(np.asarray(im).shape[1])
                   for im in images)) if images is not None else 0


def training_clients(federation: Federation) -> list[ClientData]:
    """The clients that train (not held out with ``[federation].unseen``)."""
    return [c for c in federation.clients if not c.info.get("unseen")]


def pooled_client(federation: Federation) -> ClientData:
    """All training clients' data in one place (the centralised baseline)."""
    clients = training_clients(federation)
    return ClientData(
        name="pooled",
        train=ConcatDataset([c.train for c in clients]),
        test=ConcatDataset([c.test for c in clients]),
        info={"num_train": sum(c.num_train for c in clients)},
    )


def roster_entry(config: Config, federation: Federation, cid: int) -> ClientInfo:
    """What site ``cid`` tells the coordinator about itself (read off its own data)."""
    client = federation.clients[cid]
    spec = client_model_spec(config.model, client=client.name, cid=cid, seed=config.run.seed,
                             defaults=data_model_defaults(federation.task, client))
    sizes = {"train": client.num_train, "test": len(client.test),
             "val": len(client.val) if client.val is not None else 0,
             "train_pixels": dataset_pixels(client.train)}
    facts = {"crop_size": crop_size_of(config, federation),
             "raw_bytes": dataset_nbytes(client.train),
             "unseen": bool(client.info.get("unseen", False))}
    return ClientInfo(cid=cid, name=client.name, num_train=client.num_train,
                      task=federation.task, num_classes=federation.num_classes, model=spec,
                      sizes=sizes, facts=facts)


def score(ctx: ClientContext, payload: Payload) -> dict[str, dict[str, float]]:
    """Evaluate the weights in ``payload`` as they are, on every tile of this (held-out) site;
    key "<label>/unseen" with the label the server gave (e.g. "global", "personal:cpm15")."""
    from histofed.algorithms.weights import load_weights

    spec = payload.scalars.get("spec")
    model = ctx.build_model(json.loads(str(spec))) if spec and ctx.build_model else ctx.model
    load_weights(model, payload.arrays)
    label = str(payload.scalars.get("label", "global"))
    return {f"{label}/unseen": ctx.task.evaluate(model, ctx.data.test, ctx.eval)}


class ClientRuntime:
    """Runs client jobs for one experiment: builds the model, context and calls the algorithm.

    Args:
        config: the run's config (the same on every site).
        federation: the data this runtime serves (in-process: every client's; on a Flower
            node: the federation as the node's data root yields it).
    """

    def __init__(self, config: Config, federation: Federation) -> None:
        self.config = config
        self.federation = federation
        self.algorithm = build_algorithm(config.algorithm)
        self.task = make_task(federation.task, config.train, federation.num_classes,
                              crop_size_of(config, federation))
        self._roster: dict[int, ClientInfo] = {}

    def roster(self, cids: list[int] | None = None) -> list[ClientInfo]:
        """The roster entries of ``cids`` (default: every client this runtime serves)."""
        cids = list(range(len(self.federation.clients))) if cids is None else cids
        for cid in cids:
            if cid not in self._roster:
                self._roster[cid] = roster_entry(self.config, self.federation, cid)
        return [self._roster[c] for c in cids]

    def model_spec(self, cid: int) -> dict[str, Any]:
        """Client ``cid``'s resolved model spec (the pooled baseline: client 0's; it requires
        one architecture for all, like every weight-averaging method)."""
        return self.roster([max(cid, 0)])[0].model

    def build_model(self, cid: int, spec: dict[str, Any] | None = None,
                    offset: int = 0) -> torch.nn.Module:
        """Client ``cid``'s architecture (or ``spec``), initialised from (seed, client, offset)."""
        return build_model(spec or self.model_spec(cid), num_classes=self.federation.num_classes,
                           seed=init_seed(self.config.run.seed, cid) + offset)

    def client_data(self, cid: int) -> ClientData:
        return pooled_client(self.federation) if cid == POOLED else self.federation.clients[cid]

    def run(self, job: ClientJob) -> JobResult:
        start = time.perf_counter()
        seed = job_seed(self.config.run.seed, job.round, job.cid, job.kind)
        data = self.client_data(job.cid)
        train_cfg = self.config.train
        if job.cid == POOLED:  # same compute per round as all clients together
            train_cfg = dataclasses.replace(
                train_cfg, local_steps=train_cfg.local_steps * len(training_clients(self.federation)))
        ctx = ClientContext(
            cid=job.cid, name=data.name, round=job.round, seed=seed, data=data, task=self.task,
            model=self.build_model(job.cid), train=train_cfg, eval=self.config.eval,
            state=job.state if job.state is not None else Payload(kind="state"),
            build_model=lambda spec=None, offset=1, cid=job.cid: self.build_model(cid, spec, offset),
            trainer=Trainer(), info=None if job.cid == POOLED else self.roster([job.cid])[0])
        result = JobResult(kind=job.kind, cid=job.cid)
        # anything a method draws from torch's global RNG is seeded per job, and the caller's
        # RNG state is restored afterwards (workers = 1 runs jobs in the main process)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                if job.kind == "fit":
                    result.payload = self.algorithm.fit(ctx, job.payload)
                    if job.evaluate_after and job.payload.kind != "control":  # not a no-op job
                        result.metrics = evaluate_model(ctx, ctx.model, "finetuned")
                elif job.kind == "score":
                    result.metrics = score(ctx, job.payload)
                else:
                    result.metrics = self.algorithm.evaluate(ctx, job.payload)
            except ClientTrainingError as err:
                result.error = str(err)
        result.logs, result.state = ctx.logs, ctx.state
        result.seconds = time.perf_counter() - start
        return result
