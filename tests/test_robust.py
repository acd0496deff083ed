"""Server-side update validation and robust aggregation (issue 13, item 4): five honest sites
and one that sends x1000-scaled, NaN, inf and sign-flipped updates in turn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from histofed.algorithms import ALGORITHMS, build_algorithm
from histofed.algorithms.base import ClientContext, ClientInfo, Payload, ServerContext
from histofed.algorithms.fedavg import FedAvg
from histofed.algorithms.weights import get_weights
from histofed.config import ConfigError, NamedConfig, ServerConfig, config_from_dict
from histofed.engine import run_experiment
from histofed.engine.loop import RunError, ServerModels
from histofed.engine.rundir import list_checkpoints, load_checkpoint, new_run_dir, read_jsonl
from histofed.engine.validate import check_server_config, check_uploads
from histofed.report import load_run

from conftest import tiny_config_dict

ATTACKER = 5
ATTACKS = ("scale", "nan", "inf", "flip")  # round 1, 2, 3, 4


class _Byzantine(FedAvg):
    """FedAvg whose client 5 trains honestly, then tampers with its upload (one attack a round)."""

    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        up = super().fit(ctx, payload)
        if ctx.cid != ATTACKER:
            return up
        attack, arrays = ATTACKS[(ctx.round - 1) % len(ATTACKS)], {}
        for k, w in up.arrays.items():
            theta = payload.arrays[k]
            w = {"scale": theta + 1000 * (w - theta), "flip": theta - (w - theta)}.get(attack, w)
            arrays[k] = w.astype(theta.dtype)
        first = next(iter(arrays))
        arrays[first] = arrays[first].copy()
        if attack in ("nan", "inf"):
            arrays[first].flat[0] = np.nan if attack == "nan" else np.inf
        return Payload(arrays, up.scalars, kind="weights")


class _HonestOnly(FedAvg):
    """The reference: FedAvg over the five honest sites (client 5 trains, but is left out)."""

    def aggregate(self, sctx: ServerContext, state: Payload, results: dict) -> Payload:
        return super().aggregate(sctx, state, {c: p for c, p in results.items() if c != ATTACKER})


for _name, _cls in (("byzantine-test", _Byzantine), ("honest-only-test", _HonestOnly)):
    if _name not in ALGORITHMS:
        ALGORITHMS.add(_name, type(_cls.__name__, (_cls,), {"name": _name}))


def _config(tiny_config, method, rounds, **server):
    return tiny_config(method, run={"rounds": rounds, "eval_every": 100},
                       federation={"num_clients": 6, "images_per_client": 2}, server=server)


def _run(cfg, tmp_path, name):
    out = new_run_dir(tmp_path / name, name)
    return run_experiment(cfg, data_root=None, run_dir=out), out


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Honest-only FedAvg: (initial global weights, {round: global weights})."""
    cfg = config_from_dict(tiny_config_dict(
        "honest-only-test", run={"rounds": 4, "eval_every": 100, "keep_checkpoints": 0},
        federation={"num_clients": 6, "images_per_client": 2}))
    _, out = _run(cfg, tmp_path_factory.mktemp("reference"), "honest")
    states = {rnd: s.arrays for rnd, s, _ in map(load_checkpoint, list_checkpoints(out))}
    roster = [ClientInfo(**c) for c in json.loads((out / "run.json").read_text())["roster"]]
    start = get_weights(ServerModels(cfg, roster)(None))  # the seeded initial global model
    return start, states


def test_validation_rejects_scaled_nan_inf_and_logs_each(tiny_config, tmp_path, reference, capsys):
    _, honest = reference
    state, out = _run(_config(tiny_config, "byzantine-test", 3), tmp_path, "guarded")
    rows = read_jsonl(out / "rejected.jsonl")
    assert [(r["round"], r["client"]) for r in rows] == [(1, "synthetic-5"), (2, "synthetic-5"),
                                                        (3, "synthetic-5")]
    assert "norm" in rows[0]["reason"] and "norm_limit 10" in rows[0]["reason"]
    assert rows[0]["norm"] > 10 * rows[0]["median"] > 0
    assert rows[1]["reason"].startswith("NaN in") and rows[2]["reason"].startswith("inf in")
    printed = capsys.readouterr()
    assert printed.out.count("rejected the update of client 'synthetic-5'") == 3
    events = [(e["round"], e["event"]) for e in load_run(out).events]  # the report lists them
    assert events == [(1, "update_rejected"), (2, "update_rejected"), (3, "update_rejected")]
    # the guarded mean is exactly the honest-only mean, round after round
    for k, v in honest[3].items():
        np.testing.assert_array_equal(state.arrays[k], v, err_msg=k)


