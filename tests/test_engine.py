"""The in-process engine: determinism, resume, failures, egress, run directories."""

import json

import numpy as np
import pytest
import torch

from histofed.algorithms import ALGORITHMS, build_algorithm
from histofed.algorithms.base import ClientContext, Payload
from histofed.algorithms.weights import norm_keys
from histofed.config import NamedConfig
from histofed.engine import load_federation, run_experiment
from histofed.engine.loop import RunError
from histofed.engine.rundir import RunDirError, new_run_dir, read_jsonl
from histofed.models import build_model
from histofed.registry import UnknownNameError


def _run(cfg, tmp_path, name, **kw):
    out = tmp_path / name
    state = run_experiment(cfg, data_root=None, run_dir=new_run_dir(out, name), **kw)
    return state, out


def _assert_same(a, b):
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)


def test_results_do_not_depend_on_workers(tiny_config, tmp_path):
    seq, _ = _run(tiny_config(run={"workers": 1, "rounds": 2}), tmp_path, "w1")
    par, _ = _run(tiny_config(run={"workers": 2, "rounds": 2}), tmp_path, "w2")
    _assert_same(seq, par)


def test_resume_after_crash_is_identical(tiny_config, tmp_path):
    cfg = tiny_config("fedbn", run={"rounds": 3})  # fedbn: private client state must survive too
    full, full_dir = _run(cfg, tmp_path, "full")
    out = new_run_dir(tmp_path / "crashed", "crashed")
    run_experiment(cfg, data_root=None, run_dir=out, stop_after=1)
    # a crash mid round 2 leaves extra lines; resume must drop them
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 2, "client": "synthetic-0", "split": "train", "loss": 9}) + "\n")
    resumed = run_experiment(cfg, data_root=None, run_dir=out, resume=True)
    _assert_same(full, resumed)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(full_dir / "metrics.jsonl"))
    personal = sorted(p.name for p in (out / "final" / "personal").iterdir())
    assert personal == sorted(p.name for p in (full_dir / "final" / "personal").iterdir())


def test_fedprox_with_mu_zero_equals_fedavg(tiny_config, tmp_path):
    avg, _ = _run(tiny_config("fedavg", run={"rounds": 2}), tmp_path, "avg")
    prox, _ = _run(tiny_config("fedprox", run={"rounds": 2}, algorithm={"mu": 0.0}), tmp_path, "prox")
    _assert_same(avg, prox)
    prox1, _ = _run(tiny_config("fedprox", run={"rounds": 2}, algorithm={"mu": 1.0}), tmp_path, "prox1")
    assert any(not np.array_equal(avg.arrays[k], prox1.arrays[k]) for k in avg.arrays)


def test_fedbn_keeps_norm_layers_home(tiny_config, tmp_path):
    cfg = tiny_config("fedbn", run={"rounds": 2})
    _, out = _run(cfg, tmp_path, "bn")
    _, avg_out = _run(tiny_config("fedavg", run={"rounds": 2}), tmp_path, "avg")
    up = lambda d: sum(r["bytes"] for r in read_jsonl(d / "egress.jsonl")  # noqa: E731
                       if r["direction"] == "up" and r["kind"] == "weights")
    model = build_model(cfg.model, num_classes=1)
    norm_bytes = sum(v.numel() * 4 for k, v in model.state_dict().items()
                     if k in norm_keys(model) and not k.endswith("num_batches_tracked"))
    assert norm_bytes > 0
    # 3 clients x 2 rounds, each upload lacks exactly the norm layers
    assert up(avg_out) - up(out) == 3 * 2 * norm_bytes
    personal = sorted(p.stem for p in (out / "final" / "personal").glob("*.npz"))
    assert personal == ["synthetic-0", "synthetic-1", "synthetic-2"]


def test_local_only_sends_nothing_after_init(tiny_config, tmp_path):
    _, out = _run(tiny_config("local", run={"rounds": 2}), tmp_path, "local")
    rows = read_jsonl(out / "egress.jsonl")
    assert all(r["round"] == 1 and r["direction"] == "down" for r in rows)
    metrics = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "test"]
    assert {r["model"] for r in metrics} == {"personal"}


