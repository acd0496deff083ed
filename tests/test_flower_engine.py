"""The Flower engine: wire format, handshake, private state on the nodes, resume, and the same
numbers as the in-process engine (in Flower's Ray simulation: tests marked ``flower``).

``LocalGrid`` runs the real ServerApp/ClientApp objects without Ray: it hands each message to
``client_app`` in this process, one Context per node, with every record and every node state
passing through Flower's protobuf serialisation as on the wire.
"""

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_config_dict
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from histofed.algorithms import ALGORITHMS
from histofed.algorithms.base import Payload
from histofed.algorithms.weights import norm_keys
from histofed.config import ConfigError, NamedConfig, config_from_dict, dump_toml
from histofed.engine import flower as F
from histofed.engine import flower_records as rec
from histofed.engine import run_experiment
from histofed.engine.loop import RunError
from histofed.engine.rundir import load_payload, new_run_dir, read_jsonl
from histofed.engine.runtime import JobResult
from histofed.models import build_model


def _cfg(method="fedavg", **tables):
    return config_from_dict(tiny_config_dict(method, **tables), source="tiny")


def _wire(records: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(records))


class LocalGrid:
    """The Grid calls FlowerTransport makes, served by ``client_app`` in this process."""

    def __init__(self, partition_ids, **node_config):
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                             node_config={**node_config,
                                          **({} if pid is None else {"partition-id": pid})})
            for i, pid in enumerate(partition_ids)}
        self.log: list[tuple[str, str, RecordDict]] = []  # (direction, message type, content)
        self.pushed: list[Message] = []  # pushed, not yet delivered
        self.replies: dict[str, Message] = {}  # delivered, not yet pulled (by message id)
        self.count = 0

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for sent in messages:
            ids.append(f"m{self.count}")
            self.count += 1
            sent.metadata.__dict__["_message_id"] = ids[-1]  # as a real Grid's push sets it
            self.pushed.append(sent)
        return ids

    def pull_messages(self, message_ids):
        if self.pushed:  # everything pushed so far is delivered together, as one batch
            batch, self.pushed = self.pushed, []
            for reply in self.exchange(batch):
                self.replies[reply.metadata.reply_to_message_id] = reply
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def exchange(self, messages):
        """Deliver one batch of pushed messages; replies (test grids simulate faults here)."""
        return [self._deliver(m, m.metadata.message_id) for m in messages]

    def _deliver(self, sent, message_id):
        node, kind = sent.metadata.dst_node_id, sent.metadata.message_type
        msg = Message(_wire(sent.content), dst_node_id=node, message_type=kind)
        msg.metadata.__dict__["_message_id"] = message_id  # as the SuperLink sets it
        self.log.append(("down", kind, msg.content))
        ctx = self.contexts[node]
        try:
            reply = F.client_app(msg, ctx)
        except Exception as err:  # what Flower's runtimes do with a ClientApp exception
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 f"{type(err).__name__}: {err}"), reply_to=msg)
        ctx.state = _wire(ctx.state)  # the node's state is serialised between messages too
        reply = Message(_wire(reply.content), reply_to=msg)
        self.log.append(("up", kind, reply.content))
        return reply


def _serve(cfg, run_dir, grid=None, **spec):
    """Run the real server_app over a LocalGrid (3 nodes with partition-ids 0..2); the nodes
    keep private state under ``<run_dir>/node-state`` (as in the simulation)."""
    grid = grid or LocalGrid([0, 1, 2])
    spec.setdefault("node_state_dir", str(Path(run_dir) / "node-state"))
    run_spec = F.RunSpec(config_text=dump_toml(cfg.to_dict()), run_dir=run_dir, **spec)
    F.server_app(grid=grid, context=Context(run_id=1, node_id=0, node_config={},
                                            state=RecordDict(), run_config=run_spec.to_run_config()))
    return grid


def _final(run_dir: Path) -> dict:
    with np.load(run_dir / "final" / "global.npz") as z:
        return {k: z[k] for k in z.files}


def _test_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "test"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps new messages with the process's task identity (as a ServerApp has)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory):
    """In-process reference runs (workers = 1), one per method: run_dir."""
    runs = {}

    def get(method: str) -> Path:
        if method not in runs:
            out = new_run_dir(tmp_path_factory.mktemp("inprocess") / method, method)
            run_experiment(_cfg(method), data_root=None, run_dir=out)
            runs[method] = out
        return runs[method]

    return get


