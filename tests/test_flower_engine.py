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
from flwr.common.constant import ErrorCode
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
        self.pending: dict[str, Message] = {}  # pushed, not yet pulled (by message id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for sent in messages:
            ids.append(f"m{len(self.pending) + len(self.log)}-{id(sent)}")
            self.pending[ids[-1]] = sent
        return ids

    def pull_messages(self, message_ids):
        return [self._deliver(self.pending.pop(mid), mid) for mid in list(message_ids)
                if mid in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

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
    """Run the real server_app over a LocalGrid (3 nodes with partition-ids 0..2)."""
    grid = grid or LocalGrid([0, 1, 2])
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
              "empty": np.zeros((0, 3)), "mask": np.array([True, False])}
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


def test_fedbn_state_never_travels_and_blocks_resume(inprocess, tmp_path):
    cfg = _cfg("fedbn")
    out = tmp_path / "fedbn"
    grid = _serve(cfg, out)
    _assert_same_weights(_final(out), _final(inprocess("fedbn")))
    assert _test_rows(out) == _test_rows(inprocess("fedbn"))  # "personal" models use node state
    norms = {k for k in norm_keys(build_model(cfg.model, num_classes=1))
             if not k.endswith("num_batches_tracked")}
    assert norms
    jobs = [(d, t, c) for d, t, c in grid.log if t != "query"]
    assert len(jobs) == 3 * 3 * 2 * 2  # rounds x clients x (fit, evaluate) x (down, up)
    for direction, _, content in jobs:
        assert not any(k.startswith(rec.STATE) for k in content)
        arrays = rec.records_to_payload(content).arrays if rec.has_payload(content) else {}
        first_broadcast = direction == "down" and content[rec.JOB]["round"] == 1
        assert first_broadcast or not (norms & set(arrays)), "norm layers left a node"
    for ctx in grid.contexts.values():  # ... and they are kept on each node
        assert set(rec.load_state(ctx.state).arrays) == norms
    assert json.loads((out / F.MARKER).read_text())["clients_with_private_state"] == \
        ["synthetic-0", "synthetic-1", "synthetic-2"]
    with pytest.raises(RunError, match="cannot resume on Flower: algorithm 'fedbn' keeps private"):
        _serve(cfg, out, resume=True)


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
    ([0, 1], "only 2 of 3 Flower nodes connected"),
    ([0, None, 2], "node 101 failed: ValueError: .*partition-id=None.*--node-config"),
])
def test_handshake_errors_name_the_node_and_the_fix(pids, match):
    with pytest.raises(RunError, match=match):
        F.FlowerTransport(LocalGrid(pids), config_text=dump_toml(_cfg().to_dict()), node_wait=0.0)


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

    app_dir = REPO / "deploy" / "flower-app"
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
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


@pytest.mark.flower
def test_simulation_fedbn_keeps_norm_layers_on_the_nodes(inprocess, tmp_path, monkeypatch):
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
    F.run_flower_simulation(_cfg("fedbn"), data_root=None, run_dir=out, num_cpus=1)
    ref = inprocess("fedbn")
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref)  # personal models: each node's own norm layers
    model = build_model(_cfg("fedbn").model, num_classes=1)
    norms = {k for k in norm_keys(model) if not k.endswith("num_batches_tracked")}
    assert len(sent) == 2 * 3 + 3 * 3 * 2 * 2  # handshake + rounds x clients x jobs x ways
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


def test_fedsoda_personalised_writes_the_same_final_files_on_both_engines(tmp_path):
    soda = {"personalised": True, "synthetic_size": 32, "synthetic_batch": 2}
    cfg = _cfg("fedsoda", model={"norm": "group"}, algorithm=soda, run={"rounds": 2})
    ref = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out)
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
