"""FedSODA: hand-computed weights/fusion/bank/L_sc, FedAvg equivalence, bad input, tiny runs."""

import json
import math

import numpy as np
import pytest
import torch

from histofed.algorithms import build_algorithm
from histofed.algorithms.base import ClientInfo, Payload, ServerContext
from histofed.algorithms.fedsoda import (
    FedSODA,
    cosine,
    dynamic_weights,
    fuse,
    intensity_stats,
    self_consistency_loss,
    update_bank,
)
from histofed.algorithms.stages import (
    StageSplitError,
    group_stages,
    key_stages,
    unet_stage_prefixes,
)
from histofed.algorithms.weights import get_weights
from histofed.config import ConfigError, NamedConfig
from histofed.data.datasets import SegmentationTiles
from histofed.engine import run_experiment
from histofed.engine.rundir import new_run_dir, read_jsonl
from histofed.models.cnn import SmallCNN
from histofed.models.unet import build_unet


# ---- pure math -------------------------------------------------------------------------------
def test_cosine_by_hand():
    assert cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine(np.array([1.0, 2.0]), np.array([-2.0, 1.0])) == 0.0
    assert cosine(np.zeros(3), np.ones(3)) == 0.0  # undefined -> no similarity


def test_dynamic_weights_by_hand():
    # sim[i, j, l]: two stages; the diagonal must be ignored (set to junk here)
    sim = np.zeros((3, 3, 2))
    sim[:, :, 0] = [[9, 0.6, 0.2], [0.5, 9, 0.5], [0.1, 0.3, 9]]
    sim[:, :, 1] = [[9, 0.3, 0.3], [-0.2, 9, 0.1], [0.4, 0.4, 9]]  # row 1 sums to -0.1 -> uniform
    w, fallbacks = dynamic_weights(sim)
    np.testing.assert_allclose(w[:, :, 0], [[0, 0.75, 0.25], [0.5, 0, 0.5], [0.25, 0.75, 0]])
    np.testing.assert_allclose(w[:, :, 1], [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    assert fallbacks == 1


def test_fuse_by_hand():
    # three clients, key "a" in stage 0, key "b" in stage 1
    models = [{"a": np.array([1.0], np.float32), "b": np.array([10.0, 0.0], np.float32)},
              {"a": np.array([2.0], np.float32), "b": np.array([20.0, 1.0], np.float32)},
              {"a": np.array([4.0], np.float32), "b": np.array([40.0, 2.0], np.float32)}]
    w = np.zeros((3, 3, 2))
    w[:, :, 0] = [[0, 0.75, 0.25], [0.5, 0, 0.5], [0.25, 0.75, 0]]
    w[:, :, 1] = [[0, 0.5, 0.5], [1.0, 0, 0.0], [0.0, 1.0, 0]]
    out = fuse(models, w, {"a": 0, "b": 1}, lam=0.4)
    # client 0, a: 0.4*1 + 0.6*(0.75*2 + 0.25*4) = 0.4 + 1.5 = 1.9
    # client 1, a: 0.4*2 + 0.6*(0.5*1 + 0.5*4) = 0.8 + 1.5 = 2.3
    # client 2, a: 0.4*4 + 0.6*(0.25*1 + 0.75*2) = 1.6 + 1.05 = 2.65
    np.testing.assert_allclose([o["a"][0] for o in out], [1.9, 2.3, 2.65], rtol=1e-6)
    # client 0, b: 0.4*[10, 0] + 0.6*(0.5*[20, 1] + 0.5*[40, 2]) = [4 + 18, 0.9]
    np.testing.assert_allclose(out[0]["b"], [22.0, 0.9], rtol=1e-6)
    np.testing.assert_allclose(out[1]["b"], [0.4 * 20 + 0.6 * 10, 0.4 * 1 + 0.0], rtol=1e-6)
    np.testing.assert_allclose(out[2]["b"], [0.4 * 40 + 0.6 * 20, 0.4 * 2 + 0.6 * 1], rtol=1e-6)
    assert out[0]["a"].dtype == np.float32
    # lambda = 1 keeps every client's own model; one client is returned unchanged
    same = fuse(models, w, {"a": 0, "b": 1}, lam=1.0)
    np.testing.assert_array_equal(same[2]["b"], models[2]["b"])
    np.testing.assert_array_equal(fuse(models[:1], w[:1, :1], {"a": 0, "b": 1}, 0.4)[0]["a"], [1.0])


def test_memory_bank_formula():
    prev, new = np.full((1, 3, 2, 2), 4.0, np.float32), np.full((1, 3, 2, 2), 8.0)
    np.testing.assert_array_equal(update_bank(None, new, 0.25), new.astype(np.float32))
    np.testing.assert_allclose(update_bank(prev, new, 0.25), 0.25 * 4 + 0.75 * 8)  # = 7
    np.testing.assert_allclose(update_bank(prev, new, 1.0), 4.0)


def _l_sc_by_hand(p, p_g, alpha=0.4, eps=1e-6):
    """Independent float64 loop over pixels."""
    num_pos = den_pos = num_neg = den_neg = 0.0
    for a, g in zip(p, p_g):
        w = float(np.round(abs(g - a) + alpha))
        num_pos += w * g * math.log(a + eps)
        den_pos += w * g + eps
        num_neg += w * (1 - g) * math.log(1 - a + eps)
        den_neg += w * (1 - g) + eps
    return -0.5 * (num_pos / den_pos + num_neg / den_neg)


def test_self_consistency_loss_by_hand():
    p = torch.tensor([0.9, 0.2, 0.6, 0.3], dtype=torch.float64)
    p_g = torch.tensor([0.85, 0.7, 0.1, 0.3], dtype=torch.float64)
    # w = round(|diff| + 0.4) = [round(.45), round(.9), round(.9), round(.4)] = [0, 1, 1, 0]
    eps = 1e-6
    pos = (0.7 * math.log(0.2 + eps) + 0.1 * math.log(0.6 + eps)) / (0.7 + 0.1 + 4 * eps)
    neg = (0.3 * math.log(0.8 + eps) + 0.9 * math.log(0.4 + eps)) / (0.3 + 0.9 + 4 * eps)
    assert self_consistency_loss(p, p_g).item() == pytest.approx(-(pos + neg) / 2, rel=1e-12)
    # random maps (B x 1 x H x W) against the pixel loop
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(2, 1, 5, 5, generator=gen, dtype=torch.float64)
    p_g = torch.rand(2, 1, 5, 5, generator=gen, dtype=torch.float64)
    expected = _l_sc_by_hand(p.flatten().tolist(), p_g.flatten().tolist())
    assert self_consistency_loss(p, p_g).item() == pytest.approx(expected, rel=1e-12)
    # identical models: the mask is empty and the loss is exactly 0 (no NaN)
    assert self_consistency_loss(p, p.clone()).item() == 0.0


def test_intensity_stats_by_hand_and_sigma_zero():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0] = 255  # half the pixels 1.0, half 0.0 -> mu 0.5, sigma 0.5
    mask = np.zeros((2, 2), np.uint8)
    mu, sigma = intensity_stats(SegmentationTiles([img], [mask]), client="a")
    assert (mu, sigma) == (0.5, 0.5)
    flat = np.full((4, 4, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="client 'flat-site'.*sigma = 0"):
        intensity_stats(SegmentationTiles([flat], [np.zeros((4, 4), np.uint8)]), client="flat-site")


# ---- stages ----------------------------------------------------------------------------------
def test_unet_stage_split_covers_every_key():
    model = build_unet(channels=(8, 16, 32), norm="group", num_res_units=0)
    prefixes = unet_stage_prefixes(model)
    assert prefixes == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule",
                        "model.1.submodule.2", "model.2"]  # enc0, enc1, bottom, dec1, dec0
    stages = key_stages(model, prefixes, group_stages(5, 2))
    assert set(stages) == set(get_weights(model))
    assert stages["model.0.conv.weight"] == 0 and stages["model.2.conv.weight"] == 1
    assert group_stages(5, 0) == [[0], [1], [2], [3], [4]]


def _sctx(model_fn, rnd=1, k=2, seed=0):
    return ServerContext(round=rnd, seed=seed, clients=[ClientInfo(i, f"site-{i}", 4) for i in range(k)],
                         build_model=lambda cid: model_fn())


def test_bad_input_gives_clear_errors():
    for opts in ({"lambda": 1.5}, {"lambda": -0.1}, {"gamma": 1.01}, {"gamma": -1.0}):
        key = next(iter(opts))
        with pytest.raises(ConfigError, match=rf"\[algorithm\]\.{key} .*must be in \[0, 1\]"):
            build_algorithm(NamedConfig("fedsoda", opts))
    with pytest.raises(ConfigError, match="personalised"):
        FedSODA(so=False, da=False, personalised=True)
    unet3 = lambda: build_unet(channels=(8, 16), norm="group", num_res_units=0)  # noqa: E731
    init = get_weights(unet3())
    with pytest.raises(StageSplitError, match="stages = 8 but this UNet has only 3 stages"):
        FedSODA(stages=8, synthetic_size=32).init_state(_sctx(unet3), init)
    with pytest.raises(StageSplitError, match="needs MONAI's UNet"):
        FedSODA().init_state(_sctx(lambda: SmallCNN(num_classes=2)), get_weights(SmallCNN(num_classes=2)))
    with pytest.raises(ConfigError, match="synthetic_size = 31"):
        FedSODA(synthetic_size=31).init_state(_sctx(unet3), init)
    # a client reporting sigma = 0 is named by the server
    algo = FedSODA(synthetic_size=32)
    state = algo.init_state(_sctx(unet3), init)
    results = {0: Payload(init, {"num_examples": 4, "mu": 0.5, "sigma": 0.2}),
               1: Payload(init, {"num_examples": 4, "mu": 0.5, "sigma": 0.0})}
    with pytest.raises(ValueError, match="client 'site-1' sent mu = 0.5, sigma = 0.0"):
        algo.aggregate(_sctx(unet3), state, results)


def test_server_memory_bank_cross_assessment_and_fusion():
    unet = lambda: build_unet(channels=(8, 16), norm="group", num_res_units=0)  # noqa: E731
    torch.manual_seed(1)
    models = [get_weights(unet()) for _ in range(3)]
    algo = FedSODA(synthetic_size=16, synthetic_batch=2, gamma=0.25, lam=0.4)
    state = algo.init_state(_sctx(unet, rnd=0, k=3), models[0])
    stats = {0: (0.3, 0.1), 1: (0.7, 0.2), 2: (0.5, 0.3)}
    results = {c: Payload(models[c], {"num_examples": 4, "mu": m, "sigma": s}) for c, (m, s) in stats.items()}
    s1 = algo.aggregate(_sctx(unet, rnd=1, k=3, seed=5), state, results)
    sctx2 = _sctx(unet, rnd=2, k=3, seed=5)
    s2 = algo.aggregate(sctx2, s1, results)
    banks = {}
    for c, (m, s) in stats.items():  # v^1 = v_new(1); v^2 = 0.25 v^1 + 0.75 v_new(2)
        v1 = np.random.default_rng([5, 1, c]).normal(m, s, size=(2, 3, 16, 16))
        v2 = np.random.default_rng([5, 2, c]).normal(m, s, size=(2, 3, 16, 16))
        np.testing.assert_allclose(s1.arrays[f"bank/{c}"], v1.astype(np.float32))
        np.testing.assert_allclose(s2.arrays[f"bank/{c}"], 0.25 * v1 + 0.75 * v2, rtol=1e-5, atol=1e-6)
        banks[c] = torch.from_numpy(s2.arrays[f"bank/{c}"])
    (log,) = sctx2.logs["fedsoda"]  # a log row of this round, not part of the state
    assert not any("log" in k for k in s2.scalars)
    sim, w = np.array(log["similarity"]), np.array(log["weights"])
    assert sim.shape == w.shape == (3, 3, 3) and log["fallbacks"] == 0  # 2-level UNet: 3 stages
    # the last stage's feature is the logit map: s_01 = cos(model_0(v_0), model_0(v_1))
    net = unet().eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in models[0].items()})
    with torch.no_grad():
        expected = cosine(net(banks[0]).double().numpy(), net(banks[1]).double().numpy())
    assert sim[0, 1, 2] == pytest.approx(expected, abs=1e-5)
    # global = 1/3 sum_i [0.4 theta_i + 0.6 sum_j w_ij^stage theta_j] with the logged weights
    stage = {k: 0 if k.startswith("model.0.") else 1 if k.startswith("model.1.") else 2 for k in models[0]}
    for key in models[0]:
        others = lambda i: sum(w[i, j, stage[key]] * models[j][key] for j in range(3) if j != i)  # noqa: E731
        hat = [0.4 * models[i][key] + 0.6 * others(i) for i in range(3)]
        np.testing.assert_allclose(s2.arrays[key], sum(hat) / 3, rtol=1e-4, atol=1e-6)