# ---- wire format ---------------------------------------------------------------------------
def test_payload_roundtrip_keeps_keys_dtypes_values_and_kind():
    arrays = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
              "bn.num": np.array(5, dtype=np.int64), "half": np.array([1.5, -2], np.float16),
              "empty": np.zeros((0, 3)), "mask": np.array([True, False]),
              "big-endian": np.arange(3, dtype=">i4"), "strided": np.arange(10.0)[::2]}
    scalars = {"num_examples": 12, "sigma": 0.5, "tag": "x", "flag": True, "ints": [1, 2],
               "mixed": [1, 2.5], "none": [], "nested": {"a": [1, "b"]}, "big": 2**70,
               "nan": float("nan")}
    records = RecordDict()
    for key, record in rec.payload_to_records(Payload(arrays, scalars, "stats")).items():
        records[key] = record
    back = rec.records_to_payload(_wire(records))
    assert back.kind == "stats" and list(back.arrays) == list(arrays)
    for k, v in arrays.items():
        assert back.arrays[k].dtype == v.dtype and back.arrays[k].shape == v.shape
        np.testing.assert_array_equal(back.arrays[k], v)
    assert list(back.scalars) == list(scalars) and np.isnan(back.scalars.pop("nan"))
    assert back.scalars == {k: v for k, v in scalars.items() if k != "nan"}
    assert [type(back.scalars[k]) for k in ("num_examples", "sigma", "flag", "big")] == \
        [int, float, bool, int]
    back.arrays["conv.weight"][0, 0, 0] = 99.0  # independent, writable copies
    assert arrays["conv.weight"][0, 0, 0] == 0.0
    # one Flower Array per payload, whatever the number of tensors: a SuperNode fetches each
    # Array as its own object (one request each), so a UNet's ~60 tensors were ~60 requests
    assert len(records[f"{rec.PAYLOAD}.arrays"]) == 1
    empty = RecordDict(rec.payload_to_records(Payload({}, {}, "weights")))
    assert rec.records_to_payload(_wire(empty)).arrays == {}


def test_jobs_and_replies_are_few_flower_objects():
    """Every record is one more object, so one more request on each hop of a deployment
    (ServerApp, SuperLink, SuperNode, ClientApp): a job is 7 objects whatever the model, a
    reply without payload 3 whatever its number of metric tables (issue 13)."""
    from flwr.app import MessageType
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from histofed.engine.runtime import ClientJob

    payload = Payload({f"w{i}": np.zeros((4, 3), np.float32) for i in range(60)}, {"lr": 0.1})
    job = Message(rec.job_to_content(ClientJob("fit", 0, 1, payload), "sha"), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    fit = JobResult("fit", 0, payload=payload, logs={"loss": 1.0})
    scores = JobResult("evaluate", 0, logs={"loss": 1.0}, metrics={
        "global/test": {"dice": 0.3}, "global/val": {"dice": 0.2}, "personal/test": {"dice": 1.0}})
    objects = lambda content: len(get_all_nested_objects(Message(content, reply_to=job)))  # noqa: E731
    assert len(get_all_nested_objects(job)) == 7
    assert objects(rec.result_to_content(fit, False)) == 7
    assert objects(rec.result_to_content(scores, False)) == 3


def test_result_roundtrip_and_metrics_must_be_numbers():
    result = JobResult("evaluate", 2, metrics={"global/test": {"dice": np.float64(0.25),
                                                               "n": np.int64(4)}},
                       logs={"loss": np.float32(0.5)}, error="boom", seconds=1.5)
    back, has_state = rec.content_to_result(_wire(rec.result_to_content(result, has_state=True)))
    assert (back.kind, back.cid, back.error, back.seconds, has_state) == \
        ("evaluate", 2, "boom", 1.5, True)
    assert back.metrics == {"global/test": {"dice": 0.25, "n": 4}} and back.logs == {"loss": 0.5}
    assert type(back.metrics["global/test"]["n"]) is int and back.payload is None
    with pytest.raises(TypeError, match="'organ' = 'lung': metrics must be numbers"):
        rec.result_to_content(JobResult("evaluate", 0, metrics={"g/t": {"organ": "lung"}}), False)


def test_node_state_restores_the_round_asked_for_and_never_resets_silently(tmp_path):
    """A node that trained round 3 but whose reply was lost is asked for round 2: it loads round
    2 from disk; only the newest keep_checkpoints + 2 states are kept."""
    from histofed.engine import node_state as NS

    folder = NS.state_folder(tmp_path, "my run", "k1", "site-a")
    assert folder == tmp_path.resolve() / "my-run-k1" / "site-a"
    memory = RecordDict()
    states = {r: Payload({"bn.weight": np.full(3, r, np.float32)}, {"steps": r}, "state")
              for r in range(1, 5)}
    for r, state in states.items():
        NS.keep(memory, state, r)
        NS.persist(folder, "site-a", r, state, keep_last=3)
    assert NS.rounds_on_disk(folder) == [2, 3, 4] and NS.memory_round(memory) == 4
    assert NS.restore(memory, 4, folder, "site-a") == "memory"
    assert NS.restore(memory, 2, folder, "site-a") == "disk"
    back = rec.load_state(memory)
    assert back.scalars == {"steps": 2} and NS.memory_round(memory) == 2
    np.testing.assert_array_equal(back.arrays["bn.weight"], states[2].arrays["bn.weight"])
    with pytest.raises(NS.NodeStateError, match=r"state of round 1, but .*site-a holds rounds "
                                                r"\[2, 3, 4\]"):
        NS.restore(memory, 1, folder, "site-a")
    assert NS.restore(memory, 0, folder, "site-a") == "none"  # a fresh start: nothing held
    assert rec.load_state(memory).is_empty()


# ---- the engine without Ray ----------------------------------------------------------------
def test_fedavg_with_crash_and_resume_equals_inprocess(inprocess, tmp_path):
    """Stop after round 2, resume on fresh nodes (a restarted federation): same as in-process."""
    cfg = _cfg("fedavg")
    out = tmp_path / "flower"
    _serve(cfg, out, stop_after=2)
    assert not (out / "final").exists() and len(read_jsonl(out / "timing.jsonl")) == 2
    _serve(cfg, out, resume=True)
    ref = inprocess("fedavg")
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref)
    assert json.loads((out / "run.json").read_text())["engine"] == "flower"
    assert tomllib.loads((out / "config.toml").read_text())["run"]["engine"] == "flower"
    assert not (out / F.MARKER).exists()  # FedAvg clients keep no private state