def test_centralized_logs_raw_data_egress(tiny_config, tmp_path):
    _, out = _run(tiny_config("centralized", run={"rounds": 1}), tmp_path, "central")
    raw = [r for r in read_jsonl(out / "egress.jsonl") if r["kind"] == "raw-data"]
    assert len(raw) == 3 and all(r["bytes"] > 0 for r in raw)
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "train"]
    assert [r["client"] for r in train] == ["pooled"] and train[0]["steps"] == 3 * 2


class _NaNAlgorithm(ALGORITHMS.get("fedavg")):
    """FedAvg whose client 1 produces a NaN loss (to test failure handling)."""

    name = "nan-test"
    bad_clients: tuple = (1,)

    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        if ctx.cid in self.bad_clients:
            from histofed.algorithms.training import local_train

            from histofed.algorithms.weights import load_weights
            load_weights(ctx.model, payload.arrays)
            with torch.no_grad():
                next(ctx.model.parameters()).fill_(float("nan"))
            local_train(ctx)
        return super().fit(ctx, payload)


if "nan-test" not in ALGORITHMS:
    ALGORITHMS.add("nan-test", _NaNAlgorithm)


def test_nan_client_is_dropped_with_clear_event(tiny_config, tmp_path):
    state, out = _run(tiny_config("nan-test", run={"rounds": 2}), tmp_path, "nan")
    events = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "client_failed"]
    assert [e["client"] for e in events] == ["synthetic-1", "synthetic-1"]
    assert "loss is nan" in events[0]["message"] and "lr" in events[0]["message"]
    assert all(np.isfinite(v).all() for v in state.arrays.values())


def test_all_clients_failing_stops_with_resume_hint(tiny_config, tmp_path):
    _NaNAlgorithm.bad_clients = (0, 1, 2)
    try:
        with pytest.raises(RunError, match="every client failed.*--resume .* --set train.lr=<lower value>"):
            _run(tiny_config("nan-test", run={"rounds": 2}), tmp_path, "allnan")
    finally:
        _NaNAlgorithm.bad_clients = (1,)


def test_run_dir_is_never_overwritten(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("x")
    with pytest.raises(RunDirError, match="never overwrites"):
        new_run_dir(tmp_path / "r", "r")


def test_unknown_names_list_valid_ones(tiny_config):
    with pytest.raises(UnknownNameError, match='Did you mean "fedavg".*Valid: .*fedbn'):
        build_algorithm(NamedConfig("fedavgg"))
    with pytest.raises(UnknownNameError, match="unknown federation"):
        load_federation(tiny_config().replace(federation=NamedConfig("nuclei-multi")), None)


def test_unknown_algorithm_option_suggests():
    from histofed.config import ConfigError

    with pytest.raises(ConfigError, match='Did you mean "mu"'):
        build_algorithm(NamedConfig("fedprox", {"muu": 0.1}))


def test_client_without_data_is_a_clear_error():
    from torch.utils.data import TensorDataset

    from histofed.data.federation import ClientData, Federation

    empty = TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))
    full = TensorDataset(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="client 'b' has no training data"):
        Federation("f", "classification", [ClientData("a", full, full), ClientData("b", empty, full)], 2)


def test_tensorboard_mirror(tiny_config, tmp_path):
    pytest.importorskip("tensorboard", reason="optional extra histofed[tensorboard] not installed")
    _, out = _run(tiny_config(run={"rounds": 1, "tensorboard": True}), tmp_path, "tb")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_demo_pipeline_on_synthetic_data(tmp_path, monkeypatch):
    from histofed.demo import run_demo

    monkeypatch.delenv("HISTOFED_DATA", raising=False)
    out = run_demo(data_root=None, out=tmp_path / "demo", rounds=1, workers=2, local_steps=2)
    table = (out / "compare.md").read_text()
    for method in ("fedavg", "local", "fedprox", "fedbn", "centralized"):
        assert method in table and (out / method / "report.html").exists()
    assert "| unseen | best local on unseen |" in table  # synthetic-3 is held out
    local = next(line for line in table.splitlines() if line.startswith("| local "))
    assert local.split("|")[7].strip() not in ("—", "nan")  # its best model on the unseen site