# ---- engine ----------------------------------------------------------------------------------
def _run(cfg, tmp_path, name, **kw):
    out = tmp_path / name
    return run_experiment(cfg, data_root=None, run_dir=new_run_dir(out, name), **kw), out


def test_all_components_off_equals_fedavg(tiny_config, tmp_path):
    avg, avg_dir = _run(tiny_config("fedavg", run={"rounds": 2}), tmp_path, "avg")
    off = {"so": False, "da": False, "lsc": False}
    soda, soda_dir = _run(tiny_config("fedsoda", run={"rounds": 2}, algorithm=off), tmp_path, "off")
    assert avg.arrays.keys() == soda.arrays.keys()
    for key in avg.arrays:
        np.testing.assert_array_equal(avg.arrays[key], soda.arrays[key], err_msg=key)
    assert read_jsonl(avg_dir / "egress.jsonl") == read_jsonl(soda_dir / "egress.jsonl")
    lsc_only, _ = _run(tiny_config("fedsoda", run={"rounds": 2}, algorithm={**off, "lsc": True}),
                       tmp_path, "lsc")  # L_sc starts in round 3: two rounds are still FedAvg
    for key in avg.arrays:
        np.testing.assert_array_equal(avg.arrays[key], lsc_only.arrays[key], err_msg=key)
    avg3, _ = _run(tiny_config("fedavg", run={"rounds": 3}), tmp_path, "avg3")
    lsc3, _ = _run(tiny_config("fedsoda", run={"rounds": 3}, algorithm={**off, "lsc": True}),
                   tmp_path, "lsc3")
    assert any(not np.array_equal(avg3.arrays[k], lsc3.arrays[k]) for k in avg3.arrays)