def test_fedbn_state_never_travels_and_resumes_from_the_nodes_disks(inprocess, tmp_path, capsys):
    """FedBN stops after round 2; round 2's checkpoint is then damaged, so the server resumes
    after round 1 on fresh nodes (empty memory: a restart), which restore their norm layers of
    round 1 from disk although they also hold round 2's: same weights as in-process."""
    cfg = _cfg("fedbn")
    out = tmp_path / "fedbn"
    grid = _serve(cfg, out, stop_after=2)
    norms = {k for k in norm_keys(build_model(cfg.model, num_classes=1))
             if not k.endswith("num_batches_tracked")}
    assert norms
    jobs = [(d, t, c) for d, t, c in grid.log if t != "query"]
    assert len(jobs) == 2 * 3 * 2 * 2  # rounds x clients x (fit, evaluate) x (down, up)
    for direction, _, content in jobs:
        assert not any(k.startswith(rec.STATE) for k in content)
        arrays = rec.records_to_payload(content).arrays if rec.has_payload(content) else {}
        first_broadcast = direction == "down" and content[rec.JOB]["round"] == 1
        assert first_broadcast or not (norms & set(arrays)), "norm layers left a node"
    for ctx in grid.contexts.values():  # ... and they are kept on each node
        assert set(rec.load_state(ctx.state).arrays) == norms
    marker = json.loads((out / F.MARKER).read_text())
    assert marker["clients_with_private_state"] == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert marker["state_rounds"]["2"] == {f"synthetic-{i}": 2 for i in range(3)}
    (out / "checkpoints" / "round-0002" / "server.npz").write_bytes(b"")  # damaged
    capsys.readouterr()
    _serve(cfg, out, resume=True)
    err = capsys.readouterr().err
    assert "round-0002/server.npz is truncated or damaged" in err and "after round 1" in err
    ref = inprocess("fedbn")
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref)  # "personal" models: each node's own norm layers
    joined = [r for r in read_jsonl(out / F.NODES_LOG) if r["event"] == "joined"]
    assert [(r["round"], r["state_round"], r["state_from"]) for r in joined] == \
        [(0, 0, "none")] * 3 + [(1, 1, "disk")] * 3


