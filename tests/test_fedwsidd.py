"""FedWSIDD: distribution-matching maths by hand, pooling, the feature-space method end to end
with a different MIL model per site, and image-space distillation through a stain normaliser."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from histofed.algorithms.fedwsidd import (
    FedWSIDD,
    distil_images,
    dm_loss,
    decode_bags,
    encode_bags,
    pool_synthetic,
    random_relu_embedding,
)
from histofed.config import ConfigError
from histofed.data.bags import BagDataset, Standardizer
from histofed.engine import run_experiment
from histofed.engine.rundir import load_payload, new_run_dir, read_jsonl
from histofed.models.encoders import RandomCNNEncoder
from histofed.stain import Macenko, od_to_rgb

HETERO = {"client-0": {"name": "abmil"}, "client-1": {"name": "clam-sb", "k_sample": 2},
          "client-2": {"name": "transmil", "hidden": 16, "heads": 2}}


def mil_config(tiny_config, method="fedwsidd", **tables):
    tables = {"run": {"rounds": 2, "eval_every": 1}, **tables}
    cfg = tiny_config(method, **tables)
    from histofed.config import NamedConfig

    return cfg.replace(
        federation=NamedConfig("synthetic-bags", {"num_clients": 3, "bags_per_client": 12,
                                                  "dim": 8}),
        model=NamedConfig("abmil", {"hidden": 16, "clients": HETERO}))


def test_dm_loss_by_hand():
    real = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0]])]  # means (2,3), (1,1)
    syn = [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 3.0], [1.0, 1.0]])]  # means (0,0), (1,2)
    assert dm_loss(real, syn).item() == pytest.approx((4 + 9) + (0 + 1))
    double = dm_loss(real, syn, phi=lambda x: 2 * x)  # phi scales the gap: 4x the loss
    assert double.item() == pytest.approx(4 * 14)
    w, b = random_relu_embedding(4, 3, torch.Generator().manual_seed(0))
    w2, b2 = random_relu_embedding(4, 3, torch.Generator().manual_seed(0))
    assert w.shape == (4, 3) and b.shape == (3,) and torch.equal(w, w2) and torch.equal(b, b2)


def test_pool_union_and_per_class_index_mean():
    a = (np.array([[[0.0]], [[2.0]], [[10.0]]]), np.array([0, 0, 1]))  # ipc = 2 for class 0
    b = (np.array([[[4.0]], [[6.0]]]), np.array([0, 0]))  # this site has no class 1
    bags, labels = pool_synthetic([a, b], "union")
    assert labels.tolist() == [0, 0, 0, 0, 1] and bags[:, 0, 0].tolist() == [0, 2, 4, 6, 10]
    bags, labels = pool_synthetic([a, b], "mean")
    # class 0: index 0 -> (0 + 4) / 2, index 1 -> (2 + 6) / 2; class 1 only from site a
    assert labels.tolist() == [0, 0, 1] and bags[:, 0, 0].tolist() == [2.0, 4.0, 10.0]
    c = (np.zeros((1, 1, 1)), np.array([0]))  # ipc 1 against ipc 2
    with pytest.raises(ValueError, match="same ipc and nps at every site; class 0"):
        pool_synthetic([a, c], "mean")
    with pytest.raises(ValueError, match="no synthetic bags were uploaded"):
        pool_synthetic([], "union")


def test_float16_codec_keeps_large_features_with_small_spread():
    rng = np.random.default_rng(0)
    raw = np.stack([rng.normal(10_000, 1.0, (3, 5)), rng.normal(0, 1, (3, 5))], -1)  # 3 x 5 x 2
    naive = np.abs(raw.astype(np.float16).astype(np.float64) - raw).max()
    assert naive > 1.0  # float16's step at 1e4 is 8: whole standard deviations lost
    arrays = encode_bags(raw, "float16")
    assert arrays["bags"].dtype == np.float16 and arrays["scale"].shape == (2,)
    assert np.abs(decode_bags(arrays) - raw).max() < 0.01  # ~1e-3 of the spread
    assert set(encode_bags(raw, "float32")) == {"bags"}
    np.testing.assert_array_equal(decode_bags(encode_bags(raw, "float32")), raw.astype(np.float32))


def test_received_bags_are_restandardised_with_the_sites_own_statistics():
    std = Standardizer(np.array([10.0, -5.0], np.float32), np.array([2.0, 4.0], np.float32))
    raw = [np.array([[12.0, -1.0]], np.float32)]
    ctx = SimpleNamespace(name="a", round=2, data=SimpleNamespace(
        train=BagDataset(raw, np.array([1]), std)))
    from histofed.algorithms.base import Payload

    payload = Payload({"bags": np.array([[[12.0, -1.0]]], np.float16), "labels": np.array([1])},
                      kind="synthetic-bags")
    items = FedWSIDD()._received_items(ctx, payload)
    assert items[0][1] == 1 and items[0][0].tolist() == [[1.0, 1.0]]  # (12-10)/2, (-1+5)/4
    with pytest.raises(ValueError, match="client 'a', round 2: no pooled synthetic bags"):
        FedWSIDD()._received_items(ctx, Payload(kind="none"))


def test_fedwsidd_end_to_end_with_a_different_mil_model_per_site(tiny_config, tmp_path):
    cfg = mil_config(tiny_config, algorithm={"ipc": 2, "nps": 4, "dm_steps": 20,
                                             "init": "noise", "embed": "identity"},
                     train={"local_steps": 10, "optimizer": "adam", "lr": 0.001})
    out = new_run_dir(tmp_path / "wsidd", "wsidd")
    run_experiment(cfg, data_root=None, run_dir=out)
    egress = read_jsonl(out / "egress.jsonl")
    up = [r for r in egress if r["direction"] == "up" and r["kind"] != "scalars"]
    assert {r["kind"] for r in up} == {"synthetic-bags"} and {r["round"] for r in up} == {1}
    # per site: 2 classes x ipc 2 bags x nps 4 x dim 8 float16 + offset and scale (8 float32
    # each) + 4 int64 labels
    assert all(r["bytes"] == 2 * 2 * 4 * 8 * 2 + 2 * 8 * 4 + 4 * 8 for r in up)
    down = [r for r in egress if r["direction"] == "down" and r["kind"] == "synthetic-bags"]
    assert {r["round"] for r in down} == {2} and len(down) == 3  # the pooled 12 bags, once
    assert all(r["bytes"] == 12 * 4 * 8 * 2 + 2 * 8 * 4 + 12 * 8 for r in down)
    rows = read_jsonl(out / "fedwsidd.jsonl")
    assert rows[-1]["pooled_bags"] == 12 and rows[-1]["per_class"] == [6, 6]
    assert all(r["dm_loss_last"] < 0.5 * r["dm_loss_first"] for r in rows[:3])  # noise -> data
    tests = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "test"]
    assert {(r["round"], r["model"]) for r in tests} == {(1, "personal"), (2, "personal")}
    train2 = [r for r in read_jsonl(out / "metrics.jsonl")
              if r.get("split") == "train" and r["round"] == 2]
    assert all(r["synthetic_bags_used"] == 12 for r in train2)
    personal = {n: load_payload(out / "final" / "personal" / n).arrays for n in HETERO}
    assert "cls_token" in personal["client-2"] and "instance_heads.0.weight" in personal["client-1"]
    assert not (out / "final" / "global.npz").exists()


def test_fedwsidd_needs_two_rounds_and_a_mil_task(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"needs \[run\].rounds = 2 .*got 3"):
        run_experiment(mil_config(tiny_config, run={"rounds": 3}), data_root=None,
                       run_dir=new_run_dir(tmp_path / "a", "a"))
    with pytest.raises(ConfigError, match="needs a MIL federation"):
        run_experiment(tiny_config("fedwsidd", run={"rounds": 2}), data_root=None,
                       run_dir=new_run_dir(tmp_path / "b", "b"))
    with pytest.raises(ConfigError, match="option pool = 'max'"):
        FedWSIDD.from_options(pool="max")


def _he_patches(n: int, seed: int, shift: float) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    he = np.array([[0.65, 0.25], [0.70, 0.85], [0.29, 0.45]])
    conc = rng.uniform(0.4, 1.2, size=(n, 2, 64)) + np.array([shift, -shift])[None, :, None] * 0.3
    od = torch.as_tensor(np.einsum("ck,nkp->ncp", he, conc.clip(0.2)))
    return od_to_rgb(od).reshape(n, 3, 8, 8).float()


def test_image_space_distillation_through_macenko_moves_the_pixels(one_thread):
    real = [_he_patches(6, 0, 0.0), _he_patches(6, 1, 1.0)]  # two classes, 8 x 8 patches
    encoder = RandomCNNEncoder(width=4, depth=1, pool=2, seed=0)
    norm = Macenko(clip=False)
    syn0, _ = distil_images(real, ipc=1, nps=2, size=8, encoder=encoder, normaliser=norm,
                            steps=0, init="real", seed=0)
    syn, log = distil_images(real, ipc=1, nps=2, size=8, encoder=encoder, normaliser=norm,
                             steps=8, lr=1.0, init="real", seed=0)
    assert syn.shape == (2, 1, 2, 3, 8, 8) and np.isfinite(log["loss"])
    assert (syn - syn0).abs().max() > 1e-4  # the gradient went through Macenko to the pixels

    def loss_of(s):
        with torch.no_grad():
            return dm_loss([encoder(norm(r)) for r in real],
                           [encoder(norm(s[c].reshape(-1, 3, 8, 8))) for c in range(2)]).item()

    assert loss_of(syn) < loss_of(syn0)


def test_no_exchange_ablation_sends_nothing(tiny_config, tmp_path):
    cfg = mil_config(tiny_config, algorithm={"use_synthetic": False},
                     train={"local_steps": 2, "optimizer": "adam", "lr": 0.001})
    out = new_run_dir(tmp_path / "local", "local")
    run_experiment(cfg, data_root=None, run_dir=out)
    assert [r for r in read_jsonl(out / "egress.jsonl") if r["kind"] != "scalars"] == []
    assert not (out / "fedwsidd.jsonl").exists()


def test_a_site_missing_a_class_distils_only_its_own(tiny_config, tmp_path):
    """Site B holds no positive bag: it distils class 0 only; the pooled set still holds both
    classes (from A), and B trains on them in round 2."""
    from histofed.config import NamedConfig
    from histofed.data.bags import write_bag

    rng = np.random.default_rng(0)
    (tmp_path / "h5").mkdir()
    rows = ["slide_id,label,site"]
    for i, (site, label) in enumerate([("A", 0)] * 4 + [("A", 1)] * 4 + [("B", 0)] * 5):
        write_bag(tmp_path / "h5" / f"s{i}.h5",
                  rng.normal(label, 1.0, (6, 4)).astype(np.float32))
        rows.append(f"s{i},{label},{site}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config("fedwsidd", run={"rounds": 2}, train={"local_steps": 3, "optimizer": "adam"},
                      algorithm={"ipc": 1, "nps": 3, "dm_steps": 3})
    cfg = cfg.replace(federation=NamedConfig("slides-bags", {"bags_dir": "h5",
                                                            "labels_csv": "labels.csv"}),
                      model=NamedConfig("abmil", {"hidden": 8}))
    out = new_run_dir(tmp_path / "run", "run")
    run_experiment(cfg, data_root=tmp_path, run_dir=out)
    rows = read_jsonl(out / "fedwsidd.jsonl")
    assert {r["client"]: r["classes"] for r in rows[:2]} == {"A": [0, 1], "B": [0]}
    assert rows[2]["per_class"] == [2, 1]
    train2 = [r for r in read_jsonl(out / "metrics.jsonl")
              if r.get("split") == "train" and r["round"] == 2]
    assert all(r["synthetic_bags_used"] == 3 for r in train2)


def test_an_empty_training_bag_is_named():
    ctx = SimpleNamespace(name="site-a", data=SimpleNamespace(train=BagDataset(
        [np.ones((3, 2), np.float32), np.zeros((0, 2), np.float32)], np.array([0, 1]))))
    with pytest.raises(ValueError, match=r"client 'site-a': training bag\(s\) \[1\] have no "
                                         "instances"):
        FedWSIDD()._real_items(ctx)


def test_fedwsidd_on_flower_equals_inprocess(tiny_config, tmp_path, monkeypatch):
    """The same per-site scores and uploads over Flower Messages (synthetic bags, float16 and
    int64 labels, cross the wire; the pretrained models stay in each node's state)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower_engine import _serve

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # as test_flower_engine's fixture does

    cfg = mil_config(tiny_config, algorithm={"ipc": 1, "nps": 3, "dm_steps": 3},
                     train={"local_steps": 3, "optimizer": "adam", "lr": 0.001})
    ref = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out)

    def tests(d):
        return sorted((r["round"], r["client"], r["accuracy"], r["loss"])
                      for r in read_jsonl(d / "metrics.jsonl") if r.get("split") == "test")

    def up(d):
        return sorted((r["round"], r["client"], r["kind"], r["bytes"])
                      for r in read_jsonl(d / "egress.jsonl") if r["direction"] == "up")

    assert tests(out) == tests(ref) and len(tests(ref)) == 6
    assert up(out) == up(ref)