def test_lsc_starts_in_round_3_and_its_teacher_is_the_global_model():
    """Reference: round 1 warms up, the first training after the first fusion has no L_sc."""
    from histofed.algorithms.base import ClientContext
    from histofed.config import EvalConfig, TrainConfig
    from histofed.tasks import make_task

    unet = lambda: build_unet(channels=(4, 8), norm="group", num_res_units=0)  # noqa: E731
    torch.manual_seed(0)
    glob, own = get_weights(unet()), get_weights(unet())
    algo = FedSODA(personalised=True, synthetic_size=16)
    state = Payload({**glob, **{f"personal/0/{k}": v for k, v in own.items()}}, {}, "state")
    task = make_task("segmentation", TrainConfig(loss="bce"), 1, 16)

    def client(rnd):
        (payload,) = algo.configure_fit(_sctx(unet, rnd=rnd, k=1), state).values()
        ctx = ClientContext(cid=0, name="site-0", round=rnd, seed=0, data=None, task=task,
                            model=unet(), train=TrainConfig(), eval=EvalConfig(),
                            state=Payload(kind="state"))
        return payload, ctx

    for rnd in (1, 2):
        payload, ctx = client(rnd)
        assert not any(k.startswith("teacher/") for k in payload.arrays)
        assert algo.extra_loss(ctx, payload) is None
    payload, ctx = client(3)
    from histofed.algorithms.weights import load_weights

    load_weights(ctx.model, {k: v for k, v in payload.arrays.items() if "/" not in k})
    np.testing.assert_array_equal(payload.arrays["model.0.conv.weight"], own["model.0.conv.weight"])
    l_sc = algo.extra_loss(ctx, payload)
    x = torch.rand(2, 3, 16, 16)
    logits = ctx.model(x)
    teacher = unet().eval()
    load_weights(teacher, glob)  # theta_g, not the start point theta_hat_i
    with torch.no_grad():
        expected = self_consistency_loss(torch.sigmoid(logits), torch.sigmoid(teacher(x)))
    assert float(l_sc(ctx.model, x, None, logits)) == pytest.approx(float(expected), rel=1e-6)