def test_feddp_record_level_server_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """The server stops after round 1 and is resumed on fresh nodes: same round counter, the
    same per-client accountants (kept in each node's private state) and the same weights."""
    cfg = _cfg("feddp", model={"norm": "group", "channels": [4, 8]}, run={"rounds": 2},
               algorithm={"level": "record", "sigma": 1.0, "clip": 1.0})
    ref = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out, stop_after=1)
    assert [r["round"] for r in read_jsonl(out / "privacy.jsonl")] == [1]
    _serve(cfg, out, resume=True)
    assert [r["round"] for r in read_jsonl(out / "timing.jsonl")] == [1, 2]
    for log in ("privacy.jsonl", "privacy_clients.jsonl"):
        assert read_jsonl(out / log) == read_jsonl(ref / log), log
    eps = [r["epsilon"] for r in read_jsonl(out / "privacy.jsonl")]
    assert eps[1] > eps[0] > 0
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref)


def test_resume_refuses_a_node_without_the_expected_state(tmp_path):
    cfg = _cfg("fedbn", run={"rounds": 2})
    out = tmp_path / "fedbn"
    _serve(cfg, out, stop_after=1)
    folder = next((out / "node-state").glob("*/synthetic-1"))
    (folder / "checkpoints" / "round-0001").rename(folder / "checkpoints" / "round-0007")
    with pytest.raises(RunError, match=r"joined: client 'synthetic-1' \(node 101\): site "
                                       r"'synthetic-1': the server expects this client's private "
                                       r"state of round 1, but .*synthetic-1 holds rounds \[7\]"):
        _serve(cfg, out, resume=True)
    (folder / "checkpoints" / "round-0007").rename(folder / "checkpoints" / "round-0001")
    (folder / "checkpoints" / "round-0001" / "clients" / "synthetic-1.npz").write_bytes(b"x")
    with pytest.raises(RunError, match="synthetic-1': the private state of round 1 is damaged: "
                                       ".*synthetic-1.npz is truncated or damaged"):
        _serve(cfg, out, resume=True)
    with pytest.raises(RunError, match="client 'synthetic-0' .*state of round 1, but "
                                       f"{tmp_path / 'empty'}/.* holds rounds none"):
        _serve(cfg, out, resume=True,  # a node's own state-dir wins over the run's
               grid=LocalGrid([0, 1, 2], **{"state-dir": str(tmp_path / "empty")}))


def test_resume_of_inprocess_run_with_client_state_is_refused(tmp_path):
    cfg = _cfg("fedbn", run={"rounds": 2})
    out = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=out, stop_after=1)
    assert not load_payload(out / "checkpoints" / "round-0001" / "clients" / "synthetic-0").is_empty()
    with pytest.raises(RunError, match="synthetic-0, synthetic-1, synthetic-2.*in-process"):
        F.prepare_run_dir(out, cfg, resume=True)


@pytest.mark.parametrize("pids, match", [
    ([0, 0, 1], "nodes 100 and 101 both have partition-id 0"),
    ([0, 1, 5], r"no Flower node has partition-id 2 \(synthetic-2\)"),
    ([0, 1], r"only 2 of 3 Flower nodes connected within 0 s \(node-wait\): connected: "
             r"synthetic-0 \(partition-id 0\), synthetic-1 \(partition-id 1\); missing: "
             r"synthetic-2 \(partition-id 2\)\..*node-wait=600"),
    ([0, None, 2], "node 101 failed: ValueError: .*partition-id=None.*--node-config"),
])
def test_handshake_errors_name_the_node_and_the_fix(pids, match):
    with pytest.raises(RunError, match=match):
        F.FlowerTransport(LocalGrid(pids), config_text=dump_toml(_cfg().to_dict()), node_wait=0.0)


def test_nodes_that_build_different_federations_are_refused_naming_both():
    class OtherDataGrid(LocalGrid):  # node 102 has other data: its federation has other sites
        def exchange(self, messages):
            replies = super().exchange(messages)
            for r in replies:
                if r.metadata.src_node_id == 102 and F.RUN in r.content:
                    r.content[F.RUN]["client-names"] = ["a", "b", "c"]
            return replies

    with pytest.raises(RunError, match=r"disagree on the federation's sites: node 101 has "
                                       r"\['synthetic-0'.*node 102 has \['a', 'b', 'c'\].*data-root"):
        F.FlowerTransport(OtherDataGrid([0, 1, 2]), config_text=dump_toml(_cfg().to_dict()),
                          node_wait=0.0)


