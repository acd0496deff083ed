"""FedDP: DP-FedAvg math on hand-computed arrays, sampling, accounting across resume, bad input."""

import numpy as np
import pytest
from torch import nn

from histofed.algorithms import build_algorithm
from histofed.algorithms.base import ClientInfo, Payload, ServerContext
from histofed.algorithms.feddp import CLIENT_LEDGER, SKIP, FedDP
from histofed.config import ConfigError, NamedConfig
from histofed.engine import run_experiment
from histofed.engine.rundir import list_checkpoints, load_checkpoint, new_run_dir, read_jsonl
from histofed.privacy.accountant import Ledger, gaussian_epsilon
from histofed.privacy.dp import PrivacyConfigError, add_gaussian_noise, clip_arrays

INSTANCE = {"norm": "instance"}  # no running statistics: allowed with base = fedavg


def _sctx(n=4, rnd=1, model=lambda cid: nn.Linear(2, 1)):
    return ServerContext(round=rnd, seed=0, clients=[ClientInfo(i, f"c{i}", 10) for i in range(n)],
                         build_model=model)


def _run(cfg, tmp_path, name, **kw):
    out = new_run_dir(tmp_path / name, name)
    return run_experiment(cfg, data_root=None, run_dir=out, **kw), out


def test_clip_and_noise_by_hand():
    out, norm = clip_arrays({"a": np.array([3.0], np.float32),
                             "b": np.array([4.0], np.float32)}, 1.0)
    assert norm == 5.0 and out["a"].dtype == np.float32
    np.testing.assert_allclose([out["a"][0], out["b"][0]], [0.6, 0.8], rtol=1e-6)
    same, _ = clip_arrays({"a": np.array([0.3, 0.4])}, 1.0)  # norm 0.5 <= C: unchanged
    np.testing.assert_array_equal(same["a"], [0.3, 0.4])
    noisy = add_gaussian_noise({"z": np.zeros(20000)}, 0.5, np.random.default_rng(0))
    assert np.std(noisy["z"]) == pytest.approx(0.5, rel=0.03)


def test_aggregate_sums_clipped_updates_over_fixed_denominator():
    alg = FedDP(sigma=0.0, clip=1.0, q=0.5)
    sctx = _sctx(n=4)
    state = alg.init_state(sctx, {"weight": np.zeros((1, 2), np.float32),
                                  "bias": np.zeros(1, np.float32)})
    f32 = lambda *v: np.array(v, np.float32)  # noqa: E731
    results = {0: Payload({"weight": f32([0.6, 0.8]), "bias": f32(0.0)}),
               3: Payload({"weight": f32([0.3, 0.0]), "bias": f32(0.4)})}
    new = alg.aggregate(sctx, state, results)
    # sum = [[0.9, 0.8]], [0.4]; denominator q N = 0.5 * 4 = 2 (not the 2 that showed up: fixed)
    np.testing.assert_allclose(new.arrays["weight"], [[0.45, 0.4]], rtol=1e-6)
    np.testing.assert_allclose(new.arrays["bias"], [0.2], rtol=1e-6)
    assert Ledger.from_scalars(new.scalars).history == [(0.0, 0.5, 1)]
    one = alg.aggregate(sctx, state, {0: results[0]})
    np.testing.assert_allclose(one.arrays["weight"], [[0.3, 0.4]], rtol=1e-6)  # still / 2


def test_central_noise_has_std_sigma_c_over_qn():
    big = lambda cid: nn.Linear(4000, 1)  # noqa: E731
    alg = FedDP(sigma=2.0, clip=0.5, q=1.0)
    sctx = _sctx(n=4, model=big)
    zeros = {"weight": np.zeros((1, 4000), np.float32), "bias": np.zeros(1, np.float32)}
    state = alg.init_state(sctx, zeros)
    new = alg.aggregate(sctx, state, {c: Payload(dict(zeros)) for c in range(4)})
    assert np.std(new.arrays["weight"]) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    again = alg.aggregate(sctx, state, {c: Payload(dict(zeros)) for c in range(4)})
    np.testing.assert_array_equal(new.arrays["weight"], again.arrays["weight"])  # seeded


def test_poisson_sampling_is_seeded_and_has_rate_q():
    alg = FedDP(sigma=1.0, q=0.3, delta=1e-3)
    picks = [len(alg.sample(_sctx(n=10, rnd=r))) for r in range(1, 301)]
    assert np.mean(picks) / 10 == pytest.approx(0.3, abs=0.03)
    assert alg.sample(_sctx(n=10, rnd=7)) == alg.sample(_sctx(n=10, rnd=7))
    empty = next(r for r in range(1, 2000) if not alg.sample(_sctx(n=3, rnd=r)))
    jobs = alg.configure_fit(_sctx(n=3, rnd=empty), Payload({"w": np.zeros(1)}))
    assert list(jobs) == [0] and jobs[0].scalars == {SKIP: True} and not jobs[0].arrays
    assert len(alg.configure_evaluate(_sctx(n=3, rnd=empty), Payload({"w": np.zeros(1)}))) == 3


