"""Held-out hospitals ([federation].unseen), model selection on validation ([eval].select) and
FedAvg's aggregation weight ([algorithm].weight)."""

import json

import numpy as np
import pytest

from histofed.algorithms.base import ClientInfo, Payload, ServerContext
from histofed.algorithms.fedavg import FedAvg
from histofed.config import ConfigError
from histofed.data.federation import build_federation
from histofed.engine import run_experiment
from histofed.engine.loop import RunError
from histofed.engine.rundir import load_payload, new_run_dir, read_jsonl
from histofed.report import compare_runs

HOLD_OUT = {"unseen": ["synthetic-1"], "val_fraction": 0.3, "images_per_client": 4}
BEST_VAL = {"splits": ["val", "test"], "select": "best-val"}


def _run(cfg, tmp_path, name):
    out = new_run_dir(tmp_path / name, name)
    return run_experiment(cfg, data_root=None, run_dir=out), out


def test_hold_out_moves_every_tile_of_the_unseen_site_to_its_evaluation_set():
    full = build_federation("synthetic-nuclei", data_root=None, seed=0, num_clients=3,
                            images_per_client=4, val_fraction=0.3)
    held = build_federation("synthetic-nuclei", data_root=None, seed=0, num_clients=3,
                            images_per_client=4, val_fraction=0.3, unseen=["synthetic-0"])
    assert held.client_names == ["synthetic-1", "synthetic-2", "synthetic-0"]  # held out last
    unseen = held.clients[-1]
    assert unseen.info["unseen"] and unseen.val is None and len(unseen.test) == 4
    np.testing.assert_array_equal(unseen.test.images[0], full.clients[0].train.images[0])


@pytest.mark.parametrize("unseen, match", [
    (["synthetic-9"], r"no client 'synthetic-9'.*Valid: synthetic-0, synthetic-1, synthetic-2"),
    (["synthetic-0", "synthetic-1", "synthetic-2"], "names every client.*at least one must train"),
])
def test_bad_unseen_names_are_clear_errors(unseen, match):
    with pytest.raises(ValueError, match=match):
        build_federation("synthetic-nuclei", data_root=None, seed=0, num_clients=3, unseen=unseen)


def test_unseen_site_never_trains_and_scores_every_model(tiny_config, tmp_path):
    _, out = _run(tiny_config("fedbn", federation=HOLD_OUT, run={"rounds": 2}), tmp_path, "bn")
    rows = read_jsonl(out / "metrics.jsonl")
    trained = {r["client"] for r in rows if r.get("split") == "train"}
    assert trained == {"synthetic-0", "synthetic-2"}
    unseen = {(r["round"], r["model"]) for r in rows if r.get("split") == "unseen"}
    assert unseen == {(rnd, m) for rnd in (1, 2)
                      for m in ("global", "personal:synthetic-0", "personal:synthetic-2")}
    assert all(r["client"] == "synthetic-1" for r in rows if r.get("split") == "unseen")
    up = {r["client"] for r in read_jsonl(out / "egress.jsonl") if r["direction"] == "up"}
    assert "synthetic-1" not in up  # a held-out site receives models, sends nothing
    info = json.loads((out / "run.json").read_text())
    assert info["unseen"] == ["synthetic-1"] and info["clients"] == ["synthetic-0", "synthetic-2"]


def test_under_dp_personal_models_stay_home_and_only_the_global_model_is_scored(tiny_config,
                                                                                 tmp_path):
    alg = {"base": "fedbn", "sigma": 0.0, "clip": 1e9}  # FedBN's norm layers: trained without DP
    cfg = tiny_config("feddp", federation=HOLD_OUT, algorithm=alg, run={"rounds": 1})
    _, out = _run(cfg, tmp_path, "dp")
    unseen = {r["model"] for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "unseen"}
    assert unseen == {"global"}


def test_best_val_selects_on_validation_and_final_holds_that_round(tiny_config, tmp_path):
    cfg = tiny_config("fedavg", federation=HOLD_OUT, eval=BEST_VAL,
                      run={"rounds": 3, "keep_checkpoints": 0})
    _, out = _run(cfg, tmp_path, "best")
    rows = read_jsonl(out / "metrics.jsonl")
    val = {}
    for r in rows:
        if r.get("split") == "val":
            val.setdefault(r["round"], []).append(r["dice"])
    best = max(val, key=lambda rnd: (np.mean(val[rnd]), -rnd))  # ties: the earlier round
    info = json.loads((out / "run.json").read_text())
    assert info["selected_round"] == best and info["selected_by"] == "best-val"
    ckpt = load_payload(out / "checkpoints" / f"round-{best:04d}" / "server").arrays
    final = load_payload(out / "final" / "global").arrays
    for k in final:
        np.testing.assert_array_equal(final[k], ckpt[k], err_msg=k)
    table = compare_runs([out], tmp_path / "cmp.md")
    row = next(line for line in table.splitlines() if line.startswith("| fedavg"))
    assert row.split("|")[3].strip() == str(best)  # the reported round is the selected one
    assert "| unseen |" in table


def test_best_val_without_a_validation_split_is_refused(tiny_config, tmp_path):
    with pytest.raises(RunError, match="needs a validation split.*val_fraction"):
        _run(tiny_config(eval=BEST_VAL), tmp_path, "noval")
    with pytest.raises(ConfigError, match='needs "val" in \\[eval\\].splits'):
        tiny_config(eval={"select": "best-val", "splits": ["test"]})


def test_aggregation_weight_by_hand():
    sctx = ServerContext(1, 0, [ClientInfo(0, "a", 8, sizes={"train_pixels": 100}),
                                ClientInfo(1, "b", 2, sizes={"train_pixels": 300})],
                         build_model=lambda cid: None)
    results = {0: Payload({"w": np.array([0.0], np.float32)}, {"num_examples": 8}),
               1: Payload({"w": np.array([4.0], np.float32)}, {"num_examples": 2})}
    state = Payload({"w": np.zeros(1, np.float32)}, {}, "state")
    got = {w: FedAvg(weight=w).aggregate(sctx, state, results).arrays["w"][0]
           for w in ("examples", "pixels", "uniform")}
    assert got == pytest.approx({"examples": 0.8, "pixels": 3.0, "uniform": 2.0})
    with pytest.raises(ConfigError, match="choose one of 'examples', 'pixels', 'uniform'"):
        FedAvg.from_options(weight="crops")


def test_after_fit_scores_each_sites_locally_trained_model(tiny_config, tmp_path):
    cfg = tiny_config("fedavg", eval={"after_fit": True}, run={"rounds": 2, "eval_every": 2})
    _, out = _run(cfg, tmp_path, "ft")
    rows = read_jsonl(out / "metrics.jsonl")
    tuned = [r for r in rows if r.get("model") == "finetuned"]
    assert {(r["round"], r["client"], r["split"]) for r in tuned} == {
        (2, f"synthetic-{i}", "test") for i in range(3)}  # eval rounds only
    glob = {r["client"]: r["dice"] for r in rows if r.get("model") == "global" and r["round"] == 2}
    assert any(r["dice"] != glob[r["client"]] for r in tuned)  # a different model was scored