class DyingGrid(LocalGrid):
    """A LocalGrid in which node ``node`` dies when it gets its fit job of round ``rnd``: no
    reply (a round-timeout) or, with ``unreachable``, the SuperLink's own NODE_UNAVAILABLE
    reply. It is gone for the rest of that round and comes back for the next one as a new node
    id with an empty memory (a restarted SuperNode). With ``late``, it runs the job but its
    reply comes too late (lost) and it stays."""

    def __init__(self, pids, *, rnd=2, node=101, unreachable=False, late=False, **node_config):
        super().__init__(pids, **node_config)
        self.rnd, self.node, self.unreachable, self.late = rnd, node, unreachable, late
        self.waiting: dict[int, Context] = {}  # restarted nodes not yet connected

    def exchange(self, messages):
        lost = [m for m in messages if m.metadata.dst_node_id == self.node and rec.JOB in
                m.content and (m.content[rec.JOB]["round"], m.content[rec.JOB]["kind"]) ==
                (self.rnd, "fit")]
        replies = super().exchange([m for m in messages if m not in lost])
        if self.late:  # late, not dead: the node trains (and keeps that state), the reply is lost
            super().exchange(lost)
            return replies
        for m in lost:  # the node dies: its context (memory) is lost
            if self.unreachable:
                error = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"),
                                reply_to=m)
                error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # SuperLink's
                replies.append(error)
            old = self.contexts.pop(self.node)
            self.waiting[200 + self.node % 100] = Context(
                run_id=1, node_id=200 + self.node % 100, state=RecordDict(), run_config={},
                node_config=old.node_config)
        kinds = {m.content[rec.JOB]["kind"] for m in messages if rec.JOB in m.content}
        rounds = {m.content[rec.JOB]["round"] for m in messages if rec.JOB in m.content}
        if self.waiting and kinds == {"evaluate"} and rounds == {self.rnd}:
            self.contexts.update(self.waiting)  # back after the round it died in
            self.waiting.clear()
        return replies


def _uploads_and_next_broadcast(grid, rnd):
    """The fit uploads of round ``rnd`` (by node) and the round ``rnd + 1`` fit broadcast."""
    ups, down, current = {}, None, None
    for direction, kind, content in grid.log:
        if direction == "down" and rec.JOB in content:
            current = (content[rec.JOB]["kind"], content[rec.JOB]["round"])
            if current == ("fit", rnd + 1) and down is None:
                down = rec.records_to_payload(content).arrays
        elif direction == "up" and current == ("fit", rnd):
            ups[content[rec.RESULT]["cid"]] = rec.records_to_payload(content).arrays
    return ups, down


