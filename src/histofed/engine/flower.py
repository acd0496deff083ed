"""The Flower engine: histofed's round loop and algorithms on Flower's Message API.

The same objects run in Flower's simulation (Ray) and in a deployment (SuperLink + one
SuperNode per hospital; see histofed/flower_app)::

    ServerApp  server_app  Experiment.run(FlowerTransport(grid, ...))     -- histofed's loop
    ClientApp  client_app  query: handshake; train/evaluate: ClientRuntime.run(job)

Wire protocol (records: see flower_records.py):

1. handshake, once: a "query" message to every node carries the run's config (TOML text) and
   data root; each node answers with its ``partition-id`` (node config), the number and names
   of the clients its config defines, and its roster entry (``ClientInfo``: sizes, task, model
   spec), which is all the server ever learns of a site. Client ``cid`` always runs on the node
   whose partition-id is ``cid``, because its private state lives there.
2. per job: a "train" (fit) or "evaluate" message carries the job (kind, cid, round, config
   fingerprint) and the payload; the reply carries the result payload or metrics, the local
   training log and an error string, if any.

A client's private state (``ClientContext.state``: FedBN's norm layers, personal models, ...)
is kept in the node's ``context.state`` and, after each fit job, on the node's disk
(node_state.py); it never travels. Only state left by fit jobs is kept, as in the in-process
engine. Each job names the round of the state its client should hold, so a restarted node or a
resumed run restores exactly that state (or stops with an error naming it). Randomness comes
from (seed, round, client) only, so a run gives the same numbers as the in-process engine.

Faults: nodes that drop out of a round are logged in ``nodes.jsonl`` and the round goes on
with the others if at least ``min-clients`` answered; a restarted node rejoins at the next
batch of jobs (see :class:`FlowerTransport`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# flower_records first: it sets the FLWR_* environment defaults before flwr is imported.
from histofed.engine import flower_records as rec  # isort: skip

import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from histofed.algorithms import ALGORITHMS  # noqa: E402
from histofed.algorithms.base import ClientInfo, Payload  # noqa: E402
from histofed.config import Config, ConfigError, config_from_dict, dump_toml  # noqa: E402
from histofed.data.federation import Federation, build_federation  # noqa: E402
from histofed.engine import node_state, rundir  # noqa: E402
from histofed.engine.loop import Experiment, RunError, config_with  # noqa: E402
from histofed.engine.runtime import POOLED, ClientJob, ClientRuntime, JobResult  # noqa: E402
from histofed.flower_patches import patch_serverapp  # noqa: E402

RUN = "histofed.run"  # ConfigRecord of the handshake (and of a node's run info in context.state)
NODE = node_state.NODE  # ConfigRecord: where a node keeps private state, which round it holds
MARKER = "flower.json"  # run_dir file: run key, clients with private state, their state rounds
NODES_LOG = "nodes.jsonl"  # run_dir log: nodes that joined, dropped out of a round, rejoined
# Replies the SuperLink writes itself when a node is gone: a dropout, not a client failure
_UNREACHABLE = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                ErrorCode.NODE_UNAVAILABLE}
_MESSAGE_TYPE = {"fit": MessageType.TRAIN, "evaluate": MessageType.EVALUATE,
                 "score": MessageType.EVALUATE}


# ---- shared by both sides ----------------------------------------------------------------------
def parse_config(config_text: str, source: str = "histofed-config") -> Config:
    """A Config from TOML text (as written to config.toml and sent in the handshake)."""
    try:
        return config_from_dict(tomllib.loads(config_text), source=source)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None


_FEDERATIONS: dict[tuple[str, str], Federation] = {}
_RUNTIMES: dict[tuple[str, str], ClientRuntime] = {}


def cached_federation(config: Config, data_root: str) -> Federation:
    """The run's federation, built once per process (one entry: a process serves one run)."""
    fed = config.federation
    key = (json.dumps([fed.name, fed.options, config.run.seed], sort_keys=True), data_root)
    if key not in _FEDERATIONS:
        _FEDERATIONS.clear()
        _FEDERATIONS[key] = build_federation(
            config.federation.name, data_root=Path(data_root) if data_root else None,
            seed=config.run.seed, **config.federation.options)
    return _FEDERATIONS[key]


def check_flower_supported(config: Config) -> None:
    """Raise ConfigError for methods that cannot run on Flower nodes."""
    if ALGORITHMS.get(config.algorithm.name).pooled:
        raise ConfigError(
            f"algorithm {config.algorithm.name!r} pools every client's data in one place, which "
            "Flower nodes cannot do; run it with [run].engine = \"inprocess\"")


