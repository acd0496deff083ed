"""FedMIC: SVD truncation on hand-made matrices, byte accounting, the dual-distillation losses
against float64 hand computations, FedAvg equivalence of the student-only limit, partial
participation, the DP wrapper around it, held-out scoring and bad input."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histofed.algorithms import build_algorithm
from histofed.algorithms.base import Payload, ServerContext, prefixed, without_namespaces
from histofed.algorithms.fedmic import FedMIC, dual_kd_losses, kl_divergence
from histofed.algorithms.lowrank import (
    compress,
    compressed_nbytes,
    decompose,
    decompress,
    energy_threshold,
    truncation_rank,
)
from histofed.config import ConfigError, NamedConfig, config_from_dict
from histofed.engine import run_experiment
from histofed.engine.rundir import new_run_dir, read_jsonl

STUDENT = {"name": "cnn", "width": 8, "depth": 2}
TEACHER = {"name": "cnn", "width": 16, "depth": 2}


def tiny(method: str = "fedmic", **tables) -> object:
    """A seconds-fast classification run on synthetic patches (3 sites, 32 patches each)."""
    base = {
        "run": {"name": f"tiny-{method}", "seed": 0, "rounds": 2, "workers": 1},
        "federation": {"name": "synthetic-patches", "num_clients": 3, "patches_per_client": 32,
                       "test_per_client": 16, "min_size": 8},
        "model": dict(STUDENT),
        "algorithm": {"name": method},
        "train": {"local_steps": 3, "batch_size": 8, "lr": 0.05, "optimizer": "sgd"},
        "eval": {"splits": ["test"]},
    }
    if method == "fedmic":
        base["algorithm"].update(teacher=dict(TEACHER), rep_dim=8)
    for table, values in tables.items():
        base.setdefault(table, {}).update(values)
    return config_from_dict(base, source="tiny")


# ---- low-rank maths on hand-made matrices -------------------------------------------------------
def test_truncation_rank_keeps_the_stated_energy():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 9/14 = .6429, 13/14 = .9286
    assert [truncation_rank(s, t) for t in (0.5, 0.642, 0.643, 0.928, 0.929, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert truncation_rank(np.zeros(3), 0.9) == 1  # an all-zero update: one zero triple


def test_svd_of_a_hand_made_matrix():
    # A = [[3, 0], [4, 5]]: A^T A = [[25, 20], [20, 25]], singular values sqrt(45), sqrt(5);
    # v1 = (1, 1)/sqrt2, u1 = A v1 / s1 = (1, 3)/sqrt10, so s1 u1 v1^T = 1.5 [[1, 1], [3, 3]]
    a = np.array([[3.0, 0.0], [4.0, 5.0]], np.float32)
    f = decompose(a, 0.85)  # 45 / 50 = 0.9 >= 0.85 -> rank 1
    assert f.rank == 1
    np.testing.assert_allclose(f.s, [np.sqrt(45)], rtol=1e-6)
    np.testing.assert_allclose(f.tensor(), [[1.5, 1.5], [4.5, 4.5]], atol=1e-5)
    err = np.sum((f.tensor().astype(np.float64) - a) ** 2)
    assert err == pytest.approx(5.0, rel=1e-5)  # = the dropped s_2^2 (Eckart-Young)
    assert decompose(a, 0.95).rank == 2
    np.testing.assert_allclose(decompose(a, 0.95).tensor(), a, atol=1e-5)


def test_diagonal_truncation_and_kept_energy_on_random_matrices():
    f = decompose(np.diag([3.0, 2.0, 1.0]).astype(np.float32), 0.9)
    np.testing.assert_allclose(f.tensor(), np.diag([3.0, 2.0, 0.0]), atol=1e-6)
    m = np.random.default_rng(0).normal(size=(12, 20))
    total = np.sum(m**2)
    for t in (0.3, 0.8, 0.95, 0.999):
        f = decompose(m, t)
        kept = np.sum(f.s.astype(np.float64) ** 2) / total
        assert kept >= t - 1e-6  # keeps at least T of the energy ...
        assert np.sum(f.s[:-1].astype(np.float64) ** 2) / total < t  # ... with the smallest k
        # the reconstruction error is exactly the energy it dropped
        err = np.sum((f.tensor(np.float64) - m) ** 2) / total
        assert err == pytest.approx(1 - kept, abs=1e-5)


def test_conv_kernels_are_factorised_as_out_by_in_k_k_and_folded_back():
    a, b = np.array([1.0, 2.0, 3.0]), np.arange(1.0, 9.0)
    kernel = np.outer(a, b).reshape(3, 2, 2, 2).astype(np.float32)  # rank 1 as 3 x 8
    head = np.ones((4, 128), np.float32) * np.arange(4)[:, None]  # rank 1, 4 x 128
    full = np.random.default_rng(1).normal(size=(4, 2, 3, 3)).astype(np.float32)  # rank 4, 4 x 18
    bias = np.arange(3, dtype=np.float32)
    update = {"conv": kernel, "head": head, "full": full, "bias": bias}
    arrays, shapes, ranks = compress(update, 0.999)
    assert ranks == {"conv": 1, "head": 1, "full": 0, "bias": 0}  # rank 4: 4*23 > 72, dense
    assert compress({"full": full}, 0.95)[2] == {"full": 3}  # 3 * 23 = 69 < 72: factorised
    assert arrays["u/conv"].shape == (3, 1) and arrays["v/conv"].shape == (8, 1)
    assert set(arrays) == {"u/conv", "s/conv", "v/conv", "u/head", "s/head", "v/head",
                           "d/full", "d/bias"}
    back = decompress(arrays, shapes)
    for k, v in update.items():
        assert back[k].shape == v.shape and back[k].dtype == np.float32
        np.testing.assert_allclose(back[k], v, atol=1e-4, err_msg=k)
    # bytes: 4 * [1 * (3 + 8 + 1) + 1 * (4 + 128 + 1) + 72 + 3] = 4 * 220
    expected = 4 * (12 + 133 + 72 + 3)
    assert Payload(arrays, kind="svd-factors").nbytes() == {"svd-factors": expected}
    assert compressed_nbytes(shapes, ranks) == expected


def test_energy_schedule():
    assert [energy_threshold(t, 3, 0.95, 0.98) for t in range(3)] == \
        pytest.approx([0.96, 0.97, 0.98])
    assert energy_threshold(0, 0, 0.95, 0.98) == 0.98  # unknown number of rounds: T_max


# ---- the losses against float64 by hand --------------------------------------------------------
def _np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_dual_kd_losses_equal_a_float64_hand_computation():
    rng = np.random.default_rng(3)
    B, C, d_t, d_s, r, tau = 5, 4, 6, 3, 2, 2.0
    z_t, z_s = rng.normal(size=(B, C)), rng.normal(size=(B, C))
    h_t, h_s = rng.normal(size=(B, d_t)), rng.normal(size=(B, d_s))
    a_t, a_s = rng.normal(size=(r, d_t)), rng.normal(size=(r, d_s))
    y = np.array([0, 1, 2, 3, 1])
    # by hand
    ce = lambda z: -np.mean(np.log(_np_softmax(z))[np.arange(B), y])  # noqa: E731
    p_t, p_s = _np_softmax(z_t / tau), _np_softmax(z_s / tau)
    kl = lambda p, q: np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))  # noqa: E731
    rep = np.mean((h_t @ a_t.T - h_s @ a_s.T) ** 2)
    d = ce(z_t) + ce(z_s)
    l_t = ce(z_t) + (tau**2 * kl(p_s, p_t) + rep) / d
    l_s = ce(z_s) + (tau**2 * kl(p_t, p_s) + rep) / d
    t = lambda x: torch.tensor(x, dtype=torch.float64, requires_grad=True)  # noqa: E731
    zt, zs, ht, hs, at, as_ = t(z_t), t(z_s), t(h_t), t(h_s), t(a_t), t(a_s)
    out = dual_kd_losses(zt, zs, ht, hs, torch.tensor(y), proj_t=at, proj_s=as_, tau=tau)
    assert out["teacher"].item() == pytest.approx(l_t, rel=1e-12)
    assert out["student"].item() == pytest.approx(l_s, rel=1e-12)
    assert out["rep"].item() == pytest.approx(rep, rel=1e-12)
    assert kl_divergence(zs, zt, tau).item() == pytest.approx(tau**2 * kl(p_s, p_t), rel=1e-12)
    # each loss moves only its own side
    out["teacher"].backward()
    assert zs.grad is None and hs.grad is None and as_.grad is None
    assert zt.grad is not None and at.grad is not None and ht.grad is not None
    zt.grad = None
    out["student"].backward()
    assert zt.grad is None and zs.grad is not None and as_.grad is not None


# ---- end to end --------------------------------------------------------------------------------
def test_student_only_with_no_truncation_equals_fedavg(tmp_path):
    """teacher = {} (no KD) and T(t) = 1: the student is trained exactly as FedAvg trains it, and
    theta + sum n_k (theta_k - theta) / sum n_k = FedAvg's mean, up to float rounding."""
    fast = {"rounds": 3, "eval_every": 3}
    mic = tiny(algorithm={"teacher": {}, "t_min": 1.0, "t_max": 1.0}, run=fast)
    avg = tiny("fedavg", run=fast)
    got = run_experiment(mic, data_root=None, run_dir=new_run_dir(tmp_path / "mic", "mic"))
    ref = run_experiment(avg, data_root=None, run_dir=new_run_dir(tmp_path / "avg", "avg"))
    student = without_namespaces(got.arrays)
    assert set(student) == set(ref.arrays)
    for k in ref.arrays:
        np.testing.assert_allclose(student[k], ref.arrays[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_fedmic_run_partial_participation_bytes_and_models(tmp_path):
    # a wider teacher than the student: the held-out site builds it from personal_spec to score it
    wide = {**STUDENT, "width": 2 * STUDENT.get("width", 8)}
    cfg = tiny(algorithm={"fraction": 0.5, "teacher": wide}, run={"rounds": 3},
               federation={"num_clients": 4, "unseen": ["client-3"]})
    out = new_run_dir(tmp_path / "mic", "mic")
    run_experiment(cfg, data_root=None, run_dir=out)
    egress = read_jsonl(out / "egress.jsonl")
    fit_up = [r for r in egress if r["phase"] == "fit" and r["direction"] == "up"
              and r["kind"] == "svd-factors"]
    per_round = {}
    for r in fit_up:
        per_round.setdefault(r["round"], []).append(r["client"])
    assert {k: len(v) for k, v in per_round.items()} == {1: 2, 2: 2, 3: 2}  # round(0.5 * 3)
    # uploaded bytes = the factor sizes the client computed from its ranks and shapes
    train = {(r["round"], r["client"]): r for r in read_jsonl(out / "metrics.jsonl")
             if r.get("split") == "train"}
    for r in fit_up:
        assert r["bytes"] == train[(r["round"], r["client"])]["upload_bytes"]
    # a client that took part in round t gets factors in round t + 1, anyone else full weights
    down = {(r["round"], r["client"]): r["kind"] for r in egress
            if r["phase"] == "fit" and r["direction"] == "down" and r["kind"] != "scalars"}
    for (rnd, client), kind in down.items():
        was_there = client in per_round.get(rnd - 1, [])
        assert kind == ("svd-factors" if was_there else "weights"), (rnd, client)
    rows = read_jsonl(out / "metrics.jsonl")
    models = {(r["model"], r["split"]) for r in rows if "model" in r}
    assert {("global", "test"), ("personal", "test"), ("global", "unseen")} <= models
    assert ("personal:client-0", "unseen") in models  # the teacher, in its own architecture
    personal = sorted(p.name for p in (out / "final" / "personal").glob("*.npz"))
    assert personal == ["client-0.npz", "client-1.npz", "client-2.npz"]
    teacher = dict(np.load(out / "final" / "personal" / "client-0.npz"))
    student = dict(np.load(out / "final" / "global.npz"))
    assert set(teacher) == set(student)  # same layer names, the teacher twice as wide:
    assert all(teacher[k].shape[0] == 2 * student[k].shape[0] for k in student
               if k.startswith("features.0"))
    log = read_jsonl(out / "fedmic.jsonl")
    assert [r["energy"] for r in log] == pytest.approx([0.96, 0.97, 0.98])
    # the logged rank per client and tensor accounts for every factor byte it uploaded
    shapes = {k: list(v.shape) for k, v in student.items()}
    sent = {(r["round"], r["client"]): r["bytes"] for r in fit_up}
    for r in log:
        assert len(r["up_ranks"]) == 2
        for cid, ranks in r["up_ranks"].items():
            assert all(ranks[k] == 0 for k in shapes if len(shapes[k]) < 2)  # 1-D: dense
            assert compressed_nbytes(shapes, ranks) == sent[(r["round"], f"client-{cid}")]


def _sctx(rnd: int, n: int = 2, rounds: int = 3) -> ServerContext:
    from histofed.algorithms.base import ClientInfo

    clients = [ClientInfo(cid=i, name=f"c{i}", num_train=10 * (i + 1)) for i in range(n)]
    return ServerContext(round=rnd, seed=0, clients=clients, build_model=lambda cid=None: None,
                         rounds=rounds)


def test_server_and_clients_hold_bit_identical_global_weights():
    """aggregate -> factors sent down -> a client adds them to its copy: the very same arrays."""
    mic = FedMIC(teacher={})
    rng = np.random.default_rng(0)
    w0 = {"conv": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
          "b": rng.normal(size=8).astype(np.float32)}
    state = mic.init_state(_sctx(1), w0)
    sent = mic.configure_fit(_sctx(1), state)
    assert {p.kind for p in sent.values()} == {"weights"}
    uploads = {}
    for cid in (0, 1):
        delta = {"conv": rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 1e-2,
                 "b": rng.normal(size=8).astype(np.float32) * 1e-2}
        arrays, shapes, _ = compress(delta, 0.5)
        from histofed.algorithms.lowrank import shapes_to_scalar

        uploads[cid] = Payload(arrays, {"num_examples": 10 * (cid + 1),
                                        "shapes": shapes_to_scalar(shapes)}, kind="svd-factors")
    new = mic.aggregate(_sctx(1), state, uploads)
    # hand: W + recompress(sum n_k Delta_k / sum n_k) with n = 10, 20
    d = [mic.received_update(uploads[c]) for c in (0, 1)]
    mean = {k: (d[0][k].astype(np.float64) + 2 * d[1][k]) / 3 for k in w0}
    assert np.abs(new.arrays["b"] - (w0["b"] + mean["b"])).max() < 1e-6  # 1-D: dense, exact
    nxt = mic.configure_fit(_sctx(2), new)
    assert {p.kind for p in nxt.values()} == {"svd-factors"}
    client = SimpleNamespace(name="c0", state=Payload(prefixed("global", w0),
                                                      {"fedmic/synced": 1}, kind="state"))
    got = mic.receive(client, nxt[0])
    for k in w0:
        np.testing.assert_array_equal(got[k], new.arrays[k])
    client.state.scalars["fedmic/synced"] = 0
    with pytest.raises(RuntimeError, match="out of step"):
        mic.receive(client, nxt[0])


def test_dp_wrapper_noises_the_reconstructed_update(tmp_path):
    """Local noise on the truncated, multiplied-out update (dense upload); with sigma = 0 and a
    huge clip the wrapper changes nothing: the same global student as FedMIC alone."""
    fast = {"rounds": 2, "eval_every": 2}
    base = {"teacher": TEACHER, "rep_dim": 8}
    dp = tiny("feddp", run=fast, algorithm={"base": "fedmic", "base_options": base,
                                            "noise": "local", "sigma": 0.0, "clip": 1e9})
    out = new_run_dir(tmp_path / "dp", "dp")
    got = run_experiment(dp, data_root=None, run_dir=out)
    assert [r["base"] for r in read_jsonl(out / "privacy.jsonl")] == ["fedmic", "fedmic"]
    up = {r["kind"] for r in read_jsonl(out / "egress.jsonl") if r["direction"] == "up"}
    assert up == {"noised-update", "scalars"}
    plain_dir = new_run_dir(tmp_path / "p", "p")
    plain = run_experiment(tiny(run=fast), data_root=None, run_dir=plain_dir)
    teacher = np.load(plain_dir / "final" / "personal" / "client-0.npz")
    assert teacher["features.0.weight"].shape[0] == TEACHER["width"]  # the teacher, not S
    for k, v in without_namespaces(plain.arrays).items():
        np.testing.assert_allclose(got.arrays[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # with noise, the client's update is what gets noised: a different, finite student
    fedmic = FedMIC(**base)
    rng = np.random.default_rng(0)
    upload = Payload(*compress({"w": rng.normal(size=(6, 4)).astype(np.float32)}, 0.6)[:1],
                     kind="svd-factors")
    upload.scalars["shapes"] = '{"w":[6,4]}'
    dense = fedmic.client_update(Payload(), upload)
    np.testing.assert_array_equal(dense["w"], fedmic.received_update(upload)["w"])
    back = fedmic.apply_update(Payload(), dense, Payload({}, {"num_examples": 3}))
    np.testing.assert_array_equal(fedmic.received_update(back)["w"], dense["w"])


def test_dp_wrapper_refusals_are_clear():
    with pytest.raises(ConfigError, match="noise = \"local\""):
        build_algorithm(NamedConfig("feddp", {"base": "fedmic", "sigma": 1.0}))
    with pytest.raises(ConfigError, match="dual distillation.*not a sum over records"):
        build_algorithm(NamedConfig("feddp", {"base": "fedmic", "level": "record",
                                              "sigma": 1.0}))
    build_algorithm(NamedConfig("feddp", {"base": "fedmic", "level": "record", "sigma": 1.0,
                                          "base_options": {"kd": False}}))  # allowed


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"t_min": 0.99, "t_max": 0.95}, "t_min = 0.99 > t_max = 0.95"),
    ({"t_min": 0.0}, r"t_min = 0.0 .* must be in \(0, 1\]"),
    ({"t_max": 1.5}, r"t_max = 1.5 .* must be in \(0, 1\]"),
    ({"teacher": {"width": 64}}, "teacher needs a model name"),
    ({"teacher": {"name": "resnet"}}, "teacher.name = 'resnet' is not a registered model"),
    ({"teacher": {"name": "cnn", "num_classes": 3}}, "teacher sets num_classes = 3"),
    ({"teacher": {}, "teacher_clients": {"a": {"width": 8}}}, "teacher = {} \\(no teacher\\)"),
    ({"fraction": 0.0}, "option fraction = 0.0 must be > 0"),
    ({"tau": -1.0}, "option tau = -1.0 must be > 0"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        build_algorithm(NamedConfig("fedmic", options))


def test_teacher_with_other_classes_is_refused(monkeypatch):
    from histofed.data.federation import build_federation
    from histofed.models import build_model

    fed = build_federation("synthetic-patches", data_root=None, seed=0)
    mic = FedMIC(teacher=dict(TEACHER))
    ctx = SimpleNamespace(name="client-0", data=fed.clients[0], task=None,
                          model=build_model(dict(STUDENT), num_classes=4))
    ctx.task = SimpleNamespace(forward=lambda m, x: m(x))
    with pytest.raises(ConfigError, match="teacher .* outputs 3 classes but the student"):
        mic._check_classes(ctx, build_model(dict(TEACHER), num_classes=3), TEACHER)


def test_unknown_teacher_site_is_refused():
    mic = FedMIC(teacher=dict(TEACHER), teacher_clients={"nowhere": {"width": 32}})
    with pytest.raises(ConfigError, match="teacher_clients names \\['nowhere'\\]"):
        mic.init_state(_sctx(1), {})


# ---- MedMNIST .npz reader ------------------------------------------------------------------------
def _write_npz(path, *, grey=False, drop=(), label_shape=None):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 12), ("test", 20)):
        shape = (n, 28, 28) if grey else (n, 28, 28, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        labels = np.arange(n) % 3
        arrays[f"{split}_labels"] = labels.reshape(label_shape(n) if label_shape else (n, 1))
    for k in drop:
        arrays.pop(k)
    np.savez(path, **arrays)
    return arrays


def test_medmnist_reader_and_federation(tmp_path):
    from histofed.data.federation import build_federation
    from histofed.data.medmnist import read_medmnist_npz

    arrays = _write_npz(tmp_path / "tiny.npz")
    data = read_medmnist_npz(tmp_path / "tiny.npz")
    x, y = data["train"]
    assert x.shape == (60, 28, 28, 3) and x.dtype == np.uint8 and y.shape == (60,)
    np.testing.assert_array_equal(x, arrays["train_images"])
    np.testing.assert_array_equal(y, arrays["train_labels"][:, 0])
    _write_npz(tmp_path / "grey.npz", grey=True)
    g, _ = read_medmnist_npz(tmp_path / "grey.npz")["test"]
    assert g.shape == (20, 28, 28, 3) and (g[..., 0] == g[..., 2]).all()
    fed = build_federation("medmnist-npz", data_root=tmp_path, seed=0, path="tiny.npz",
                           num_clients=2, alpha=1.0, min_size=5)
    assert fed.num_classes == 3 and len(fed.clients) == 2
    assert sum(c.num_train for c in fed.clients) == 60
    assert sum(len(c.test) for c in fed.clients) == 20
    img, label = fed.clients[0].train[0]
    assert tuple(img.shape) == (3, 28, 28) and 0 <= int(label) < 3


@pytest.mark.parametrize("kwargs, match", [
    ({"drop": ("val_labels", "test_images")}, r"missing key\(s\) \['val_labels', 'test_images'\]"),
    ({"label_shape": lambda n: (n // 2, 2)}, "looks multi-label"),
])
def test_medmnist_bad_files_are_clear_errors(tmp_path, kwargs, match):
    from histofed.data.medmnist import read_medmnist_npz

    _write_npz(tmp_path / "bad.npz", **kwargs)
    with pytest.raises(ValueError, match=match):
        read_medmnist_npz(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="medmnist.com"):
        read_medmnist_npz(tmp_path / "absent.npz")


# ---- Flower: the site's copy of W_g and its teacher live in the node's state ---------------------
@pytest.fixture
def flower_identity(monkeypatch):
    """Flower stamps new messages with the process's task identity (as in test_flower_engine)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_fedmic_on_flower_equals_inprocess(tmp_path, flower_identity):
    from test_flower_engine import _assert_same_weights, _final, _serve, _test_rows

    cfg = tiny(algorithm={"fraction": 0.67}, run={"rounds": 2, "eval_every": 2})
    ref = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out)
    _assert_same_weights(_final(out), _final(ref))
    assert _test_rows(out) == _test_rows(ref)  # teachers ("personal") stayed on the nodes
    kinds = lambda d: [(r["round"], r["client"], r["kind"]) for r in read_jsonl(d / "egress.jsonl")]  # noqa: E731
    assert kinds(out) == kinds(ref)  # factors went down to the same sites
    assert (2, "client-1", "svd-factors") in kinds(out)  # sampled in rounds 1 and 2