@pytest.mark.parametrize("method, unreachable", [("fedavg", False), ("fedbn", True)])
def test_node_killed_mid_round_drops_out_and_rejoins_next_round(method, unreachable, tmp_path,
                                                                capsys):
    """Round 2 goes on without synthetic-1 (min-clients = 2), whose dropout is logged; its
    restarted node rejoins for round 3 (FedBN: restoring its round-1 norm layers from disk)."""
    cfg = _cfg(method, algorithm={"weight": "uniform"})
    out = tmp_path / method
    grid = DyingGrid([0, 1, 2], unreachable=unreachable)
    _serve(cfg, out, grid=grid, min_clients=2, round_timeout=5.0)
    reason = "unreachable: Error: Node Unavailable" if unreachable else \
        "no reply within 5.0 s (round-timeout)"
    err = capsys.readouterr().err
    assert (f"warning: round 2 fit: client 'synthetic-1' (node 101): {reason}; continuing with 2 "
            "of 3 clients (min-clients = 2; logged in nodes.jsonl)") in err
    assert "client 'synthetic-1' rejoined on node 201" in err
    events = [(r["event"], r["round"], r["client"], r["node"], r.get("job"))
              for r in read_jsonl(out / F.NODES_LOG) if r["event"] != "joined"]
    assert events == [("dropped", 2, "synthetic-1", 101, "round 2 fit"),
                      ("dropped", 2, "synthetic-1", 101, "round 2 eval"),
                      ("rejoined", 2, "synthetic-1", 201, None)]
    rejoined = read_jsonl(out / F.NODES_LOG)[-1]
    assert (rejoined["state_round"], rejoined["state_from"]) == \
        ((1, "disk") if method == "fedbn" else (0, "none"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows if r.get("event") == "client_failed"] == [2]
    trained = {(r["round"], r["client"]) for r in rows if r.get("split") == "train"}
    assert ("synthetic-1", 2) not in {(c, n) for n, c in trained}
    assert {(3, f"synthetic-{i}") for i in range(3)} <= trained  # back in round 3
    ups, glob = _uploads_and_next_broadcast(grid, 2)
    assert sorted(ups) == [0, 2] and glob is not None  # the global model of round 2 ...
    for key, value in glob.items():  # ... is the mean of the two uploads that came back
        np.testing.assert_allclose(value, (ups[0][key].astype(np.float64) + ups[2][key]) / 2,
                                   rtol=1e-6, atol=1e-7, err_msg=key)
    assert np.isfinite(np.concatenate([v.ravel() for v in _final(out).values()])).all()


def test_a_late_reply_is_dropped_and_the_node_goes_back_to_the_state_the_server_knows(tmp_path):
    """A node that trained round 2 but answered too late holds round 2's norm layers; the
    server never used that fit, so the node restores round 1's from disk: the run ends exactly
    as when the node died before training (above)."""
    cfg = _cfg("fedbn", algorithm={"weight": "uniform"})
    late, dead = tmp_path / "late", tmp_path / "dead"
    _serve(cfg, late, grid=DyingGrid([0, 1, 2], late=True), min_clients=2, round_timeout=5.0)
    _serve(cfg, dead, grid=DyingGrid([0, 1, 2]), min_clients=2, round_timeout=5.0)
    assert [r["event"] for r in read_jsonl(late / F.NODES_LOG)] == ["joined"] * 3 + ["dropped"]
    _assert_same_weights(_final(late), _final(dead))
    last = lambda d: [r for r in _test_rows(d) if r["round"] == 3]  # noqa: E731
    assert last(late) == last(dead) and len(last(late)) == 3  # personal: each node's norm layers


def test_a_node_restarted_between_rounds_takes_over_while_its_old_id_is_still_listed(
        inprocess, tmp_path, capsys):
    """The SuperLink lists a killed node until its heartbeat lapses: the restarted node (same
    partition-id and roster entry) takes its site over; no round misses it, so FedAvg ends
    exactly as in-process."""

    class RestartingGrid(LocalGrid):
        def exchange(self, messages):
            replies = super().exchange(messages)
            if {(m.content[rec.JOB]["kind"], m.content[rec.JOB]["round"])
                    for m in messages if rec.JOB in m.content} == {("evaluate", 1)}:
                self.contexts[201] = Context(run_id=1, node_id=201, state=RecordDict(),
                                             run_config={}, node_config={"partition-id": 1})
            return replies

    out = tmp_path / "restart"
    grid = RestartingGrid([0, 1, 2])
    _serve(_cfg("fedavg"), out, grid=grid)
    assert "client 'synthetic-1' rejoined on node 201 (replacing node 101, still listed)" in \
        capsys.readouterr().err
    assert [(r["event"], r["node"]) for r in read_jsonl(out / F.NODES_LOG)][3:] == \
        [("rejoined", 201)]
    _assert_same_weights(_final(out), _final(inprocess("fedavg")))
    assert _test_rows(out) == _test_rows(inprocess("fedavg"))


@pytest.mark.parametrize("min_clients, one_shot, match", [
    (0, False, r"round 2 fit: client 'synthetic-1' \(node 101\): no reply within 5.0 s "
               r"\(round-timeout\); only 2 of 3 clients answered and min-clients = all"),
    (2, True, r"round 1 fit: .*only 2 of 3 clients answered and this method communicates once"),
])
def test_too_few_replies_stop_the_round_with_a_clear_error(min_clients, one_shot, match,
                                                           monkeypatch, tmp_path):
    monkeypatch.setattr(ALGORITHMS.get("fedavg"), "one_shot", one_shot)
    out = tmp_path / "strict"
    with pytest.raises(RunError, match=match):
        _serve(_cfg("fedavg", run={"rounds": 2}), out, grid=DyingGrid([0, 1, 2], rnd=2 - one_shot),
               min_clients=min_clients, round_timeout=5.0)
    assert [r["event"] for r in read_jsonl(out / F.NODES_LOG)][-1] == "dropped"


class _BoomAlgorithm(ALGORITHMS.get("fedavg")):
    name = "flower-test-boom"

    def fit(self, ctx, payload):
        if ctx.cid == 1:
            raise RuntimeError("boom on purpose")
        return super().fit(ctx, payload)


if _BoomAlgorithm.name not in ALGORITHMS:
    ALGORITHMS.add(_BoomAlgorithm.name, _BoomAlgorithm)


def test_client_exception_is_a_run_error_naming_client_and_node(tmp_path):
    with pytest.raises(RunError, match=r"round 1 fit: client 'synthetic-1' \(node 101\) failed: "
                                       r"RuntimeError: boom on purpose"):
        _serve(_cfg("flower-test-boom", run={"rounds": 1}), tmp_path / "boom")


def test_pooled_baseline_and_bad_run_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="pools every client's data.*inprocess"):
        F.check_flower_supported(_cfg().replace(algorithm=NamedConfig("centralized")))
    with pytest.raises(ConfigError, match="needs histofed-config-file.*--run-config"):
        F.RunSpec.from_run_config({"histofed-config": "", "run-dir": "x"})
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        F.RunSpec.from_run_config({"histofed-config-file": str(tmp_path / "nope.toml")})
    with pytest.raises(ConfigError, match="resume = true needs run-dir"):
        F.RunSpec.from_run_config({"histofed-config": "x", "resume": True, "run-dir": ""})
    path = tmp_path / "exp.toml"
    path.write_text(dump_toml(_cfg("fedprox").to_dict()))  # the file wins over the text
    spec = F.RunSpec.from_run_config({"histofed-config-file": str(path), "histofed-config": "[x"})
    assert F.parse_config(spec.config_text).algorithm.name == "fedprox" and spec.run_dir is None