def test_no_noise_huge_clip_equals_fedavg(tiny_config, tmp_path):
    """Equal client sizes: FedDP(sigma=0, C=inf, q=1) is unweighted FedAvg, i.e. FedAvg.

    SGD, not Adam: Adam blows float rounding in zero-gradient parameters (conv biases before
    instance norm) up to full steps, which would hide the comparison."""
    sgd = {"optimizer": "sgd", "lr": 0.05}
    avg, _ = _run(tiny_config("fedavg", model=INSTANCE, run={"rounds": 2}, train=sgd),
                  tmp_path, "avg")
    dp, out = _run(tiny_config("feddp", model=INSTANCE, run={"rounds": 2}, train=sgd,
                               algorithm={"sigma": 0.0, "clip": 1e9}), tmp_path, "dp")
    for k in avg.arrays:
        np.testing.assert_allclose(dp.arrays[k], avg.arrays[k], atol=1e-6, err_msg=k)
    rows = read_jsonl(out / "privacy.jsonl")
    assert [r["epsilon"] for r in rows] == [float("inf")] * 2  # clipping only: no guarantee


def test_clipping_bounds_each_round_step(tiny_config, tmp_path):
    cfg = tiny_config("feddp", model=INSTANCE, run={"rounds": 2, "keep_checkpoints": 0},
                      algorithm={"sigma": 0.0, "clip": 1e-3})
    _, out = _run(cfg, tmp_path, "clip")
    ckpts = [load_checkpoint(p)[1].arrays for p in list_checkpoints(out)]
    step = np.sqrt(sum(np.sum((ckpts[1][k] - ckpts[0][k]) ** 2.0) for k in ckpts[0]))
    assert 0 < step <= 1e-3 * (1 + 1e-5)  # mean of 3 updates of norm <= C over fixed N = 3
    norms = [r["update_norm"] for r in read_jsonl(out / "metrics.jsonl") if "update_norm" in r]
    assert len(norms) == 6 and min(norms) > 1e-3  # so clipping was active
    up = {r["kind"] for r in read_jsonl(out / "egress.jsonl") if r["direction"] == "up"}
    assert "clipped-update" in up


def test_epsilon_survives_crash_and_resume(tiny_config, tmp_path):
    cfg = tiny_config("feddp", model=INSTANCE, run={"rounds": 3},
                      algorithm={"sigma": 0.8, "clip": 0.5, "q": 0.5})
    full, full_dir = _run(cfg, tmp_path, "full")
    out = new_run_dir(tmp_path / "crashed", "crashed")
    run_experiment(cfg, data_root=None, run_dir=out, stop_after=1)
    resumed = run_experiment(cfg, data_root=None, run_dir=out, resume=True)
    for k in full.arrays:
        np.testing.assert_array_equal(full.arrays[k], resumed.arrays[k], err_msg=k)
    rows = read_jsonl(out / "privacy.jsonl")
    assert rows == read_jsonl(full_dir / "privacy.jsonl")
    eps = [r["epsilon"] for r in rows]
    assert [r["round"] for r in rows] == [1, 2, 3] and eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(Ledger([(0.8, 0.5, 3)]).epsilon(1e-5, "rdp"))
    assert rows[0]["sigma"] == 0.8 and rows[0]["clip"] == 0.5 and rows[0]["q"] == 0.5


def test_local_noise_accounts_per_client_against_the_server(tiny_config, tmp_path):
    cfg = tiny_config("feddp", run={"rounds": 2}, model={"norm": "batch"},  # fedbn keeps BN home
                      algorithm={"base": "fedbn", "noise": "local", "sigma": 2.0, "clip": 0.5})
    _, out = _run(cfg, tmp_path, "local")
    rows = read_jsonl(out / "privacy.jsonl")
    # every client took part twice; each time a Gaussian release with sensitivity 2C
    assert rows[-1]["epsilon"] == pytest.approx(Ledger([(1.0, 1.0, 2)]).epsilon(1e-5, "rdp"))
    assert rows[-1]["epsilon"] >= gaussian_epsilon(sigma=1.0, steps=2, delta=1e-5)  # RDP bound
    up = {r["kind"] for r in read_jsonl(out / "egress.jsonl") if r["direction"] == "up"}
    assert up == {"noised-update", "scalars"}
    assert sorted(p.stem for p in (out / "final" / "personal").glob("*.npz")) == \
        ["synthetic-0", "synthetic-1", "synthetic-2"]