# ---- server side -----------------------------------------------------------------------------
class FlowerTransport:
    """Runs client jobs on Flower nodes through a Grid (simulation or deployment).

    The handshake is how the server learns the sites: each node answers with its
    ``partition-id``, the number of clients and their names as its copy of the config defines
    them, and its own roster entry (read off its own data). The server never reads data.

    Faults: a node that does not answer a batch of jobs within ``timeout`` (or that the
    SuperLink reports unreachable) has dropped out of that batch: a row in ``nodes.jsonl``, a
    warning, and an error result the round loop skips, as long as at least ``min_clients``
    clients answered (else a RunError). Before each batch, nodes the server has not seen are
    asked the handshake, so a restarted SuperNode (a new node id) rejoins with its
    partition-id. Every job names the round of the private state its client should hold; a
    node restores exactly that state from its disk (node_state.py) or fails, naming it.

    Args:
        grid: the ServerApp's Grid.
        config_text: the run's config as TOML text (sent to every node in the handshake).
        data_root: data root the nodes use unless their node config sets ``data-root`` (then
            ``$HISTOFED_DATA`` on the node); "" = the server knows of no data at all.
        run_dir: where ``flower.json`` (run key, state rounds) and ``nodes.jsonl`` go; None to
            skip.
        node_wait: seconds to wait for enough nodes to connect.
        timeout: seconds to wait for the replies of one batch of jobs (None: no limit).
        expected: number of clients (None: as the first node to answer reports it).
        min_clients: the fewest clients a batch of jobs may continue with when others drop
            out (0 = all; one-shot methods always need all).
        run_key: the run's key for the nodes' state folders ("" = draw a new one).
        state_rounds: site -> round of the private state its node must hold (a resume).
        history: server round -> state rounds, as saved in ``flower.json`` (a resume).
        node_state_dir: default state root for nodes without a ``state-dir`` node config.
        after_round: the last round done before this transport starts (a resume's round).

    Raises:
        RunError: too few nodes (names the sites missing and ``node-wait``), a node without a
            usable partition-id, two nodes with the same one, a node that fails the handshake
            (e.g. it cannot read its data) or lacks the private state the server resumes from.
    """

    keeps_state = False  # private client state stays on the nodes

    def __init__(self, grid: Grid, *, config_text: str, data_root: str | Path | None = None,
                 run_dir: Path | None = None, node_wait: float = 300.0,
                 timeout: float | None = None, expected: int | None = None,
                 min_clients: int = 0, run_key: str = "",
                 state_rounds: dict[str, int] | None = None,
                 history: dict[str, dict[str, int]] | None = None, node_state_dir: str = "",
                 after_round: int = 0) -> None:
        self.grid = grid
        self.config_text = config_text
        self.sha = rec.config_sha(config_text)
        config = parse_config(config_text)
        self.run_name = config.run.name
        self.one_shot = ALGORITHMS.get(config.algorithm.name).one_shot
        self.data_root = str(data_root) if data_root else ""
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.timeout = timeout or None
        self.min_clients = int(min_clients)
        self.run_key = run_key or uuid.uuid4().hex[:16]
        self.node_state_dir = node_state_dir
        self.state_round: dict[str, int] = dict(state_rounds or {})  # site -> its state's round
        self.history: dict[str, dict[str, int]] = dict(history or {})
        self.with_state: set[str] = {name for name, r in self.state_round.items() if r}
        self.dropped: set[int] = set()  # cids whose last job got no reply
        self.retired: set[int] = set()  # node ids replaced by another (same partition-id), or no site of this run
        self.roster: list[ClientInfo] = []
        self.names: list[str] = []
        self.node_of: dict[int, int] = self._handshake(node_wait, expected, after_round)
        self.names = [c.name for c in self.roster]

    # -- handshake
    def _nodes(self, enough: int, deadline: float) -> list[int]:
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= enough or time.monotonic() > deadline:
                return nodes
            time.sleep(0.2)

    def _query(self, node: int) -> Message:
        content = RecordDict()
        content[RUN] = ConfigRecord({"config": self.config_text, "config-sha": self.sha,
                                     "data-root": self.data_root})
        content[NODE] = ConfigRecord({"run-key": self.run_key, "run-name": self.run_name,
                                      "state-dir": self.node_state_dir,
                                      "state-rounds": json.dumps(self.state_round)})
        return Message(content, dst_node_id=node, message_type=MessageType.QUERY)

    def _ask(self, nodes: list[int], desc: str) -> dict[int, Message]:
        """The handshake with ``nodes``; every one must answer."""
        labels = {n: f"node {n}" for n in nodes}
        messages = [self._query(n) for n in nodes]
        replies = self._exchange(messages, labels, desc)
        self._check_replies(messages, replies, labels, desc)
        return replies

    def _handshake(self, node_wait: float, expected: int | None,
                   after_round: int) -> dict[int, int]:
        deadline = time.monotonic() + node_wait
        if expected is None:  # ask the first node how many sites the config defines
            first = self._nodes(1, deadline)[:1]
            if not first:
                raise RunError(f"no Flower node connected within {node_wait:.0f} s (node-wait); "
                               "start one SuperNode per client with --node-config "
                               "\"partition-id=K\"")
            reply = self._ask(first, "handshake")[first[0]]
            expected = int(reply.content[RUN]["num-clients"])
        nodes = self._nodes(expected, deadline)
        if len(nodes) < expected:
            raise RunError(self._too_few(nodes, expected, node_wait))
        replies = self._ask(nodes, "handshake")
        node_of: dict[int, int] = {}
        roster: dict[int, ClientInfo] = {}
        names: list[str] = []
        first_node = None
        for node in nodes:
            run = replies[node].content[RUN]
            pid = int(run["partition-id"])
            seen = [str(n) for n in run["client-names"]]
            if first_node is not None and seen != names:  # different data or federation options
                raise RunError(
                    f"Flower nodes disagree on the federation's sites: node {first_node} has "
                    f"{names}, node {node} has {seen}. Every SuperNode must build the same "
                    "federation from the run's config: check each node's data-root "
                    "(--node-config \"data-root=...\" or $HISTOFED_DATA) and histofed version")
            names, first_node = seen, node
            if pid in node_of:
                raise RunError(f"Flower nodes {node_of[pid]} and {node} both have partition-id "
                               f"{pid}; give every SuperNode its own --node-config partition-id")
            node_of[pid] = node
            if "roster" in run:  # absent when the partition-id is out of range (reported below)
                roster[pid] = ClientInfo.from_scalars(dict(run))
        missing = [f"{cid} ({names[cid] if cid < len(names) else '?'})" for cid in range(expected)
                   if cid not in node_of]
        if missing:
            raise RunError(f"no Flower node has partition-id {', '.join(missing)}; node "
                           f"partition-ids: {sorted(node_of)}")
        self.roster = [roster[cid] for cid in range(expected)]
        self.names = [c.name for c in self.roster]
        self.retired |= set(nodes) - set(node_of.values())  # extra nodes: no site of this run
        for cid in range(expected):
            self._check_node_state(cid, node_of[cid], replies[node_of[cid]], after_round, "joined")
        return {cid: node_of[cid] for cid in range(expected)}

    def _too_few(self, nodes: list[int], expected: int, node_wait: float) -> str:
        """The error for fewer nodes than sites, naming the sites that are there and missing."""
        here: dict[int, str] = {}
        names: list[str] = []
        try:  # ask the nodes that came which sites they are (best effort: only for the message)
            for reply in (self._ask(nodes, "handshake") if nodes else {}).values():
                run = reply.content[RUN]
                names = [str(n) for n in run["client-names"]]
                pid = int(run["partition-id"])
                here[pid] = names[pid] if 0 <= pid < len(names) else "?"
        except RunError:
            pass
        site = lambda cid: f"{names[cid]} (partition-id {cid})" if cid < len(names) \
            else f"partition-id {cid}"  # noqa: E731
        connected = ", ".join(site(c) for c in sorted(here)) or "none identified"
        absent = ", ".join(site(c) for c in range(expected) if c not in here)
        return (f"only {len(nodes)} of {expected} Flower nodes connected within {node_wait:.0f} s "
                f"(node-wait): connected: {connected}; missing: {absent}. Start one SuperNode per "
                f"missing site with --node-config \"partition-id=K\" (K = 0..{expected - 1}), or "
                "wait longer: flwr run ... --run-config \"node-wait=600\"")

    def _check_node_state(self, cid: int, node: int, reply: Message, after_round: int,
                          event: str) -> None:
        """The node holds the private state the server expects (never a silent reset); log it
        (``round``: the last round completed before it joined)."""
        name = self.names[cid]
        want = self.state_round.get(name, 0)
        info = reply.content[NODE] if NODE in reply.content else None
        got = int(info["state-round"]) if info is not None else 0
        if info is not None and str(info["problem"]):
            raise RunError(f"{event}: client {name!r} (node {node}): {info['problem']}")
        if got != want:
            raise RunError(
                f"{event}: client {name!r} (node {node}) holds private state of round {got}, but "
                f"the server resumes with its state of round {want}"
                + (f" (state folder {info['state-dir']})" if info is not None else "")
                + "; start its SuperNode with that run's state-dir, or start a new run")
        self._log_nodes([{"round": after_round, "client": name, "node": node, "event": event,
                          "state_round": got,
                          "state_from": str(info["state-from"]) if info is not None else "none"}])

    def _rejoin(self, rnd: int) -> set[int]:
        """Handshake nodes the server has not seen (a restarted SuperNode has a new node id);
        one with a site's partition-id and the same roster entry takes over that site (its old
        node id is no longer used, even while still listed). Returns the live node ids."""
        live = set(self.grid.get_node_ids())
        new = sorted(live - set(self.node_of.values()) - self.retired)
        if not new:
            return live
        labels = {n: f"new node {n}" for n in new}
        replies = self._exchange([self._query(n) for n in new], labels, f"round {rnd} rejoin")
        for node in new:
            reply = replies.get(node)
            if reply is None or (reply.has_error() and reply.error.code in _UNREACHABLE):
                continue  # asked again before the next batch
            if reply.has_error():
                raise RunError(f"round {rnd}: new Flower node {node} failed the handshake: "
                               f"{_summary(reply.error.reason)}")
            run = reply.content[RUN]
            pid = int(run["partition-id"])
            if not 0 <= pid < len(self.roster):  # not one of this run's sites: leave it be
                self.retired.add(node)
                _warn(f"round {rnd}: Flower node {node} (partition-id {pid}) is not one of this "
                      f"run's sites (0..{len(self.roster) - 1}); it gets no jobs")
                continue
            old = self.node_of[pid]
            if ClientInfo.from_scalars(dict(run)) != self.roster[pid]:
                raise RunError(f"round {rnd}: site {self.names[pid]!r} came back on node {node} "
                               "with a different roster entry (data, model or task changed); "
                               "a run keeps its sites: start a new run")
            self._check_node_state(pid, node, reply, rnd - 1, "rejoined")
            self.node_of[pid] = node
            self.dropped.discard(pid)
            self.retired.add(old)  # a SuperLink lists a killed node until its heartbeat lapses
            _warn(f"round {rnd}: client {self.names[pid]!r} rejoined on node {node}"
                  + (f" (replacing node {old}, still listed)" if old in live else ""))
        return live

    # -- jobs
    def run(self, jobs: list[ClientJob], desc: str = "clients") -> list[JobResult]:
        """Send one message per job and collect the replies; results in job order.

        A client whose node is gone or does not answer in time gets an error result
        (``JobResult.error``: dropped out), logged in ``nodes.jsonl``.

        Raises:
            RunError: a client failed (its ClientApp raised), or fewer than ``min_clients``
                (all, for one-shot methods) answered.
        """
        rnd = jobs[0].round if jobs else 0
        live = self._rejoin(rnd)
        messages, labels, absent = [], {}, {}  # absent: cid -> why it has no result
        for job in jobs:
            if job.cid == POOLED or job.cid not in self.node_of:
                raise RunError(f"{desc}: no Flower node runs client {job.cid}")
            node = self.node_of[job.cid]
            if node not in live:
                absent[job.cid] = f"its node {node} is not connected"
                continue
            labels[node] = f"client {self.names[job.cid]!r} (node {node})"
            content = rec.job_to_content(job, self.sha)
            content[rec.JOB]["state-round"] = self.state_round.get(self.names[job.cid], 0)
            messages.append(Message(content, dst_node_id=node,
                                    message_type=_MESSAGE_TYPE[job.kind], group_id=str(job.round)))
        replies = self._exchange(messages, labels, desc) if messages else {}
        cid_of = {node: cid for cid, node in self.node_of.items()}
        for message in messages:
            node = message.metadata.dst_node_id
            reply = replies.get(node)
            if reply is None:
                absent[cid_of[node]] = f"no reply within {self.timeout} s (round-timeout)"
            elif reply.has_error() and reply.error.code in _UNREACHABLE:
                absent[cid_of[node]] = f"unreachable: {_summary(reply.error.reason)}"
                del replies[node]
        self._check_replies([m for m in messages if m.metadata.dst_node_id in replies],
                            replies, labels, desc)
        results = []
        for job in jobs:
            name = self.names[job.cid]
            if job.cid in absent:
                results.append(JobResult(job.kind, job.cid, error=(
                    f"client {name!r} dropped out of {desc}: {absent[job.cid]}")))
                continue
            result, has_state = rec.content_to_result(replies[self.node_of[job.cid]].content)
            if (result.cid, result.kind) != (job.cid, job.kind):
                raise RunError(f"{desc}: node {self.node_of[job.cid]} answered for client "
                               f"{result.cid} ({result.kind}) instead of {job.cid} ({job.kind})")
            self.dropped.discard(job.cid)
            if has_state and job.kind == "fit":  # the node now holds the state of this round
                self.with_state.add(name)
                self.state_round[name] = job.round
            results.append(result)
        self._dropouts(rnd, desc, jobs, absent)
        if self.with_state and any(job.kind == "fit" for job in jobs):
            self.history[str(rnd)] = dict(self.state_round)
            self._write_marker()
        return results

    def _dropouts(self, rnd: int, desc: str, jobs: list[ClientJob], absent: dict[int, str]) -> None:
        """Log the clients that dropped out; RunError when too few answered."""
        if not absent:
            return
        self.dropped |= set(absent)
        self._log_nodes([{"round": rnd, "client": self.names[cid], "node": self.node_of[cid],
                          "event": "dropped", "job": desc, "reason": reason}
                         for cid, reason in sorted(absent.items())])
        answered, total = len(jobs) - len(absent), len(jobs)
        need = total if self.min_clients <= 0 or self.one_shot else min(self.min_clients, total)
        who = "; ".join(f"client {self.names[c]!r} (node {self.node_of[c]}): {why}"
                        for c, why in sorted(absent.items()))
        if answered < need:
            rule = ("this method communicates once, so every client must answer" if self.one_shot
                    else f"min-clients = {self.min_clients or 'all'} (run config: the fewest "
                    "clients a round may continue with)")
            raise RunError(f"{desc}: {who}; only {answered} of {total} clients answered and "
                           f"{rule}. The last checkpoint is intact: resume once the nodes are "
                           "back (logged in nodes.jsonl)")
        _warn(f"{desc}: {who}; continuing with {answered} of {total} clients (min-clients = "
              f"{self.min_clients}; logged in nodes.jsonl)")

    poll_seconds = 0.1  # between pulls of replies in _exchange

    def _exchange(self, messages: list[Message], labels: dict[int, str],
                  desc: str) -> dict[int, Message]:
        """Push the messages, pull the replies every ``poll_seconds``; replies by the node each
        message went to (a reply the SuperLink writes for an unreachable node comes from the
        SuperLink itself). No reply within the round timeout: absent (see _check_replies).

        ``Grid.send_and_receive`` sleeps a fixed 3 s between pulls (Flower 1.42), which a
        deployment would pay on every exchange (issue 13: per-round overhead).
        """
        pending = set(self.grid.push_messages(messages))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
                if m.metadata.message_id}  # set by the Grid when it pushed them
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        replies: dict[int, Message] = {}
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies[sent.get(reply.metadata.reply_to_message_id)
                        or reply.metadata.src_node_id] = reply
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_seconds)
        return replies

    def _check_replies(self, messages: list[Message], replies: dict[int, Message],
                       labels: dict[int, str], desc: str) -> None:
        """Missing replies and Flower errors -> RunError naming the node."""
        missing = [labels[m.metadata.dst_node_id] for m in messages
                   if m.metadata.dst_node_id not in replies]
        if missing:
            raise RunError(f"{desc}: no reply from {', '.join(missing)} within {self.timeout} s "
                           "(round-timeout); the last checkpoint is intact, resume once the "
                           "nodes are back")
        for node, reply in replies.items():
            if reply.has_error():
                reason = reply.error.reason
                raise RunError(f"{desc}: {labels.get(node, f'node {node}')} failed: "
                               f"{_summary(reason)}\n\nFlower error (code {reply.error.code}):\n"
                               f"{reason}")

    # -- the run directory
    def _log_nodes(self, rows: list[dict]) -> None:
        if self.run_dir is not None:
            rundir.append_jsonl(self.run_dir / NODES_LOG, rows)

    def _write_marker(self) -> None:
        """flower.json: the run key of the nodes' state folders and, per server round, the round
        of each client's private state (what a resume from that round expects)."""
        if self.run_dir is None:
            return
        ckpts = rundir.list_checkpoints(self.run_dir)
        oldest = int(ckpts[0].name.split("-")[1]) if ckpts else 0
        self.history = {r: v for r, v in self.history.items() if int(r) >= oldest}
        rundir.atomic_write_text(self.run_dir / MARKER, json.dumps(
            {"run_key": self.run_key, "clients_with_private_state": sorted(self.with_state),
             "state_rounds": self.history}, indent=2))

    def close(self) -> None:
        """Nothing to release: the Grid belongs to the ServerApp."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_marker(run_dir: Path) -> dict[str, Any]:
    """``flower.json`` ({} when absent).

    Raises:
        RunError: it is not valid JSON (names the file).
    """
    marker = run_dir / MARKER
    if not marker.exists():
        return {}
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{marker} is damaged ({err}); it holds the key of the nodes' state "
                       "folders and the rounds of their states, without which a resume would "
                       "lose the clients' private state. Restore it from a copy") from None


def resume_state(run_dir: Path, done: int) -> tuple[str, dict[str, int], dict[str, dict[str, int]]]:
    """(run key, each client's state round at round ``done``, history) from ``flower.json``."""
    info = read_marker(run_dir)
    history = {str(r): {k: int(v) for k, v in rounds.items()}
               for r, rounds in info.get("state_rounds", {}).items()}
    before = [int(r) for r in history if int(r) <= done]
    return str(info.get("run_key", "")), (history[str(max(before))] if before else {}), history


def _summary(reason: str) -> str:
    """The ClientApp's own error message out of a Flower error reason (which wraps it in
    "...ClientAppException occurred. Message: <msg>'>" and, under Ray, a remote traceback)."""
    text = reason.rsplit("Message: ", 1)[-1] if "Message: " in reason else reason
    lines = [line.strip() for line in text.strip().removesuffix("'>").splitlines() if line.strip()]
    return lines[-1] if lines else reason


@dataclass(frozen=True)
class RunSpec:
    """What the ServerApp reads from ``context.run_config`` (kebab-case keys).

    Keys: ``histofed-config-file`` (path to an experiment TOML; wins when set) or
    ``histofed-config`` (the TOML text itself); a resume always uses the run's own
    config.toml. ``run-dir`` ("" = runs/<date>-<time>-<name> under the ServerApp's working
    directory), ``data-root`` ("" = none; a SuperNode's own ``data-root`` node config wins),
    ``resume`` (bool), ``node-wait`` (seconds to wait for the SuperNodes), ``round-timeout``
    (seconds to wait for one batch of replies, 0 = no limit), ``stop-after`` (end after this
    round, 0 = run all; used to test resume), ``num-clients`` (sites to wait for; 0 = as many
    as the first node to answer the handshake says the config defines), ``min-clients`` (the
    fewest clients a round may continue with when nodes drop out; 0 = all must answer),
    ``node-state-dir`` (where nodes without a ``state-dir`` node config keep private client
    state; "" = ``.histofed-node`` in each node's working directory).
    """

    config_text: str
    run_dir: Path | None = None
    data_root: str = ""
    resume: bool = False
    node_wait: float = 300.0
    round_timeout: float = 0.0
    stop_after: int = 0
    num_clients: int = 0
    min_clients: int = 0
    node_state_dir: str = ""

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSpec:
        """Parse and validate a Flower run config.

        Raises:
            ConfigError: no experiment config, a missing config file, bad TOML, a resume
                without run-dir.
        """
        path = str(run_config.get("histofed-config-file", ""))
        run_dir = str(run_config.get("run-dir", ""))
        resume = bool(run_config.get("resume", False))
        if resume:  # continue with the config the run was started with
            saved = Path(run_dir) / "config.toml" if run_dir else None
            if saved is None or not saved.is_file():
                raise ConfigError(f"resume = true needs run-dir = a histofed run directory (with "
                                  f"config.toml); got {run_dir!r}")
            text = dump_toml(parse_config(saved.read_text(), source=str(saved)).to_dict())
            if path and dump_toml(parse_config(Path(path).read_text(), path).to_dict()) != text:
                raise ConfigError(f"{path} differs from {saved}; a resumed run keeps its config "
                                  "(leave histofed-config-file empty to resume)")
        elif path:
            if not Path(path).is_file():
                raise ConfigError(f"histofed-config-file {path} does not exist; give an absolute "
                                  "path on the machine that runs the ServerApp")
            text = Path(path).read_text()
        else:
            text = str(run_config.get("histofed-config", ""))
            if not text.strip():
                raise ConfigError("the Flower run config needs histofed-config-file (path) or "
                                  "histofed-config (TOML text), e.g. flwr run --run-config "
                                  "\"histofed-config-file='/abs/path/experiment.toml'\"")
        config = parse_config(text, source=path or "histofed-config")
        return cls(config_text=dump_toml(config.to_dict()),
                   run_dir=Path(run_dir) if run_dir else None,
                   data_root=str(run_config.get("data-root", "")), resume=resume,
                   node_wait=float(run_config.get("node-wait", 300.0)),
                   round_timeout=float(run_config.get("round-timeout", 0.0)),
                   stop_after=int(run_config.get("stop-after", 0)),
                   num_clients=int(run_config.get("num-clients", 0)),
                   min_clients=int(run_config.get("min-clients", 0)),
                   node_state_dir=str(run_config.get("node-state-dir", "")))

    def to_run_config(self) -> dict[str, Any]:
        return {"histofed-config": self.config_text, "histofed-config-file": "",
                "run-dir": str(self.run_dir or ""), "data-root": self.data_root,
                "resume": self.resume, "node-wait": self.node_wait,
                "round-timeout": self.round_timeout, "stop-after": self.stop_after,
                "num-clients": self.num_clients, "min-clients": self.min_clients,
                "node-state-dir": self.node_state_dir}


def prepare_run_dir(run_dir: Path | None, config: Config, *, resume: bool) -> Path:
    """A new run gets a fresh directory; a resume must not lose private client state.

    Private state kept on Flower nodes is restored from the nodes' disks (node_state.py);
    client states inside the checkpoints (written by the in-process engine) cannot be.

    Raises:
        RunDirError: a new run into a non-empty directory.
        RunError: the checkpoints hold client state Flower nodes cannot take over, or the run
            was written by a histofed that kept node state in memory only.
    """
    if not resume:
        return rundir.new_run_dir(run_dir, config.run.name)
    assert run_dir is not None
    ckpts = rundir.list_checkpoints(run_dir)
    held = [p.name[:-4] for p in (ckpts[-1] / "clients").glob("*.npz")
            if not rundir.load_payload(p.with_name(p.name[:-4])).is_empty()] \
        if ckpts and (ckpts[-1] / "clients").exists() else []
    if held:
        raise RunError(
            f"{run_dir}: cannot resume on Flower: its checkpoints hold the private client state of "
            f"algorithm {config.algorithm.name!r} ({', '.join(sorted(held))}), written by the "
            "in-process engine, and Flower nodes keep their own. Resume it with the in-process "
            "engine, or start a new run")
    info = read_marker(run_dir)
    if ckpts and info.get("clients_with_private_state") and "run_key" not in info:
        raise RunError(
            f"{run_dir}: cannot resume on Flower: its nodes kept private client state "
            f"({', '.join(info['clients_with_private_state'])}) in memory only (the run was made "
            "by an older histofed), so resuming would silently reset it. Start a new run")
    return run_dir


def serve(grid: Grid, spec: RunSpec) -> Payload:
    """The ServerApp's work: one Experiment run over the Grid's nodes; the final server state."""
    config = config_with(parse_config(spec.config_text), engine="flower")  # as config.toml says
    spec = dataclasses.replace(spec, config_text=dump_toml(config.to_dict()))
    check_flower_supported(config)
    done = 0
    if spec.resume and spec.run_dir:  # damaged checkpoints set aside, as in-process
        from histofed.engine import resume_point

        done = resume_point(Path(spec.run_dir))
    run_dir = prepare_run_dir(spec.run_dir, config, resume=spec.resume)
    run_key, state_rounds, history = resume_state(run_dir, done) if spec.resume else ("", {}, {})
    # the server learns the sites from the handshake; it never builds their data
    transport = FlowerTransport(
        grid, config_text=spec.config_text, data_root=spec.data_root, run_dir=run_dir,
        node_wait=spec.node_wait, timeout=spec.round_timeout or None,
        expected=spec.num_clients or None, min_clients=spec.min_clients, run_key=run_key,
        state_rounds=state_rounds, history=history, node_state_dir=spec.node_state_dir,
        after_round=done)
    try:
        experiment = Experiment(config, transport.roster, run_dir)
        if not spec.resume:
            experiment.write_header("flower")
            experiment._write_run_json(data_root=spec.data_root or None)
        return experiment.run(transport, resume=spec.resume, engine="flower",
                              stop_after=spec.stop_after or None, header_written=True)
    finally:
        transport.close()


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Flower entry point: read the run config and run the experiment (see :class:`RunSpec`)."""
    patch_serverapp()  # a deployment's pulls of replies: no 1 s sleep per early pull
    serve(grid, RunSpec.from_run_config(dict(context.run_config)))


# ---- client side -----------------------------------------------------------------------------
def client_runtime(config_text: str, data_root: str) -> ClientRuntime:
    """This process's ClientRuntime for a run, built once (one torch thread per process)."""
    key = (config_text, data_root)
    if key not in _RUNTIMES:
        torch.set_num_threads(1)
        _RUNTIMES.clear()
        config = parse_config(config_text)
        _RUNTIMES[key] = ClientRuntime(config, cached_federation(config, data_root))
    return _RUNTIMES[key]


client_app = ClientApp()


@client_app.query()
def client_handshake(msg: Message, context: Context) -> Message:
    """Learn the run (config, data root), answer with this node's partition-id.

    A node names its client with ``--node-config "site=NAME"`` (a client name of the
    federation, as a deployment does) or ``"partition-id=K"`` (its index, as the simulation
    does); ``site`` wins when both are set.
    """
    site = context.node_config.get("site")
    pid = context.node_config.get("partition-id")
    if site is None and (pid is None or not str(pid).lstrip("-").isdigit()):
        raise ValueError(f"this SuperNode's node config has partition-id={pid!r} and no site; "
                         "start it with --node-config \"site=NAME\" (the client's name in the "
                         "federation) or \"partition-id=K\" (its index, 0-based)")
    run = msg.content[RUN]
    data_root = str(context.node_config.get("data-root", "") or run["data-root"]
                    or os.environ.get("HISTOFED_DATA", ""))
    runtime = client_runtime(str(run["config"]), data_root)  # data problems surface now
    names = runtime.federation.client_names
    if site is not None:
        if str(site) not in names:
            raise ValueError(f"this SuperNode's site={site!r} is not a client of federation "
                             f"{runtime.config.federation.name!r} as this config defines it; "
                             f"valid site names: {', '.join(names)}")
        pid = names.index(str(site))
    context.state[RUN] = ConfigRecord({"config": str(run["config"]),
                                       "config-sha": str(run["config-sha"]),
                                       "data-root": data_root, "cid": int(pid)})
    reply = RecordDict()
    record = {"partition-id": int(pid), "num-clients": len(names), "client-names": names}
    if 0 <= int(pid) < len(names):  # this site's roster entry: what it tells the coordinator
        record.update(runtime.roster([int(pid)])[0].to_scalars())
        if NODE in msg.content:  # where its private state lives; restore the one expected
            reply[NODE] = node_state.handshake(msg.content[NODE], context, names[int(pid)])
    reply[RUN] = ConfigRecord(record)
    return Message(reply, reply_to=msg)


def _run_job(msg: Message, context: Context) -> Message:
    if RUN not in context.state:
        raise RuntimeError("this node got a job before the handshake (was the SuperNode "
                           "restarted mid-run?); resume the run from its last checkpoint")
    run = context.state[RUN]
    job, sha = rec.content_to_job(msg.content)
    if sha != run["config-sha"] or job.cid != run["cid"]:
        raise RuntimeError(f"job for client {job.cid} (config {sha}) sent to the node of client "
                           f"{run['cid']} (config {run['config-sha']})")
    if _MESSAGE_TYPE.get(job.kind) != msg.metadata.message_type:
        raise RuntimeError(f"{job.kind} job in a {msg.metadata.message_type!r} message")
    expected = msg.content[rec.JOB].get("state-round")
    if expected is not None:  # hold the state of the round the server expects (or fail)
        node_state.restore_for_job(context.state, int(expected), job.cid)
    job.state = rec.load_state(context.state)
    runtime = client_runtime(str(run["config"]), str(run["data-root"]))
    result = runtime.run(job)
    state = result.state if result.state is not None else job.state
    if job.kind == "fit":  # as in-process: only fit jobs update a client's state (memory + disk)
        node_state.after_fit(context.state, state, job.round, runtime.config.run.keep_checkpoints)
    kept = rec.load_state(context.state)
    return Message(rec.result_to_content(result, has_state=not kept.is_empty()), reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Run a fit job with this node's private state; keep the new state here."""
    return _run_job(msg, context)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """Run an evaluate job (its state changes are dropped, as in-process)."""
    return _run_job(msg, context)


# ---- simulation ------------------------------------------------------------------------------
def simulation_backend(num_actors: int) -> dict[str, Any]:
    """Ray backend config: ``num_actors`` ClientApp actors of 1 CPU each, no GPU."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": int(num_actors), "num_gpus": 0}}


def run_flower_simulation(config: Config, *, data_root: Path | str | None, run_dir: Path | str,
                          num_cpus: int | None = None, resume: bool = False,
                          stop_after: int | None = None) -> Payload:
    """Run ``config`` with Flower's simulation runtime; returns the final server state.

    One virtual SuperNode per client; at most ``num_cpus`` (default ``[run].workers``, 0 = all
    cores) ClientApp actors of one CPU each run at once. The run directory is written exactly
    as by the in-process engine (config.toml, run.json, metrics.jsonl, egress.jsonl,
    checkpoints, final/), plus ``nodes.jsonl`` (nodes that joined) and, when clients keep
    private state, ``flower.json`` and the nodes' state folders under ``node-state/``.

    Raises:
        ConfigError: a method that cannot run on Flower (the pooled baseline).
        RunError: resume of a run whose checkpoints hold in-process client state, a node
            without the state the resume expects, or a client failure (names client and node).
    """
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from histofed.engine.inprocess import default_workers

    check_flower_supported(config)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPU-env FutureWarning
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, config, resume=resume)  # fail before Ray starts
    # the launcher (not the ServerApp) counts the virtual SuperNodes to start
    n_clients = len(cached_federation(config, str(data_root) if data_root else "").clients)
    spec = RunSpec(config_text=dump_toml(config.to_dict()), run_dir=run_dir,
                   data_root=str(data_root) if data_root else "", resume=resume,
                   stop_after=stop_after or 0, node_wait=60.0, num_clients=n_clients,
                   node_state_dir=str(run_dir.resolve() / "node-state"))
    actors = max(1, min(num_cpus or config.run.workers or default_workers(), n_clients))
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                      run_config=spec.to_run_config())
    # The public run_simulation() gives the ServerApp an empty run_config; its private twin
    # takes the ServerApp's Context (flwr is pinned < 1.43 in pyproject.toml).
    _run_simulation(num_supernodes=n_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app, server_app=server_app,
                    backend_config=simulation_backend(actors), server_app_context=context)
    ckpts = rundir.list_checkpoints(run_dir)
    if not ckpts:
        raise RunError(f"{run_dir}: the Flower simulation ended without a checkpoint")
    return rundir.load_checkpoint(ckpts[-1])[1]