def test_deploy_app_runs_the_same_objects():
    from flwr.common.config import get_fused_config_from_dir, validate_config
    from flwr.serverapp.server_app import LoadServerAppError
    from flwr.supercore.object_ref import load_app

    app_dir = REPO / "src" / "histofed" / "flower_app"
    project = tomllib.loads((app_dir / "pyproject.toml").read_text())
    assert validate_config(project, check_module=True, project_dir=app_dir) == (True, [], [])
    components = project["tool"]["flwr"]["app"]["components"]
    assert load_app(components["serverapp"], LoadServerAppError, app_dir) is F.server_app
    assert load_app(components["clientapp"], LoadServerAppError, app_dir) is F.client_app
    run_config = get_fused_config_from_dir(app_dir, {})
    spec = F.RunSpec.from_run_config(run_config)  # the built-in demo experiment parses
    assert set(spec.to_run_config()) <= set(run_config)  # every key can be overridden
    assert F.parse_config(spec.config_text).federation.name == "synthetic-nuclei"


# ---- Flower's simulation runtime (Ray) --------------------------------------------------------
# One ClientApp actor (num_cpus=1): each actor process imports torch + MONAI, which dominates
# the start-up on a 2-core machine; the clients' messages and states still cross Ray.
@pytest.mark.flower
def test_simulation_fedavg_equals_inprocess(inprocess, tmp_path):
    out = tmp_path / "sim"
    state = F.run_flower_simulation(_cfg("fedavg"), data_root=None, run_dir=out, num_cpus=1)
    ref = inprocess("fedavg")
    _assert_same_weights(state.arrays, _final(ref))
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref) and len(_test_rows(out)) == 3 * 3
    assert read_jsonl(out / "egress.jsonl") == read_jsonl(ref / "egress.jsonl")
    assert sorted(p.name for p in out.iterdir() if p.name != F.NODES_LOG) == \
        sorted(p.name for p in ref.iterdir())  # nodes.jsonl: joins and dropouts of Flower nodes