def _reject_client_0(monkeypatch, rounds: set[int]):
    """The engine's upload check drops client 0 in ``rounds`` (as a norm or NaN check would)."""
    from histofed.engine import loop
    from histofed.engine.validate import Rejection

    real = loop.check_uploads

    def check(algorithm, sctx, state, sent, uploads, norm_limit):
        kept, rejected = real(algorithm, sctx, state, sent, uploads, norm_limit)
        if sctx.round in rounds and 0 in kept:
            del kept[0]
            rejected.append(Rejection(0, "rejected by the test"))
        return kept, rejected

    monkeypatch.setattr(loop, "check_uploads", check)


def test_a_rejected_upload_still_counts_as_released(tiny_config, tmp_path, monkeypatch):
    """The server saw the noised update even if it drops it: local noise counts the release,
    and a round whose every upload is rejected still writes its privacy row."""
    _reject_client_0(monkeypatch, {1, 2})
    cfg = tiny_config("feddp", run={"rounds": 2}, model={"norm": "batch"},
                      federation={"num_clients": 1, "images_per_client": 2},
                      algorithm={"base": "fedbn", "noise": "local", "sigma": 2.0, "clip": 0.5})
    _, out = _run(cfg, tmp_path, "local-rejected")
    assert [r["round"] for r in read_jsonl(out / "rejected.jsonl")] == [1, 2]
    rows = read_jsonl(out / "privacy.jsonl")  # both rounds kept nothing, yet were released
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["epsilon"] == pytest.approx(Ledger([(1.0, 1.0, 2)]).epsilon(1e-5, "rdp"))


def test_record_level_epsilon_of_a_rejected_upload_is_logged(tiny_config, tmp_path, monkeypatch):
    _reject_client_0(monkeypatch, {2})
    cfg = tiny_config("feddp", model={"norm": "group", "channels": [8, 16]}, run={"rounds": 2},
                      algorithm={"level": "record", "sigma": 1.0, "clip": 1.0})
    _, out = _run(cfg, tmp_path, "record-rejected")
    per_client = {(r["round"], r["client"]): r["epsilon"]
                  for r in read_jsonl(out / "privacy_clients.jsonl")}
    # client 0 trained twice; its round-2 epsilon (rejected upload) is on the record
    assert per_client[(2, "synthetic-0")] > per_client[(1, "synthetic-0")] > 0
    assert per_client[(2, "synthetic-0")] == pytest.approx(per_client[(2, "synthetic-1")])


def test_record_level_keeps_one_accountant_per_client(tiny_config, tmp_path):
    cfg = tiny_config("feddp", model={"norm": "group", "channels": [8, 16]}, run={"rounds": 2},
                      algorithm={"level": "record", "sigma": 1.0, "clip": 1.0})
    _, out = _run(cfg, tmp_path, "record")
    per_client = read_jsonl(out / "privacy_clients.jsonl")
    assert {r["client"] for r in per_client} == {"synthetic-0", "synthetic-1", "synthetic-2"}
    rows = read_jsonl(out / "privacy.jsonl")
    assert rows[1]["epsilon"] > rows[0]["epsilon"] > 0
    assert rows[1]["epsilon"] == max(r["epsilon"] for r in per_client if r["round"] == 2)
    _, _, states = load_checkpoint(list_checkpoints(out)[-1])
    led = Ledger.from_scalars(states["synthetic-0"].scalars, CLIENT_LEDGER)
    assert led.steps == 2 * cfg.train.local_steps  # the client's history spans both rounds


def test_record_level_without_noise_is_not_rejected_by_the_server(tiny_config, tmp_path):
    """sigma = 0 gives epsilon = inf; the server's finiteness check must not drop the sites."""
    cfg = tiny_config("feddp", model={"norm": "group", "channels": [8, 16]}, run={"rounds": 1},
                      algorithm={"level": "record", "sigma": 0.0, "clip": 1.0})
    _, out = _run(cfg, tmp_path, "record0")
    assert read_jsonl(out / "rejected.jsonl") == []
    assert read_jsonl(out / "privacy.jsonl")[0]["epsilon"] == float("inf")


@pytest.mark.parametrize("options, match", [
    ({"sigma": -1.0}, "sigma = -1.0"),
    ({"sigma": 1.0, "clip": 0.0}, "clip = 0.0"),
    ({"sigma": 1.0, "q": 0.0}, r"q = 0.0"),
    ({"sigma": 1.0, "q": 1.01}, r"q = 1.01"),
    ({}, "exactly one of sigma"),
    ({"target_epsilon": 8.0}, "needs target_rounds"),
    ({"sigma": 1.0, "base": "fedsoda"}, "needs a base whose aggregation is a mean.*noise = \"local\""),
    ({"sigma": 1.0, "base": "centralized"}, "pools raw data"),
    ({"sigma": 1.0, "base": "fedavgg"}, 'Did you mean "fedavg"'),
    ({"sigma": 1.0, "base": "fedprox", "base_options": {"mu": "abc"}}, "mu = 'abc' should be a number"),
    ({"sigma": 1.0, "level": "record", "base": "fedprox"}, "proximal term"),
    ({"sigma": 1.0, "sigmaa": 1.0}, 'Did you mean "sigma"'),
])
def test_bad_options_fail_at_construction(options, match):
    with pytest.raises((ConfigError, PrivacyConfigError), match=match):
        build_algorithm(NamedConfig("feddp", options))


