"""The server side of every engine: the round loop, logging, checkpoints and resume.

Per round t:  payloads = configure_fit -> transport runs client fit jobs -> aggregate
              -> (every eval_every rounds) configure_evaluate -> client evaluate jobs
                 -> score jobs on held-out sites ([federation].unseen)
                 -> keep the best round on validation ([eval].select = "best-val")
              -> metrics.jsonl, egress.jsonl, <method logs>.jsonl, checkpoint round-t.
Every fit upload is checked before ``aggregate`` (engine/validate.py: NaN/inf, expected keys,
shapes and dtypes, norm against the round's median); rejected ones go to rejected.jsonl, and a
round whose every upload was rejected keeps the previous state.
The transport decides where clients run (worker processes here, or Flower nodes) and is how
the server learns the sites (``transport.roster``); the server never builds a dataset.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from histofed.algorithms import build_algorithm
from histofed.algorithms.aggregate import non_finite_keys
from histofed.algorithms.base import ClientInfo, Payload, ServerContext, require_same_architecture
from histofed.algorithms.training import Trainer
from histofed.algorithms.weights import get_weights
from histofed.config import Config, dump_toml
from histofed.engine import rundir
from histofed.engine.runtime import POOLED, ClientJob, JobResult
from histofed.engine.selection import BestSnapshot
from histofed.engine.validate import Combiner, check_server_config, check_uploads
from histofed.models import build_model, canonical_spec, check_client_tables, init_seed
from histofed.tasks import make_task


class Transport(Protocol):
    """Where client jobs run (worker processes here, Flower nodes there); also the only way the
    server learns the sites: ``roster``, one entry per client, told by the sites themselves."""

    keeps_state: bool
    roster: list[ClientInfo]

    def run(self, jobs: list[ClientJob], desc: str = ...) -> list[JobResult]: ...

    def close(self) -> None: ...


class RunError(RuntimeError):
    """The run cannot continue; the message says what is intact and how to resume."""


class ServerModels:
    """The server's model factory, from the roster only: client ``cid``'s architecture, or the
    one all clients share (None). Initial weights come from (run seed, client or "global")."""

    def __init__(self, config: Config, roster: list[ClientInfo],
                 extra: list[ClientInfo] = ()) -> None:
        self.seed = config.run.seed
        self.training = {c.cid: c for c in roster}
        self.roster = {c.cid: c for c in [*roster, *extra]}
        self.num_classes = roster[0].num_classes
        self.shared = len({canonical_spec(c.model) for c in roster}) == 1

    def __call__(self, cid: int | None = None) -> torch.nn.Module:
        if cid is None or cid == POOLED:
            if not self.shared:
                sctx = ServerContext(0, self.seed, list(self.training.values()), self)
                require_same_architecture(sctx, "this method")  # raises, naming the clients
            spec, seed = next(iter(self.training.values())).model, init_seed(self.seed, "global")
        else:
            spec, seed = self.roster[cid].model, init_seed(self.seed, cid)
        return build_model(spec, num_classes=self.num_classes, seed=seed)


class Experiment:
    """One federated run into one run directory (new, or resumed from its last checkpoint).

    The server side of every engine. It knows the sites only by their roster entries (what
    each site told it) and by what the method uploads; it never builds a dataset.
    """

    def __init__(self, config: Config, roster: list[ClientInfo], run_dir: Path) -> None:
        if not roster:
            raise RunError("no clients: the federation yielded an empty roster")
        self.config = config
        self.run_dir = Path(run_dir)
        self.clients = [c for c in roster if not c.facts.get("unseen")]  # they train
        self.unseen = [c for c in roster if c.facts.get("unseen")]  # held out: scored only
        if not self.clients:
            raise RunError("every client is held out ([federation].unseen): none would train")
        self.algorithm = build_algorithm(config.algorithm)
        check_client_tables(config.model, [c.name for c in roster])
        self.models = ServerModels(config, self.clients, extra=self.unseen)
        first = self.clients[0]
        self.task = make_task(first.task, config.train, first.num_classes,
                              int(first.facts.get("crop_size", 128)))
        for cid in ([None] if self.models.shared else [c.cid for c in self.clients]):
            self.models(cid)  # a bad [model] fails here, before the run directory is written
        self.rounds = 1 if self.algorithm.one_shot else config.run.rounds
        check_server_config(config.server, self.algorithm, len(self.clients))
        self.combine = Combiner(config.server)
        self.all_rejected = 0  # rounds in a row whose every upload was rejected
        self.names = {c.cid: c.name for c in roster} | {POOLED: "pooled"}
        self.best = BestSnapshot(self.run_dir, higher_is_better=self.task.headline != "loss")
        self.tensorboard = None
        if config.run.tensorboard:
            from histofed.engine.tensorboard import TensorBoardLogger

            self.tensorboard = TensorBoardLogger(self.run_dir)

    def _log_metrics(self, rows: list[dict]) -> None:
        rundir.append_jsonl(self.run_dir / "metrics.jsonl", rows)
        if self.tensorboard is not None:
            self.tensorboard.log(rows)

    # ---- setup -----------------------------------------------------------------------------
    def server_context(self, rnd: int, clients: list[ClientInfo] | None = None) -> ServerContext:
        return ServerContext(round=rnd, seed=self.config.run.seed, clients=clients or self.clients,
                             build_model=self.models, rounds=self.rounds, task=self.task,
                             trainer=Trainer(), combine=self.combine)

    def initial_state(self) -> Payload:
        """The method's initial state; initial weights of the shared architecture (none when
        clients differ: each then starts from its own seeded initialisation)."""
        init = get_weights(self.models(None)) if self.models.shared else {}
        sctx = self.server_context(0)
        state = self.algorithm.init_state(sctx, init)
        self._write_logs(sctx)
        return state

    def write_header(self, engine: str) -> None:
        rundir.atomic_write_text(self.run_dir / "config.toml", dump_toml(self.config.to_dict()))
        self._write_run_json(engine=engine, started=time.time())

    def _write_run_json(self, **updates) -> None:
        path = self.run_dir / "run.json"
        info = json.loads(path.read_text()) if path.exists() else {
            "name": self.config.run.name, "algorithm": self.config.algorithm.name,
            "federation": self.config.federation.name, "model": self.config.model.name,
            "seed": self.config.run.seed, "rounds": self.rounds,
            "clients": [c.name for c in self.clients], "task": self.clients[0].task,
            "unseen": [c.name for c in self.unseen], "select": self.config.eval.select,
            "roster": [dataclasses.asdict(c) for c in [*self.clients, *self.unseen]]}
        info.update(updates)
        rundir.atomic_write_text(path, json.dumps(info, indent=2))

    # ---- the loop --------------------------------------------------------------------------
    def run(self, transport: Transport, *, resume: bool = False, engine: str = "inprocess",
            stop_after: int | None = None, header_written: bool = False) -> Payload:
        """Run (or resume) all rounds; returns the final server state.

        ``stop_after`` ends the run early after that round (used to test crash + resume).
        """
        start_round, state, states = 1, None, {c.name: Payload(kind="state") for c in self.clients}
        self._check_selection()
        if resume:
            ckpts = rundir.list_checkpoints(self.run_dir)
            if ckpts:
                done, state, saved = rundir.load_checkpoint(ckpts[-1])
                states.update(saved)
                start_round = done + 1
                for path in self.run_dir.glob("*.jsonl"):  # metrics, egress, timing, privacy...
                    rundir.truncate_jsonl(path, done)
                self.best.forget_after(done)
            else:  # starting over: a best round from an earlier attempt does not count
                self.best.forget_after(0)
        elif not header_written:
            self.write_header(engine)
        if state is None:
            state = self.initial_state()
        t0 = time.time()
        bar = tqdm(range(start_round, self.rounds + 1), desc=self.config.run.name, unit="round",
                   initial=start_round - 1, total=self.rounds, dynamic_ncols=True)
        for rnd in bar:
            t_fit = time.perf_counter()
            last = rnd == self.rounds
            evaluating = last or rnd % self.config.run.eval_every == 0
            state = self._fit_round(transport, rnd, state, states,
                                    after_fit=evaluating and self.config.eval.after_fit)
            t_eval = time.perf_counter()
            if evaluating:
                summary, val = self._evaluate_round(transport, rnd, state, states)
                summary += self._score_unseen(transport, rnd, state, states)
                bar.set_postfix_str(summary)
                if self.config.eval.select == "best-val":
                    self.best.offer(rnd, val, state, states if transport.keeps_state else {})
            t_ckpt = time.perf_counter()
            rundir.save_checkpoint(self.run_dir, rnd, state, states if transport.keeps_state else {},
                                   self.config.run.keep_checkpoints)
            rundir.append_jsonl(self.run_dir / "timing.jsonl", [{
                "round": rnd, "fit_seconds": t_eval - t_fit, "eval_seconds": t_ckpt - t_eval,
                "checkpoint_seconds": time.perf_counter() - t_ckpt, "time": time.time()}])
            if stop_after is not None and rnd >= stop_after and not last:
                bar.close()
                return state
        bar.close()
        selected = self.rounds
        if self.config.eval.select == "best-val" and self.best.round is not None:
            selected, final_state, final_states = self.best.load()
        else:
            final_state, final_states = state, states if transport.keeps_state else {}
        self._save_final(final_state, final_states)
        self._write_run_json(finished=time.time(), wall_seconds_last_session=time.time() - t0,
                             engine=engine, selected_round=selected,
                             selected_by=self.config.eval.select)
        return state

    def _check_selection(self) -> None:
        if self.config.eval.select != "best-val":
            return
        missing = [c.name for c in self.clients if not c.sizes.get("val")]
        if missing:
            raise RunError(f'[eval].select = "best-val" needs a validation split, but '
                           f"{', '.join(missing)} have none; set [federation].val_fraction "
                           "(e.g. 0.2) or use select = \"last\"")

    def _jobs(self, kind: str, rnd: int, payloads: dict[int, Payload],
              states: dict[str, Payload], keeps_state: bool) -> list[ClientJob]:
        # a copy, so a job cannot change the stored state in place (same with 1 or N workers)
        return [ClientJob(kind, cid, rnd, p,
                          states[self.names[cid]].copy() if keeps_state and cid != POOLED else None,
                          cost=float(self._num_train(cid)))
                for cid, p in sorted(payloads.items())]

    def _fit_round(self, transport: Transport, rnd: int, state: Payload,
                   states: dict[str, Payload], after_fit: bool = False) -> Payload:
        participants = self.clients
        if self.algorithm.pooled:
            participants = [ClientInfo(POOLED, "pooled", sum(c.num_train for c in self.clients))]
        sctx = self.server_context(rnd, participants)
        payloads = self.algorithm.configure_fit(sctx, state)
        if not payloads:  # e.g. Poisson client sampling picked nobody: aggregate nothing
            return self._aggregate(sctx, state, {})
        jobs = self._jobs("fit", rnd, payloads, states, transport.keeps_state)
        for job in jobs:  # [eval].after_fit: each site also scores the model it just trained
            job.evaluate_after = after_fit
        results = transport.run(jobs, desc=f"round {rnd} fit")
        egress, lines, ok, digests = [], [], {}, {}
        if self.algorithm.pooled and rnd == 1:  # what pooling moved: each site's raw training data
            egress += [self._egress(rnd, c.name, "up", "raw-data", int(c.facts.get("raw_bytes", 0)),
                                    "fit") for c in self.clients]
        for res in results:
            name = self.names[res.cid]
            egress += self._payload_egress(rnd, name, "down", payloads[res.cid], "fit", digests)
            if transport.keeps_state and res.state is not None:
                states[name] = res.state
            if res.error is not None:
                lines.append({"round": rnd, "client": name, "event": "client_failed",
                              "message": res.error})
                tqdm.write(f"warning: {res.error}")
                continue
            ok[res.cid] = res.payload
            egress += self._payload_egress(rnd, name, "up", res.payload, "fit")
            lines.append({"round": rnd, "client": name, "split": "train", **res.logs})
            lines += metric_rows(rnd, name, res.metrics)  # "finetuned/<split>" (after_fit)
        rundir.append_jsonl(self.run_dir / "egress.jsonl", egress)
        self._log_metrics(lines)
        if not ok:
            raise RunError(
                f"round {rnd}: every client failed (see metrics.jsonl events). The checkpoint of "
                f"round {rnd - 1} is intact: fix the cause (e.g. lower [train].lr) and run "
                f"`histofed run --resume {self.run_dir} --set train.lr=<lower value>`")
        state = self.algorithm.account_released(sctx, state, ok)  # rejected uploads were released too
        kept = self._reject(sctx, state, payloads, ok)
        if not kept:
            return self._keep_state(sctx, state, len(ok))
        self.all_rejected = 0
        return self._aggregate(sctx, state, kept)

    def _reject(self, sctx: ServerContext, state: Payload, sent: dict[int, Payload],
                uploads: dict[int, Payload]) -> dict[int, Payload]:
        """The uploads that pass the server's checks; each rejection -> rejected.jsonl and a
        warning line."""
        kept, rejected = check_uploads(self.algorithm, sctx, state, sent, uploads,
                                       self.config.server.norm_limit)
        rows = []
        for r in rejected:
            name = self.names[r.cid]
            rows.append({"round": sctx.round, "client": name, "reason": r.reason,
                         "norm": r.norm, "median": r.median})
            tqdm.write(f"warning: round {sctx.round}: rejected the update of client {name!r}: "
                       f"{r.reason}")
        rundir.append_jsonl(self.run_dir / "rejected.jsonl", rows)
        return kept

    def _keep_state(self, sctx: ServerContext, state: Payload, uploads: int) -> Payload:
        """Every upload of this round was rejected: keep the previous model, or stop after
        ``[server].max_rejected_rounds`` such rounds in a row. The method's ledgers (privacy)
        are still written: the rejected uploads were released."""
        rnd = sctx.round
        if self.algorithm.ledger_streams:
            self._log_round(sctx, state, only=self.algorithm.ledger_streams)
        self.all_rejected += 1
        limit = self.config.server.max_rejected_rounds
        if self.all_rejected >= limit:
            raise RunError(
                f"round {rnd}: every update was rejected for {self.all_rejected} rounds in a row "
                f"([server].max_rejected_rounds = {limit}); see {self.run_dir / 'rejected.jsonl'}"
                f". The checkpoint of round {rnd - 1} is intact: fix the sites (or the method's "
                "options) and resume with `histofed run --resume`")
        tqdm.write(f"warning: round {rnd}: all {uploads} updates were rejected (see "
                   "rejected.jsonl); the model stays as it was after the previous round")
        return state

    def _aggregate(self, sctx: ServerContext, state: Payload, ok: dict[int, Payload]) -> Payload:
        calls = self.combine.calls
        new = self.algorithm.aggregate(sctx, state, ok)
        if ok and self.config.server.aggregator != "mean" and self.combine.calls == calls:
            raise RunError(f"[server].aggregator = {self.config.server.aggregator!r}: "
                           f"{self.algorithm.name!r} declares mean_aggregation but its aggregate "
                           "never called sctx.combine, so the robust rule was not applied")
        bad = non_finite_keys(self.algorithm.final_weights(new))
        if bad:
            raise RunError(f"round {sctx.round}: aggregation produced NaN/inf in {bad[:3]} "
                           f"although every upload was finite; the checkpoint of round "
                           f"{sctx.round - 1} is intact (a bug in {self.algorithm.name!r}'s "
                           "aggregate: please report it)")
        self._log_round(sctx, new)
        return new

    def _log_round(self, sctx: ServerContext, state: Payload,
                   only: tuple[str, ...] | None = None) -> None:
        """The method's ``round_logs`` of ``state`` (the streams in ``only``, if given) and the
        rows gathered in ``sctx.logs``, written to their jsonl files."""
        for stem, rows in self.algorithm.round_logs(sctx, state).items():
            if only is None or stem in only:
                sctx.logs.setdefault(stem, []).extend(rows)
        self._write_logs(sctx)

    def _write_logs(self, sctx: ServerContext) -> None:
        for stem, rows in sctx.logs.items():
            rundir.append_jsonl(self.run_dir / f"{stem}.jsonl", rows)
        sctx.logs.clear()

    def _num_train(self, cid: int) -> int:
        if cid == POOLED:
            return sum(c.num_train for c in self.clients)
        return self.models.roster[cid].num_train

    def _evaluate_round(self, transport: Transport, rnd: int, state: Payload,
                        states: dict[str, Payload]) -> tuple[str, float]:
        """Evaluate jobs on the training sites; (progress summary, mean validation score)."""
        sctx = self.server_context(rnd)
        payloads = self.algorithm.configure_evaluate(sctx, state)
        results = transport.run(self._jobs("evaluate", rnd, payloads, states, transport.keeps_state),
                                desc=f"round {rnd} eval")
        lines, egress, scores, digests = [], [], [], {}
        val: dict[str, list[float]] = {}
        for res in results:
            name = self.names[res.cid]
            egress += self._payload_egress(rnd, name, "down", payloads[res.cid], "evaluate",
                                           digests)
            for row in metric_rows(rnd, name, res.metrics):
                lines.append(row)
                split, model, score = row["split"], row["model"], row.get(self.task.headline, np.nan)
                if split == "test":
                    scores.append(score)
                if split == "val":
                    val.setdefault(model, []).append(score)
        self._log_metrics(lines)
        rundir.append_jsonl(self.run_dir / "egress.jsonl", egress)
        # selection score: the global model's mean validation score (else the personal models')
        chosen = val.get("global") or val.get("personal") or []
        val_score = float(np.nanmean(chosen)) if chosen else float("nan")
        summary = f"test {self.task.headline} {np.nanmean(scores):.3f}" if scores else ""
        return summary, val_score

    def _score_unseen(self, transport: Transport, rnd: int, state: Payload,
                      states: dict[str, Payload]) -> str:
        """Score every model the run has on each held-out site: the global model, and each
        training site's personal model where the engine holds it (in-process); rows with split
        "unseen" and model "global" / "personal:<site>" (not for methods whose personal
        models may not leave their site, e.g. under DP). Returns a progress-bar summary."""
        if not self.unseen:
            return ""
        candidates: dict[str, tuple[dict, dict]] = {}  # label -> (weights, spec)
        glob = self.algorithm.final_weights(state)
        if glob and self.models.shared:
            candidates["global"] = (glob, self.clients[0].model)
        for c in self.clients if self.algorithm.personal_models_may_travel else []:
            own = states.get(c.name, Payload(kind="state")) if transport.keeps_state else \
                Payload(kind="state")
            personal = self.algorithm.personal_weights(c, state, own)
            if personal:
                candidates[f"personal:{c.name}"] = (personal, self.algorithm.personal_spec(c))
        # the held-out site builds each model's own architecture (a teacher may differ)
        jobs = [ClientJob("score", u.cid, rnd, Payload(weights, {
                    "label": label, "spec": json.dumps(spec, sort_keys=True)}, kind="weights"),
                    None, cost=float(u.sizes["test"]))
                for u in self.unseen for label, (weights, spec) in candidates.items()]
        # Flower sends one message per node at a time; in-process, all at once
        waves = [jobs] if transport.keeps_state else \
            [[j for j in jobs if j.payload.scalars["label"] == label] for label in candidates]
        results = [r for wave in waves if wave for r in transport.run(wave, desc=f"round {rnd} unseen")]
        jobs = [j for wave in waves for j in wave]
        lines, egress, glob_scores = [], [], []
        for job, res in zip(jobs, results, strict=True):
            name = self.names[res.cid]
            egress += self._payload_egress(rnd, name, "down", job.payload, "unseen")
            for row in metric_rows(rnd, name, res.metrics):
                lines.append(row)
                if row["model"] == "global":
                    glob_scores.append(row.get(self.task.headline, np.nan))
        self._log_metrics(lines)
        rundir.append_jsonl(self.run_dir / "egress.jsonl", egress)
        return f", unseen {np.nanmean(glob_scores):.3f}" if glob_scores else ""

    def _payload_egress(self, rnd: int, name: str, direction: str, payload: Payload | None,
                        phase: str, digests: dict[int, dict[str, str]] | None = None
                        ) -> list[dict]:
        """egress.jsonl rows of one payload: bytes and SHA-256 per kind. ``digests`` caches
        the checksums of a payload sent to many clients (by object id, within one phase)."""
        if payload is None:
            return []
        if digests is None:
            sums = payload.sha256()
        elif id(payload) in digests:
            sums = digests[id(payload)]
        else:
            sums = digests[id(payload)] = payload.sha256()
        return [self._egress(rnd, name, direction, kind, n, phase, sums[kind])
                for kind, n in payload.nbytes().items()]

    @staticmethod
    def _egress(rnd: int, client: str, direction: str, kind: str, nbytes: int, phase: str,
                sha256: str | None = None) -> dict:
        row = {"round": rnd, "client": client, "direction": direction, "kind": kind,
               "bytes": int(nbytes), "phase": phase}
        return row if sha256 is None else {**row, "sha256": sha256}

    def _save_final(self, state: Payload, states: dict[str, Payload]) -> None:
        final = self.run_dir / "final"
        weights = self.algorithm.final_weights(state)
        if weights:
            rundir.save_payload(final / "global", Payload(weights, {}, "weights"))
        for client in self.clients:  # the same files whether the engine holds client states
            client_state = states.get(client.name, Payload(kind="state"))
            personal = self.algorithm.personal_weights(client, state, client_state)
            if personal:
                rundir.save_payload(final / "personal" / rundir.safe_stem(client.name),
                                    Payload(personal, {}, "weights"))


def metric_rows(rnd: int, client: str, metrics: dict[str, dict[str, float]]) -> list[dict]:
    """metrics.jsonl rows from a job's ``{"<model>/<split>": {...}}``."""
    rows = []
    for key, values in metrics.items():
        model, split = key.split("/")
        rows.append({"round": rnd, "client": client, "split": split, "model": model, **values})
    return rows


def config_with(config: Config, **run_updates) -> Config:
    return config.replace(run=dataclasses.replace(config.run, **run_updates))