# ---- image space: synthetic image bags through phi and A ----------------------------------------
def image_config(tiny_config, **algorithm):
    from histofed.config import NamedConfig

    cfg = tiny_config("fedwsidd", run={"rounds": 2, "eval_every": 1},
                      train={"local_steps": 3, "optimizer": "adam", "lr": 0.001},
                      algorithm={"space": "images", "ipc": 1, "nps": 3, "dm_steps": 3,
                                 **algorithm})
    return cfg.replace(
        federation=NamedConfig("synthetic-image-bags", {"num_clients": 2, "bags_per_client": 6,
                                                        "encoder_width": 8, "encoder_depth": 2,
                                                        "encoder_pool": 1}),
        model=NamedConfig("abmil", {"hidden": 8}))


def test_encode_images_by_hand():
    from histofed.algorithms.fedwsidd import decode_images, encode_images

    x = np.array([0.0, 0.5, 1.0, 1.2, -0.1], np.float32)
    assert encode_images(x, "uint8").tolist() == [0, 128, 255, 255, 0]  # clipped to [0, 1]
    assert np.abs(decode_images({"images": encode_images(x, "uint8")}) - x.clip(0, 1)).max() <= 1 / 510 + 1e-6
    half = encode_images(x, "float16")
    assert half.dtype == np.float16 and decode_images({"images": half}).tolist() == [0, 0.5, 1, 1, 0]