def test_target_epsilon_picks_sigma():
    alg = FedDP(target_epsilon=8.0, target_rounds=20)
    assert alg.sigma is not None
    assert 7.99 <= Ledger([(alg.sigma, 1.0, 20)]).epsilon(1e-5) <= 8.0


def test_bad_setups_fail_before_training(tiny_config, tmp_path):
    bn = {"norm": "batch"}
    with pytest.raises(ConfigError, match=r"layer 'model.0.adn.N' has running statistics.*fedbn"):
        _run(tiny_config("feddp", model=bn, algorithm={"sigma": 1.0}), tmp_path, "bn")
    with pytest.raises(ConfigError, match=r"cannot train layer model.0.adn.N \(BatchNorm2d"):
        _run(tiny_config("feddp", model=bn, algorithm={"sigma": 1.0, "level": "record"}),
             tmp_path, "rec")
    with pytest.raises(PrivacyConfigError, match=r"delta = 0.5 is >= 1/3 \(number of clients\)"):
        _run(tiny_config("feddp", model=INSTANCE, algorithm={"sigma": 1.0, "delta": 0.5}),
             tmp_path, "delta")
    for name in ("bn", "rec", "delta"):  # nothing trained
        assert not (tmp_path / name / "metrics.jsonl").exists() or \
            not read_jsonl(tmp_path / name / "metrics.jsonl")


def test_torch_inplace_relu_is_named():
    from histofed.algorithms.feddp import check_opacus_compatible

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
    with pytest.raises(ConfigError, match=r"layer 1 \(ReLU with inplace=True\)"):
        check_opacus_compatible(net)
    check_opacus_compatible(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU()))


def test_record_level_epsilon_matches_a_hand_computed_sampling_rate(tiny_config, tmp_path):
    """q = 1 / ceil(n / b) per DP-SGD step (Opacus' Poisson rate), local_steps steps a round."""
    cfg = tiny_config("feddp", model={"norm": "group", "channels": [8, 16]}, run={"rounds": 2},
                      algorithm={"level": "record", "sigma": 1.3, "clip": 1.0})
    _, out = _run(cfg, tmp_path, "rec-eps")
    n = 2  # synthetic tiny federation: 3 images, test_fraction 0.34 -> 1 test, 2 training images
    q = 1.0 / np.ceil(n / min(cfg.train.batch_size, n))
    expected = Ledger([(1.3, q, 2 * cfg.train.local_steps)]).epsilon(1e-5, "rdp")
    rows = [r for r in read_jsonl(out / "privacy_clients.jsonl") if r["round"] == 2]
    assert [r["epsilon"] for r in rows] == pytest.approx([expected] * 3, rel=1e-9)


def test_per_record_clipping_is_active_in_dp_sgd():
    """sigma = 0, plain SGD: one step moves the weights by at most lr * C (the mean of clipped
    per-record gradients has norm <= C), although the raw gradient is far larger."""
    import torch

    from histofed.algorithms.base import ClientContext
    from histofed.algorithms.feddp import DPSGDTrainer
    from histofed.config import EvalConfig, TrainConfig
    from histofed.data.federation import ClientData
    from histofed.tasks import make_task

    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8) * 50
    y = torch.randint(0, 2, (16,))
    data = torch.utils.data.TensorDataset(x, y)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    before = [p.detach().clone() for p in model.parameters()]
    train = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.1, batch_size=16, local_steps=1)
    ctx = ClientContext(cid=0, name="a", round=1, seed=0, data=ClientData("a", data, data),
                        task=make_task("classification", train, 2), model=model, train=train,
                        eval=EvalConfig(), state=Payload(kind="state"))
    trainer = DPSGDTrainer(ledger=Ledger(), clip=1e-3, sigma=0.0, target_epsilon=None,
                           target_rounds=None, delta=1e-5, accountant="rdp")
    trainer.train(ctx)
    step = float(torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before))))
    assert 0 < step <= 0.1 * 1e-3 * (1 + 1e-5)
    loss = nn.functional.cross_entropy(model(x), y)  # the unclipped gradient is much larger
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert float(torch.sqrt(sum((g ** 2).sum() for g in grads))) > 100 * 1e-3