@pytest.mark.flower
def test_simulation_fedbn_keeps_norm_layers_on_the_nodes_and_resumes(inprocess, tmp_path,
                                                                     monkeypatch):
    """Stopped after round 1 and resumed in a second simulation (new node processes: their
    memory is gone, their state folders under the run directory are not): same as in-process."""
    sent: list[tuple[int, RecordDict]] = []  # (round, content) of every message both ways
    exchange = F.FlowerTransport._exchange

    def spy(self, messages, labels, desc):
        replies = exchange(self, messages, labels, desc)
        rnd = int(desc.split()[1]) if desc.startswith("round") else 0
        sent.extend((rnd, m.content) for m in messages)
        sent.extend((-rnd, m.content) for m in replies.values())  # replies: negative round
        return replies

    monkeypatch.setattr(F.FlowerTransport, "_exchange", spy)
    out = tmp_path / "sim-bn"
    F.run_flower_simulation(_cfg("fedbn"), data_root=None, run_dir=out, num_cpus=1, stop_after=1)
    F.run_flower_simulation(_cfg("fedbn"), data_root=None, run_dir=out, num_cpus=1, resume=True)
    joined = [r for r in read_jsonl(out / F.NODES_LOG) if r["event"] == "joined"]
    assert [(r["round"], r["state_round"], r["state_from"]) for r in joined] == \
        [(0, 0, "none")] * 3 + [(1, 1, "disk")] * 3
    ref = inprocess("fedbn")
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref)  # personal models: each node's own norm layers
    model = build_model(_cfg("fedbn").model, num_classes=1)
    norms = {k for k in norm_keys(model) if not k.endswith("num_batches_tracked")}
    assert len(sent) == 2 * 2 * 3 + 3 * 3 * 2 * 2  # 2 handshakes + rounds x clients x jobs x ways
    for rnd, content in sent:
        assert not any(k.startswith(rec.STATE) for k in content)
        if rec.has_payload(content) and rnd != 1:  # round 1 broadcasts the initial model
            assert not norms & set(rec.records_to_payload(content).arrays)


# ---- the contract on Flower (test_contract.py has the in-process side) -------------------------
def test_server_without_data_equals_inprocess(tiny_config, tmp_path):
    """The ServerApp gets an empty data root; each node has its own. Same weights, same metrics;
    the roster in run.json is what the nodes told the server."""
    from test_contract import MARKER, rooted_config

    root = tmp_path / "site-data"
    root.mkdir()
    (root / MARKER).write_text("x")
    cfg = rooted_config(tiny_config, "fedavg")
    ref = new_run_dir(tmp_path / "ref", "ref")
    run_experiment(cfg, data_root=root, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out, grid=LocalGrid([0, 1, 2], **{"data-root": str(root)}), data_root="")
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref)
    told = json.loads((out / "run.json").read_text())["roster"]
    assert told == json.loads((ref / "run.json").read_text())["roster"]
    with pytest.raises(RunError, match="node 100 failed: .*(reads real data|no sites.txt)"):
        _serve(cfg, tmp_path / "nodata", data_root="")  # nodes without data: named, not hidden


def test_fedsoda_personalised_resumed_writes_the_same_final_files_on_both_engines(tmp_path):
    soda = {"personalised": True, "synthetic_size": 32, "synthetic_batch": 2}
    cfg = _cfg("fedsoda", model={"norm": "group"}, algorithm=soda, run={"rounds": 2})
    ref = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out, stop_after=1)  # the server stops; the resumed run gets fresh nodes
    _serve(cfg, out, resume=True)
    files = lambda d: sorted(str(p.relative_to(d)) for p in (d / "final").rglob("*.npz"))  # noqa: E731
    assert files(out) == files(ref) and "final/personal/synthetic-2.npz" in files(ref)
    for rel in files(ref):
        _assert_same_weights(load_payload(out / rel[:-4]).arrays, load_payload(ref / rel[:-4]).arrays)
    assert read_jsonl(out / "fedsoda.jsonl") == read_jsonl(ref / "fedsoda.jsonl")


def test_toy_two_model_method_on_flower_equals_inprocess(tmp_path):
    from test_contract import SMALL  # registers "test-mutual" (defined with the public contract)

    cfg = _cfg("test-mutual", model=SMALL, run={"rounds": 2})
    ref = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out)
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref)  # the teachers ("personal") stayed on the nodes
    assert {r["model"] for r in _test_rows(out)} == {"global", "personal"}


def test_after_fit_rows_are_the_same_on_flower(tmp_path):
    cfg = _cfg("fedavg", eval={"splits": ["test"], "after_fit": True}, run={"rounds": 2})
    ref = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out)
    tuned = lambda d: [r for r in _test_rows(d) if r["model"] == "finetuned"]  # noqa: E731
    assert tuned(out) == tuned(ref) and len(tuned(ref)) == 3 * 2