GN = {"channels": [8, 16], "norm": "group"}


def test_tiny_end_to_end_personalised_with_resume(tiny_config, tmp_path):
    cfg = tiny_config("fedsoda", run={"rounds": 2}, model=GN,
                      algorithm={"synthetic_size": 32, "personalised": True},
                      train={"loss": "bce"})
    full, out = _run(cfg, tmp_path, "full")
    rows = read_jsonl(out / "fedsoda.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and len(rows[0]["stats"]) == 3
    tests = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "test" and r["round"] == 2]
    assert sorted({r["model"] for r in tests}) == ["global", "personal"]
    assert all(0.0 <= r["dice"] <= 1.0 for r in tests)
    up = [r for r in read_jsonl(out / "egress.jsonl") if r["direction"] == "up"]
    assert {r["kind"] for r in up} == {"weights", "scalars"}  # (mu, sigma, n) travel as scalars
    assert sorted(p.stem for p in (out / "final" / "personal").glob("*.npz")) == [
        "synthetic-0", "synthetic-1", "synthetic-2"]
    # crash after round 1, resume: the memory bank and personal models come back exactly
    crashed = new_run_dir(tmp_path / "crashed", "crashed")
    run_experiment(cfg, data_root=None, run_dir=crashed, stop_after=1)
    resumed = run_experiment(cfg, data_root=None, run_dir=crashed, resume=True)
    assert full.arrays.keys() == resumed.arrays.keys()
    for key in full.arrays:
        np.testing.assert_array_equal(full.arrays[key], resumed.arrays[key], err_msg=key)


