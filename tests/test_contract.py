"""The algorithm contract: a server that never holds data, per-client architectures, one
trainer, a DP wrapper that wraps any method, options checked from annotations, and a new
two-model method written against the public contract only (docs/architecture.md walks through
it). Flower twins of these tests are in test_flower_engine.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histofed.algorithms import (
    ALGORITHMS,
    Algorithm,
    ClientContext,
    ClientInfo,
    Payload,
    ServerContext,
    build_algorithm,
    register_algorithm,
)
from histofed.algorithms.aggregate import weighted_mean
from histofed.algorithms.base import evaluate_model, prefixed, unprefixed
from histofed.algorithms.training import make_optimizer, optimise, where
from histofed.algorithms.weights import get_weights, load_weights
from histofed.config import ConfigError, NamedConfig
from histofed.data.federation import FEDERATIONS, build_federation, register_federation
from histofed.engine import load_federation, run_experiment
from histofed.engine.inprocess import InProcessTransport
from histofed.engine.loop import Experiment
from histofed.engine.rundir import load_payload, new_run_dir, read_jsonl
from histofed.models import client_model_spec

MARKER = "sites.txt"


# ---- a federation that only exists where its data root is (the client side) -------------------
if "rooted-synthetic" not in FEDERATIONS:
    @register_federation("rooted-synthetic", task="segmentation",
                         description="synthetic tiles that need <data_root>/sites.txt (tests)")
    def _rooted(*, data_root: Path | None, seed: int, **options):
        if data_root is None or not (Path(data_root) / MARKER).is_file():
            raise FileNotFoundError(f"rooted-synthetic: no {MARKER} under data root {data_root}")
        return build_federation("synthetic-nuclei", data_root=None, seed=seed, **options)


def rooted_config(tiny_config, method="fedavg", **tables):
    cfg = tiny_config(method, **tables)
    return cfg.replace(federation=NamedConfig("rooted-synthetic", cfg.federation.options))


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "hospital-data"
    root.mkdir()
    (root / MARKER).write_text("3 synthetic sites\n")
    return root


def _final(run_dir: Path) -> dict:
    return load_payload(run_dir / "final" / "global").arrays


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_server_side_runs_on_the_roster_alone(tiny_config, data_root, tmp_path, monkeypatch):
    """The Experiment gets only what the sites tell it; once the client side holds the data,
    building any federation again (e.g. on the server) would fail, and the run is identical."""
    cfg = rooted_config(tiny_config, "fedbn", run={"rounds": 2})
    ref = new_run_dir(tmp_path / "ref", "ref")
    run_experiment(cfg, data_root=data_root, run_dir=ref)

    transport = InProcessTransport(cfg, load_federation(cfg, data_root), workers=1)
    import histofed.data.federation as fed_module
    import histofed.engine as engine_module

    def no_data(*args, **kwargs):
        raise AssertionError("the server side tried to build a federation")

    for module in (fed_module, engine_module):
        monkeypatch.setattr(module, "build_federation", no_data)
    out = new_run_dir(tmp_path / "roster-only", "roster-only")
    try:
        experiment = Experiment(cfg, transport.roster, out)
        assert not any(isinstance(v, torch.utils.data.Dataset) for v in vars(experiment).values())
        experiment.run(transport)
    finally:
        transport.close()
    _same(_final(out), _final(ref))
    roster = transport.roster
    assert [c.name for c in roster] == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert roster[0].model["name"] == "unet" and roster[0].sizes["train"] == roster[0].num_train
    assert roster[0].facts["raw_bytes"] > 0 and roster[0].task == "segmentation"


def test_run_leaves_global_rng_and_threads_alone(tiny_config, tmp_path):
    torch.manual_seed(1234)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    run_experiment(tiny_config(run={"rounds": 1}), data_root=None,
                   run_dir=new_run_dir(tmp_path / "r", "r"))
    assert torch.equal(torch.get_rng_state(), rng)  # seeded init and jobs: forked RNG only
    assert torch.get_num_threads() == threads  # one thread only while the engine runs


# ---- per-client architectures -------------------------------------------------------------------
SMALL = {"channels": [4, 8], "num_res_units": 0}
DEEP = {"channels": [4, 8, 16], "num_res_units": 0}


def test_per_client_model_tables_and_seeded_heterogeneous_draw():
    cfg = NamedConfig("unet", {**SMALL, "clients": {"b": {"channels": [4, 8, 16]}}})
    spec = lambda name, cid: client_model_spec(cfg, client=name, cid=cid, seed=0)  # noqa: E731
    assert spec("a", 0) == {"name": "unet", **SMALL}
    assert spec("b", 1) == {"name": "unet", **DEEP}  # merged over [model]: same name
    pool = NamedConfig("abmil", {"heterogeneous": [{"hidden": 8}, {"hidden": 16}, {"hidden": 32}]})
    draws = [client_model_spec(pool, client=f"c{i}", cid=i, seed=3, defaults={"in_dim": 5})
             for i in range(12)]
    assert draws == [client_model_spec(pool, client=f"c{i}", cid=i, seed=3,
                                       defaults={"in_dim": 5}) for i in range(12)]  # seeded
    assert {d["hidden"] for d in draws} == {8, 16, 32} and all(d["in_dim"] == 5 for d in draws)
    with pytest.raises(ConfigError, match="heterogeneous must be a list of model tables"):
        client_model_spec(NamedConfig("abmil", {"heterogeneous": ["abmil"]}), client="a", cid=0,
                          seed=0)


def test_local_trains_different_architectures_and_averaging_refuses_them(tiny_config, tmp_path):
    model = {**SMALL, "clients": {"synthetic-1": {"channels": [4, 8, 16]}}}
    _, out = None, new_run_dir(tmp_path / "local", "local")
    run_experiment(tiny_config("local", model=model, run={"rounds": 2}), data_root=None,
                   run_dir=out)
    deep = load_payload(out / "final" / "personal" / "synthetic-1").arrays
    flat = load_payload(out / "final" / "personal" / "synthetic-0").arrays
    assert len(deep) > len(flat)  # a third level: more tensors
    assert not (out / "final" / "global.npz").exists()
    tests = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "test"]
    assert {r["client"] for r in tests} == {"synthetic-0", "synthetic-1", "synthetic-2"}
    with pytest.raises(ConfigError, match=r"fedavg averages weights.*synthetic-0, synthetic-2: .*"
                                          r"synthetic-1: .*\[4, 8, 16\]"):
        run_experiment(tiny_config("fedavg", model=model), data_root=None,
                       run_dir=new_run_dir(tmp_path / "avg", "avg"))


def test_misspelled_site_in_model_clients_is_an_error(tiny_config, tmp_path):
    model = {**SMALL, "clients": {"synthetic-l": {"channels": [4, 8, 16]}}}  # l for 1
    with pytest.raises(ConfigError, match=r"names 'synthetic-l', which is no site.*synthetic-1"):
        run_experiment(tiny_config("local", model=model), data_root=None,
                       run_dir=new_run_dir(tmp_path / "typo", "typo"))


def test_a_spelled_out_default_is_the_same_architecture(tiny_config, tmp_path):
    from histofed.models import canonical_spec

    assert canonical_spec({"name": "unet", **SMALL}) == canonical_spec(
        {"name": "unet", **SMALL, "norm": "group"})  # group is unet's default
    assert canonical_spec({"name": "unet", **SMALL}) != canonical_spec(
        {"name": "unet", **SMALL, "norm": "instance"})
    model = {**SMALL, "clients": {"synthetic-1": {"norm": "group"}}}
    out = new_run_dir(tmp_path / "avg", "avg")
    run_experiment(tiny_config("fedavg", model=model, run={"rounds": 1}), data_root=None,
                   run_dir=out)  # averaging accepts it
    assert (out / "final" / "global.npz").exists()


# ---- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, match", [
    ("fedprox", {"mu": "abc"}, r"\[algorithm\] 'fedprox': option mu = 'abc' should be a number "
                               r"\(default 0.01\)"),
    ("fedprox", {"mu": -0.1}, "option mu = -0.1 must be >= 0"),
    ("fedprox", {"mu": True}, "option mu = True should be a number"),
    ("fedsoda", {"so": "maybe"}, "option so = 'maybe' should be true or false"),
    ("fedsoda", {"stages": 1.5}, "option stages = 1.5 should be an int"),
    ("feddp", {"sigma": 1.0, "level": "user"}, "option level = 'user' should be one of 'client'"),
])
def test_options_are_checked_from_annotations(name, options, match):
    with pytest.raises(ConfigError, match=match):
        build_algorithm(NamedConfig(name, options))


def test_option_strings_from_the_command_line_are_coerced():
    assert build_algorithm(NamedConfig("fedprox", {"mu": "0.5"})).mu == 0.5
    assert build_algorithm(NamedConfig("fedsoda", {"so": "false", "stages": "3"})).stages == 3


def test_model_options_are_checked(tiny_config, tmp_path):
    from histofed.models import build_model

    with pytest.raises(ConfigError, match=r"\[model\] 'unet': option channels = 'abc' should be "
                                          r"a list of int \(default"):
        build_model(NamedConfig("unet", {"channels": "abc"}), num_classes=1)
    with pytest.raises(ConfigError, match=r"channels = \[8, -16\]: a list of positive integers"):
        build_model(NamedConfig("unet", {"channels": [8, -16]}), num_classes=1)
    out = tmp_path / "bad-model"  # fails before anything is written into the run directory
    with pytest.raises(ConfigError, match="channels"):
        run_experiment(tiny_config(model={"channels": [8, -16]}), data_root=None,
                       run_dir=new_run_dir(out, "bad"))
    assert not any(out.iterdir())


# ---- the generic DP wrapper ---------------------------------------------------------------------
def test_dp_wraps_fedsoda_without_knowing_it(tiny_config, tmp_path):
    """Local noise: each site's clipped, noised update is turned back into an upload and
    FedSODA fuses those as usual; its intensity statistics are listed as released."""
    soda = {"synthetic_size": 32, "synthetic_batch": 2, "lsc": False}
    sgd = {"optimizer": "sgd", "lr": 0.05}  # Adam would blow float rounding up (see test_feddp)
    cfg = tiny_config("feddp", model={"norm": "group"}, run={"rounds": 2}, train=sgd,
                      algorithm={"base": "fedsoda", "base_options": soda, "noise": "local",
                                 "sigma": 0.5, "clip": 0.5})
    out = new_run_dir(tmp_path / "dp-soda", "dp-soda")
    state = run_experiment(cfg, data_root=None, run_dir=out)
    assert all(np.isfinite(v).all() for v in state.arrays.values())
    privacy = read_jsonl(out / "privacy.jsonl")
    assert [r["round"] for r in privacy] == [1, 2] and privacy[-1]["base"] == "fedsoda"
    assert {"mu", "sigma", "num_examples"} <= set(privacy[-1]["released"])
    assert np.isfinite(privacy[-1]["epsilon"])
    assert len(read_jsonl(out / "fedsoda.jsonl")) == 2  # the base's own logs still arrive
    up = {r["kind"] for r in read_jsonl(out / "egress.jsonl") if r["direction"] == "up"}
    assert up == {"noised-update", "scalars"}
    # the same run without noise and with a huge clip fuses the very same weights as FedSODA
    plain = tiny_config("fedsoda", model={"norm": "group"}, run={"rounds": 2}, train=sgd,
                        algorithm=soda)
    ref = run_experiment(plain, data_root=None, run_dir=new_run_dir(tmp_path / "soda", "soda"))
    nonoise = dataclasses.replace(cfg, algorithm=NamedConfig("feddp", {
        **cfg.algorithm.options, "sigma": 0.0, "clip": 1e9}))
    got = run_experiment(nonoise, data_root=None, run_dir=new_run_dir(tmp_path / "nn", "nn"))
    for k in ref.arrays:
        if "/" not in k:
            np.testing.assert_allclose(got.arrays[k], ref.arrays[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_record_level_dp_swaps_the_trainer_of_any_method(tiny_config, tmp_path):
    cfg = tiny_config("feddp", model={"norm": "group", "channels": [8, 16]}, run={"rounds": 1},
                      algorithm={"base": "fedsoda", "level": "record", "sigma": 1.0,
                                 "base_options": {"lsc": False, "synthetic_size": 32}})
    out = new_run_dir(tmp_path / "rec", "rec")
    run_experiment(cfg, data_root=None, run_dir=out)
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "train"]
    assert all(r["epsilon"] > 0 and "record_rate" in r for r in train)  # DP-SGD's own log
    with pytest.raises(ConfigError, match=r"L_sc.*not a sum over records"):
        build_algorithm(NamedConfig("feddp", {"base": "fedsoda", "level": "record",
                                              "sigma": 1.0}))


# ---- a new method, written against the public contract only -------------------------------------
@dataclass
class MutualDistillation(Algorithm):
    """A toy two-model method (FedKD-like): each site keeps a private, wider *teacher* and
    shares a small *student*; both learn from the labels and from each other, in one loop:

        L_S = task(S) + beta * MSE(sigmoid(S), sigmoid(T).detach())
        L_T = task(T) + beta * MSE(sigmoid(T), sigmoid(S).detach())

    The server averages students (FedAvg). The teacher never leaves the site.
    """

    beta: float = 0.5
    teacher: dict = field(default_factory=lambda: {"name": "unet", "channels": [8, 16],
                                                   "num_res_units": 0})

    def init_state(self, sctx: ServerContext, init_weights):
        return Payload(dict(init_weights), {}, kind="state")

    def fit(self, ctx: ClientContext, payload: Payload) -> Payload:
        load_weights(ctx.model, payload.arrays)
        teacher = ctx.build_model(self.teacher)  # a second architecture, built on site
        load_weights(teacher, unprefixed("teacher", ctx.state.arrays))
        student = ctx.model
        optimizers = [make_optimizer(student, ctx.train), make_optimizer(teacher, ctx.train)]

        def step(batch):
            x, y = batch
            s, t = ctx.task.forward(student, x), ctx.task.forward(teacher, x)
            mse = lambda a, b: F.mse_loss(torch.sigmoid(a), torch.sigmoid(b).detach())  # noqa: E731
            return {"student": ctx.task.loss(s, y) + self.beta * mse(s, t),
                    "teacher": ctx.task.loss(t, y) + self.beta * mse(t, s)}

        ctx.logs.update(optimise(ctx.train.local_steps, step, optimizers, seed=ctx.seed,
                                 batches=ctx.task.batches(ctx.data.train, ctx.seed),
                                 where=where(ctx), modules=[student, teacher]))
        ctx.state.arrays = prefixed("teacher", get_weights(teacher))
        return Payload(get_weights(student), {"num_examples": ctx.data.num_train}, "weights")

    def aggregate(self, sctx: ServerContext, state: Payload, results: dict[int, Payload]):
        cids = sorted(results)
        mean = weighted_mean([results[c].arrays for c in cids],
                             [results[c].scalars["num_examples"] for c in cids])
        sctx.log("mutual", {"round": sctx.round, "students": len(cids)})
        return Payload({**state.arrays, **mean}, state.scalars, kind="state")

    def evaluate(self, ctx: ClientContext, payload: Payload):
        load_weights(ctx.model, payload.arrays)
        out = evaluate_model(ctx, ctx.model, "global")
        if ctx.state.arrays:
            teacher = ctx.build_model(self.teacher)
            load_weights(teacher, unprefixed("teacher", ctx.state.arrays))
            out.update(evaluate_model(ctx, teacher, "personal"))
        return out

    def personal_weights(self, client: ClientInfo, state: Payload, client_state: Payload):
        return unprefixed("teacher", client_state.arrays)


if "test-mutual" not in ALGORITHMS:
    register_algorithm("test-mutual")(MutualDistillation)


def test_toy_two_model_method_runs_with_no_engine_edits(tiny_config, tmp_path):
    cfg = tiny_config("test-mutual", model=SMALL, run={"rounds": 2, "workers": 2})
    out = new_run_dir(tmp_path / "mutual", "mutual")
    run_experiment(cfg, data_root=None, run_dir=out)
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "train"]
    assert all({"student", "teacher", "loss"} <= set(r) for r in train)
    assert all(r["loss"] == pytest.approx(r["student"] + r["teacher"]) for r in train)
    models = {r["model"] for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "test"}
    assert models == {"global", "personal"}
    teacher = load_payload(out / "final" / "personal" / "synthetic-0").arrays
    student = _final(out)
    assert max(v.size for v in teacher.values()) > max(v.size for v in student.values())
    assert [r["round"] for r in read_jsonl(out / "mutual.jsonl")] == [1, 2]
    up = {r["kind"] for r in read_jsonl(out / "egress.jsonl") if r["direction"] == "up"}
    assert up == {"weights", "scalars"}  # the teacher never left


def test_site_names_with_dots_keep_their_own_checkpoint_files(tmp_path):
    from histofed.engine.rundir import load_checkpoint, save_checkpoint

    a = Payload({"w": np.ones(2, np.float32)}, {"n": 1}, "state")
    b = Payload({"w": np.zeros(2, np.float32)}, {"n": 2}, "state")
    ckpt = save_checkpoint(tmp_path, 1, Payload(kind="state"), {"st.a": a, "st.b": b}, 0)
    _, _, clients = load_checkpoint(ckpt)
    assert sorted(clients) == ["st.a", "st.b"] and clients["st.b"].scalars == {"n": 2}


def test_feddp_local_noise_around_a_sampling_base_rebuilds_the_same_payloads():
    """The server rebuilds what each site was sent with the same (seeded) sample."""
    from histofed.algorithms.feddp import FedDP

    class Half(ALGORITHMS.get("fedavg")):  # a base that samples from the list it is given
        mean_aggregation = False

        def configure_fit(self, sctx, state):
            picked = sctx.clients[: max(1, len(sctx.clients) // 2)]
            return {c.cid: Payload(state.arrays, {"to": c.cid}, "weights") for c in picked}

    if "test-half" not in ALGORITHMS:
        register_algorithm("test-half")(dataclass(Half))
    alg = FedDP(base="test-half", noise="local", sigma=0.0, clip=1e9, q=0.5, delta=1e-3)
    sctx = ServerContext(3, 0, [ClientInfo(i, f"c{i}", 4) for i in range(6)],
                         build_model=lambda cid: torch.nn.Linear(2, 1))
    state = Payload({"weight": np.zeros((1, 2), np.float32), "bias": np.zeros(1, np.float32)},
                    {"dp_participations": [0] * 6, "dp_client_epsilon": [0.0] * 6}, "state")
    sent = alg.configure_fit(sctx, state)
    results = {c: Payload({"weight": np.ones((1, 2), np.float32), "bias": np.ones(1, np.float32)},
                          {"num_examples": 4}, "noised-update") for c in sent}
    new = alg.aggregate(sctx, state, results)  # raised KeyError before the fix
    np.testing.assert_allclose(new.arrays["weight"], [[1.0, 1.0]])