def test_without_norm_limit_the_scaled_update_wrecks_the_mean(tiny_config, tmp_path, reference):
    """The control: the same attack passes when the norm check is off (so the test above can
    fail), and NaN is still refused by the finiteness check."""
    start, honest = reference
    state, out = _run(_config(tiny_config, "byzantine-test", 1, norm_limit=0.0), tmp_path, "open")
    assert read_jsonl(out / "rejected.jsonl") == []  # written every round, empty here
    honest_step = _distance(honest[1], start)
    assert _distance(state.arrays, start) > 50 * honest_step


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "multi-krum"])
def test_robust_aggregators_stay_finite_and_close_to_honest(tiny_config, tmp_path, reference, rule):
    start, honest = reference
    state, out = _run(_config(tiny_config, "byzantine-test", 4, aggregator=rule), tmp_path, rule)
    assert all(np.isfinite(v).all() for v in state.arrays.values())
    # A robust rule also discards honest information (multi-Krum drops f honest updates once
    # the attacker is rejected; a median is not a mean), so it does not reproduce the honest
    # mean exactly; measured here: median 0.29, trimmed mean 0.20, multi-Krum 0.27 of the
    # honest movement. An
    # undefended mean under the x1000 attack lands > 50 movements away (test above).
    step = _distance(honest[4], start)  # how far four honest rounds move the model
    gap = _distance(state.arrays, honest[4])
    print(f"{rule}: {gap:.4g} from the honest-only model, which moved {step:.4g}")
    assert gap < 0.5 * step, f"{rule}: {gap:.4g} from the honest-only model (moved {step:.4g})"
    rows = read_jsonl(out / "rejected.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]  # scaled, NaN, inf; the flip is aggregated


def test_upload_structure_is_checked_for_every_fedavg_family_method():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    state = Payload(get_weights(model), {}, kind="state")
    clients = [ClientInfo(i, f"site-{i}", 10) for i in range(5)]
    sctx = ServerContext(1, 0, clients, lambda cid=None: model)
    honest = Payload({k: v + 0.01 for k, v in state.arrays.items()}, {"num_examples": 10})
    uploads = {0: honest, 1: honest,
               2: Payload({**honest.arrays, "0.weight": np.zeros((2, 3), np.float32)}),
               3: Payload({**honest.arrays, "0.bias": honest.arrays["0.bias"].astype(np.float64)}),
               4: Payload({**honest.arrays, "spy": np.zeros(1, np.float32)}, {"mu": float("nan")})}
    kept, rejected = check_uploads(build_algorithm(NamedConfig("fedavg")), sctx, state,
                                   {c: Payload(state.arrays) for c in uploads}, uploads, 10.0)
    assert sorted(kept) == [0, 1]
    reasons = {r.cid: r.reason for r in rejected}
    assert "'0.weight' has shape (2, 3), expected (3, 2)" in reasons[2]
    assert "'0.bias' has dtype float64, expected float32" in reasons[3]
    assert "NaN/inf in scalars ['mu']" in reasons[4]
    # FedBN: the norm layers stay home, so uploading them is a wrong upload
    fedbn = build_algorithm(NamedConfig("fedbn"))
    shared = {k: v for k, v in honest.arrays.items() if not k.startswith("1.")}
    kept, rejected = check_uploads(fedbn, sctx, state, {0: honest, 1: honest, 2: honest},
                                   {0: Payload(shared), 1: Payload(shared), 2: honest}, 10.0)
    assert sorted(kept) == [0, 1] and "unexpected key '1.weight'" in rejected[0].reason


def test_every_upload_rejected_keeps_the_state_then_stops(tiny_config, tmp_path):
    cfg = tiny_config("fedavg", run={"rounds": 3, "eval_every": 100},
                      server={"max_rejected_rounds": 2})

    class AllNaN(FedAvg):
        def fit(self, ctx, payload):
            up = super().fit(ctx, payload)
            return Payload({k: np.full_like(v, np.nan) for k, v in up.arrays.items()}, up.scalars)

    if "all-nan-test" not in ALGORITHMS:
        ALGORITHMS.add("all-nan-test", type("AllNaNTest", (AllNaN,), {"name": "all-nan-test"}))
    cfg = cfg.replace(algorithm=NamedConfig("all-nan-test"))
    out = new_run_dir(tmp_path / "nan", "nan")
    with pytest.raises(RunError, match="every update was rejected for 2 rounds in a row"):
        run_experiment(cfg, data_root=None, run_dir=out)
    (_, first, _), = [load_checkpoint(c) for c in list_checkpoints(out)]  # round 1 kept the state
    assert all(np.isfinite(v).all() for v in first.arrays.values())
    assert len(read_jsonl(out / "rejected.jsonl")) == 2 * 3


def test_robust_aggregator_refused_where_it_cannot_apply():
    median = ServerConfig(aggregator="median")
    with pytest.raises(ConfigError, match="feddp.*sensitivity"):
        check_server_config(median, build_algorithm(NamedConfig("feddp", {"sigma": 1.0})), 6)
    with pytest.raises(ConfigError, match="'fedsoda' does not aggregate by a mean"):
        check_server_config(median, build_algorithm(NamedConfig("fedsoda")), 6)
    with pytest.raises(ConfigError, match="at least 2 x byzantine \\+ 3 = 5"):
        check_server_config(ServerConfig(aggregator="krum"), build_algorithm(NamedConfig("fedavg")),
                            4)
    for method in ("fedavg", "fedprox", "fedbn"):
        check_server_config(median, build_algorithm(NamedConfig(method)), 3)


def test_server_table_is_validated(tiny_config):
    with pytest.raises(ConfigError, match="aggregator"):
        tiny_config(server={"aggregator": "medain"})
    with pytest.raises(ConfigError, match="unknown key \\[server\\].norm_limt"):
        tiny_config(server={"norm_limt": 5.0})
    with pytest.raises(ConfigError, match="norm_limit must be 0"):
        tiny_config(server={"norm_limit": 0.5})
    assert tiny_config(server={"norm_limit": 0}).server.norm_limit == 0.0