@pytest.mark.parametrize("so,da", [(True, False), (False, True)])
def test_single_component_ablations_run(tiny_config, tmp_path, so, da):
    cfg = tiny_config("fedsoda", run={"rounds": 1}, model=GN,
                      algorithm={"so": so, "da": da, "lsc": False, "synthetic_size": 32, "stages": 2})
    _, out = _run(cfg, tmp_path, f"so{so}-da{da}")
    (row,) = read_jsonl(out / "fedsoda.jsonl")
    assert np.array(row["weights"]).shape == (3, 3, 2 if da else 1)
    assert ("stats" in row) == so
    scalars = [r for r in read_jsonl(out / "egress.jsonl") if r["kind"] == "scalars"]
    assert all(r["bytes"] > len('{"num_examples":12}') for r in scalars) == so


def test_raw_space_comparison_logs_both_weight_spreads(tiny_config, tmp_path):
    from histofed.algorithms.fedsoda import weight_spread

    w = np.array([[0, .75, .25], [.5, 0, .5], [.25, .75, 0]], float)[:, :, None]
    assert weight_spread(w) == pytest.approx(0.5)  # off-diagonal: 0.25 .. 0.75
    cfg = tiny_config("fedsoda", run={"rounds": 1}, model=GN,
                      algorithm={"lsc": False, "synthetic_size": 32, "compare_raw_space": True})
    _, out = _run(cfg, tmp_path, "raw")
    (row,) = read_jsonl(out / "fedsoda.jsonl")
    assert np.array(row["weights_raw_space"]).shape == np.array(row["weights"]).shape
    assert 0 <= row["spread"] <= 1 and 0 <= row["spread_raw_space"] <= 1