@pytest.mark.parametrize("upload", ["images", "features"])
def test_image_space_fedwsidd_end_to_end(tiny_config, tmp_path, one_thread, upload):
    """2 sites distil 1 synthetic bag of 3 16 x 16 patches per class through Macenko + phi
    (8 features), upload the patches (uint8) or their features, and train on real + pooled."""
    out = new_run_dir(tmp_path / upload, upload)
    run_experiment(image_config(tiny_config, upload=upload), data_root=None, run_dir=out)
    rows = read_jsonl(out / "fedwsidd.jsonl")
    images, features = 2 * 3 * 3 * 16 * 16, 2 * 3 * 8 * 2 + 2 * 8 * 4  # uint8; float16 + 2 x D
    for r in rows[:2]:
        assert (r["bytes_as_images"], r["bytes_as_features"]) == (images, features)
        assert r["upload_kind"] == f"synthetic-{'images' if upload == 'images' else 'bags'}"
        assert r["upload_bytes"] == (images if upload == "images" else features) + 2 * 8
        assert r["dm_loss_last"] <= r["dm_loss_first"]
    ups = [r for r in read_jsonl(out / "egress.jsonl")
           if r["direction"] == "up" and r["kind"] != "scalars"]
    assert {r["kind"] for r in ups} == {rows[0]["upload_kind"]} and len(ups) == 2
    train2 = [r for r in read_jsonl(out / "metrics.jsonl")
              if r.get("split") == "train" and r["round"] == 2]
    assert len(train2) == 2 and all(r["synthetic_bags_used"] == 4 for r in train2)
    state = load_payload(sorted((out / "checkpoints").glob("round-*"))[-1] / "server")
    pooled = [k for k in state.arrays if k.startswith("synthetic")]
    assert any(k.endswith("images" if upload == "images" else "bags") for k in pooled)


