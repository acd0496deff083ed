"""A Flower node's private client state, kept on the node's own disk so a run can resume.

A client's private state (FedBN's norm layers, personal models, a per-client DP accountant)
never leaves its SuperNode. In memory it lives in the node's ``context.state``, which a
restarted SuperNode (or a resumed run, which is a new Flower run) no longer has. So after each
fit job the node also writes it, atomically and with checksums (the run directory's own
checkpoint format, :func:`histofed.engine.rundir.save_checkpoint`), to::

    <state root>/<run name>-<run key>/<site>/checkpoints/round-NNNN/clients/<site>.npz (+ .json,
                                                                  meta.json, SHA256SUMS)

``state root``: the node config ``state-dir``, else the run config's ``node-state-dir`` (the
simulation sets ``<run dir>/node-state``), else ``.histofed-node`` under the node's working
directory. The run key is drawn once per run by the server (``flower.json``), so a new run
never reads an old run's state. A node keeps the states of its newest ``keep_checkpoints + 2``
fits: enough for every checkpoint the server keeps, plus a fit the server never checkpointed.

Every message from the server names the round of the state it expects the client to hold (the
round of the client's last fit the server saw). A node whose state differs (a restarted node,
a resumed run, a fit whose reply was lost) restores exactly that round from disk, or fails
with an error naming the site, both rounds and the state folder; a state is never silently
reset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flwr.app import ConfigRecord, Context, RecordDict

from histofed.algorithms.base import Payload
from histofed.engine import flower_records as rec
from histofed.engine import rundir

ROUND = "histofed.state-round"  # ConfigRecord in context.state: {"round": round of the state}
NODE = "histofed.node-state"  # ConfigRecord: handshake (run key, expected rounds) and reply;
#                               in context.state: this node's state folder, site, source
DEFAULT_ROOT = ".histofed-node"


class NodeStateError(RuntimeError):
    """The state a server expects is not on this node (names the site, rounds and folder)."""


def state_folder(root: str | Path, run_name: str, run_key: str, site: str) -> Path:
    """Where one site's states of one run live (see the module docstring)."""
    run = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-") or "run"
    return Path(root).expanduser().resolve() / f"{run}-{run_key}" / rundir.safe_stem(site)


def memory_round(state: RecordDict) -> int:
    """Round of the state held in ``context.state`` (0: none)."""
    return int(state[ROUND]["round"]) if ROUND in state else 0


def keep(state: RecordDict, payload: Payload, rnd: int) -> None:
    """Hold ``payload`` as the client's state of round ``rnd`` in ``context.state``."""
    rec.store_state(state, payload)
    state[ROUND] = ConfigRecord({"round": int(rnd)})


def persist(folder: Path, site: str, rnd: int, payload: Payload, keep_last: int) -> None:
    """Write the state of round ``rnd`` (atomic, checksummed); keep the newest ``keep_last``."""
    folder.mkdir(parents=True, exist_ok=True)
    rundir.save_checkpoint(folder, rnd, Payload(kind="state"), {site: payload}, keep_last)


def rounds_on_disk(folder: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in rundir.list_checkpoints(folder)]


def load(folder: Path, site: str, rnd: int) -> Payload:
    """The state of round ``rnd`` from disk.

    Raises:
        NodeStateError: it is missing or damaged (names the file, the rounds present, the fix).
    """
    ckpt = folder / "checkpoints" / f"round-{rnd:04d}"
    if not (ckpt / "meta.json").exists():
        have = rounds_on_disk(folder) if folder.exists() else []
        raise NodeStateError(
            f"site {site!r}: the server expects this client's private state of round {rnd}, but "
            f"{folder} holds rounds {have or 'none'}. Start this SuperNode with the state folder "
            "of this run (--node-config \"state-dir='...'\"), or start a new run")
    problem = rundir.checkpoint_problem(ckpt)
    if problem is not None:
        raise NodeStateError(f"site {site!r}: the private state of round {rnd} is damaged: "
                             f"{problem}. It cannot be rebuilt; start a new run")
    return rundir.load_checkpoint(ckpt)[2][site]


def restore(state: RecordDict, expected: int, folder: Path | None, site: str) -> str:
    """Make ``context.state`` hold the client's state of round ``expected`` (0 = none).

    Returns where it came from: "memory" (already held), "disk", or "none".

    Raises:
        NodeStateError: the state of that round is not on this node.
    """
    if memory_round(state) == expected:
        return "memory" if expected else "none"
    if expected == 0:  # the server saw no state of this client: a fresh start
        keep(state, Payload(kind="state"), 0)
        return "none"
    if folder is None:
        raise NodeStateError(f"site {site!r}: the server expects private state of round "
                             f"{expected}, but this node has no state folder")
    keep(state, load(folder, site, expected), expected)
    return "disk"


# ---- the ClientApp's side ---------------------------------------------------------------------
def handshake(info: ConfigRecord, context: Context, site: str) -> ConfigRecord:
    """Find this run's state folder on this node and restore the state the server expects.

    Folder root: node config ``state-dir``, else the run's ``node-state-dir`` (``info``), else
    ``.histofed-node`` in the working directory. Problems are reported, not raised, so the
    server's error can name the site, the node and both rounds.
    """
    root = str(context.node_config.get("state-dir", "") or info["state-dir"] or DEFAULT_ROOT)
    folder = state_folder(root, str(info["run-name"]), str(info["run-key"]), site)
    before = context.state[NODE] if NODE in context.state else None
    if before is not None and before["folder"] != str(folder):
        keep(context.state, Payload(kind="state"), 0)  # another run's state: not ours
        before = None
    expected = int(json.loads(str(info["state-rounds"])).get(site, 0))
    try:
        source, problem = restore(context.state, expected, folder, site), ""
    except NodeStateError as err:
        source, problem = "missing", str(err)
    if source == "memory" and before is not None:  # asked twice: where the state came from
        source = str(before["from"])
    context.state[NODE] = ConfigRecord({"folder": str(folder), "site": site, "from": source})
    return ConfigRecord({"state-round": memory_round(context.state), "state-from": source,
                         "state-dir": str(folder), "problem": problem})


def restore_for_job(state: RecordDict, expected: int, cid: int) -> None:
    """Before a job: hold the state of round ``expected`` (see :func:`restore`)."""
    node = state[NODE] if NODE in state else None
    restore(state, expected, Path(str(node["folder"])) if node is not None else None,
            str(node["site"]) if node is not None else f"client {cid}")


def after_fit(state: RecordDict, payload: Payload, rnd: int, keep_checkpoints: int) -> None:
    """After a fit job: hold its state in memory and, when not empty, write it to disk (the
    newest ``keep_checkpoints + 2`` kept; 0 = all)."""
    keep(state, payload, rnd)
    if NODE in state and not payload.is_empty():
        node = state[NODE]
        persist(Path(str(node["folder"])), str(node["site"]), rnd, payload,
                keep_checkpoints and keep_checkpoints + 2)