def test_image_space_needs_image_bags(tiny_config, tmp_path):
    cfg = mil_config(tiny_config, algorithm={"space": "images", "dm_steps": 1},
                     train={"local_steps": 1})
    with pytest.raises(Exception, match="client 'client-0': space = 'images' needs a federation "
                                        "of image bags"):
        run_experiment(cfg, data_root=None, run_dir=new_run_dir(tmp_path / "r", "r"))
    with pytest.raises(ConfigError, match='upload = "images" needs space = "images"'):
        run_experiment(mil_config(tiny_config, algorithm={"upload": "images"}), data_root=None,
                       run_dir=new_run_dir(tmp_path / "s", "s"))


def test_image_space_fedwsidd_on_flower_equals_inprocess(tiny_config, tmp_path, monkeypatch,
                                                        one_thread):
    """uint8 synthetic patches cross Flower Messages and give the same scores and bytes."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower_engine import _serve

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = image_config(tiny_config, upload="images")
    ref = new_run_dir(tmp_path / "ip", "ip")
    run_experiment(cfg, data_root=None, run_dir=ref)
    out = tmp_path / "flower"
    _serve(cfg, out)

    def tests(d):
        return sorted((r["round"], r["client"], r["accuracy"], round(r["loss"], 5))
                      for r in read_jsonl(d / "metrics.jsonl") if r.get("split") == "test")

    def moved(d):
        return sorted((r["round"], r["client"], r["direction"], r["kind"], r["bytes"])
                      for r in read_jsonl(d / "egress.jsonl") if r["kind"] != "scalars")

    assert tests(out) == tests(ref) and len(tests(ref)) == 4
    assert moved(out) == moved(ref) and {k for *_, k, _ in moved(ref)} == {"synthetic-images"}
