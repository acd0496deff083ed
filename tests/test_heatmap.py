"""`histofed slides heatmap`: a MIL run's attention over a slide thumbnail (synthetic slide; the
real CMU slide when ../shared/data is there)."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from histofed.config import NamedConfig
from histofed.data import slides
from histofed.data.bags import read_bag, write_bag
from histofed.engine import run_experiment
from histofed.engine.rundir import new_run_dir
from histofed.evaluate import load_run_model
from histofed.heatmap import attention_heatmap, percentile_rank, render_heatmap
from histofed.models.encoders import RandomCNNEncoder
from test_slides import PINK, write_pyramid


def phi():
    return RandomCNNEncoder(width=8, depth=2, pool=1, seed=0)  # 8 features per tile


@pytest.fixture(scope="module")
def mil_run(tmp_path_factory):
    """A finished FedAvg run on 8-feature synthetic bags (the encoder's output size)."""
    from histofed.config import config_from_dict
    from conftest import tiny_config_dict

    cfg = config_from_dict(tiny_config_dict(
        "fedavg", run={"rounds": 1}, train={"local_steps": 2, "optimizer": "adam"}),
        source="tiny")
    cfg = cfg.replace(federation=NamedConfig("synthetic-bags", {"num_clients": 2,
                                                               "bags_per_client": 6, "dim": 8}),
                      model=NamedConfig("abmil", {"hidden": 8}))
    out = new_run_dir(tmp_path_factory.mktemp("runs") / "mil", "mil")
    run_experiment(cfg, data_root=None, run_dir=out)
    return out


@pytest.fixture(scope="module")
def two_tone_slide(tmp_path_factory):
    """512 x 512 white slide; tissue at rows 128..383, columns 64..447: pink left, purple right."""
    rgb = np.full((512, 512, 3), 255, np.uint8)
    rgb[128:384, 64:256] = PINK
    rgb[128:384, 256:448] = (90, 40, 140)
    return write_pyramid(tmp_path_factory.mktemp("wsi") / "two.tif", rgb, mpp=0.5, levels=2,
                         tile=64)


def test_percentile_rank_and_render_by_hand():
    assert percentile_rank(np.array([3.0, 1.0, 2.0])).tolist() == pytest.approx([1, 1 / 3, 2 / 3])
    thumb = np.full((4, 6, 3), 200, np.uint8)  # thumbnail at half the level-0 scale
    out = render_heatmap(thumb, np.array([[0, 0], [4, 4]]), 4, np.array([0.0, 1.0]), 0.5,
                         alpha=0.5, cmap="gray")
    assert (out[:2, :2] == 100).all()  # black at 0, blended half with the thumbnail's 200
    assert (np.abs(out[2:4, 2:4].astype(int) - 227.5) <= 0.5).all()  # white at 1
    assert (out[:2, 2:] == 200).all() and (out[2:, :2] == 200).all()  # no tile: untouched


def test_heatmap_from_slide_equals_the_models_own_attention(mil_run, two_tone_slide, tmp_path):
    png = tmp_path / "two-heatmap.png"
    summary = attention_heatmap(mil_run, two_tone_slide, png, encoder=phi(), tile_size=64,
                                progress=False)
    with open(png.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    coords = slides.tile_coords(two_tone_slide, 64)
    assert summary["tiles"] == len(rows) == len(coords) == 24  # 4 rows x 6 columns of tissue
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(c) for c in coords]
    # the same numbers straight from the encoder and the run's model
    bag = slides.extract_features(two_tone_slide, phi(), tmp_path / "b.h5", tile_size=64,
                                  progress=False)
    _, _, model = load_run_model(mil_run, "global", task="mil")
    x = torch.from_numpy(read_bag(bag).features)
    expected = model.instance_attention(x).numpy()
    np.testing.assert_allclose([float(r["attention"]) for r in rows], expected, rtol=1e-5)
    with torch.no_grad():
        probs = torch.softmax(model(x[None]), 1)[0]
    assert summary["predicted"] == int(probs.argmax())
    assert summary["probability"] == pytest.approx(float(probs.max()), rel=1e-5)
    picture = Image.open(png)
    assert picture.mode in ("RGB", "RGBA") and picture.width > 400

    # an existing bag gives the same scores without touching the encoder
    again = attention_heatmap(mil_run, two_tone_slide, tmp_path / "again.png", bag=bag)
    assert again["source"] == str(bag)
    assert (tmp_path / "again.csv").read_text() == png.with_suffix(".csv").read_text()


def test_heatmap_bad_input_is_named(mil_run, two_tone_slide, tmp_path):
    with pytest.raises(ValueError, match="tiles have 16 features but the global model"):
        attention_heatmap(mil_run, two_tone_slide, tmp_path / "x.png", tile_size=64,
                          encoder=RandomCNNEncoder(width=16, depth=2, pool=1), progress=False)
    no_coords = tmp_path / "nc.h5"
    write_bag(no_coords, np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match="nc.h5: a heatmap needs the tiles' coords"):
        attention_heatmap(mil_run, two_tone_slide, tmp_path / "x.png", bag=no_coords)
    far = tmp_path / "far.h5"
    write_bag(far, np.ones((2, 8), np.float32), coords=np.array([[0, 0], [9000, 0]]))
    with pytest.raises(ValueError, match=r"1 tile\(s\) lie outside two.tif"):
        attention_heatmap(mil_run, two_tone_slide, tmp_path / "x.png", bag=far)
    with pytest.raises(ValueError, match="has no 'personal:nobody' model"):
        attention_heatmap(mil_run, two_tone_slide, tmp_path / "x.png", which="personal:nobody",
                          bag=far)
    assert not (tmp_path / "x.png").exists()


def test_footprint_from_clam_attributes_or_coords(mil_run, two_tone_slide, tmp_path):
    """A CLAM bag records patch_size/patch_level on coords, not our size0."""
    from histofed.heatmap import bag_footprint

    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.ones((2, 8), np.float32)
        f["coords"] = np.array([[64, 128], [128, 128]])
        f["coords"].attrs["patch_size"], f["coords"].attrs["patch_level"] = 32, 1
    with slides.open_slide(two_tone_slide) as s:
        assert bag_footprint(path, np.array([[64, 128], [128, 128]]), s) == 64  # 32 px x 2
        plain = tmp_path / "plain.h5"
        write_bag(plain, np.ones((2, 8), np.float32), coords=np.array([[0, 0], [96, 0]]))
        assert bag_footprint(plain, np.array([[0, 0], [96, 0]]), s) == 96


def test_cli_heatmap(mil_run, two_tone_slide, tmp_path):
    from typer.testing import CliRunner

    from histofed.cli import app

    out = tmp_path / "cli.png"
    result = CliRunner().invoke(app, ["slides", "heatmap", str(mil_run), str(two_tone_slide),
                                      "--out", str(out), "--tile-size", "64", "--encoder",
                                      str(_scripted(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "24 tiles; global model predicts class" in result.output and out.is_file()
    # 10x on a 0.5 um/px slide: 64 px tiles cover 128 level-0 px; 2 rows x 4 columns reach
    # half tissue (columns 0 and 384 hold 64 tissue columns of 128)
    tenx = CliRunner().invoke(app, ["slides", "heatmap", str(mil_run), str(two_tone_slide),
                                    "--out", str(tmp_path / "10x.png"), "--tile-size", "64",
                                    "--magnification", "10", "--max-side", "256",
                                    "--encoder", str(_scripted(tmp_path))])
    assert tenx.exit_code == 0, tenx.output
    assert "8 tiles; global model" in tenx.output
    default = CliRunner().invoke(app, ["slides", "heatmap", str(mil_run), str(two_tone_slide),
                                       "--tile-size", "64", "--out", str(tmp_path / "d.png")])
    assert default.exit_code != 0 and "tiles have 256 features but the global model" in \
        default.output
    seg = CliRunner().invoke(app, ["slides", "heatmap", str(tmp_path), str(two_tone_slide)])
    assert seg.exit_code != 0 and "config.toml" in seg.output


def _scripted(tmp_path):
    path = tmp_path / "phi.pt"
    torch.jit.save(torch.jit.script(phi()), str(path))
    return path


def test_heatmap_on_a_real_slide(shared_data, mil_run, tmp_path):
    """The CMU slide (20x) tiled at 5x (64 px tiles = 256 level-0 px)."""
    slide = shared_data / "wsi" / "cmu-1-small-region.svs"
    summary = attention_heatmap(mil_run, slide, tmp_path / "cmu.png", encoder=phi(),
                                tile_size=64, magnification=5, progress=False,
                                max_side=512)
    assert 20 < summary["tiles"] < 100
    assert sum(summary["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert Image.open(tmp_path / "cmu.png").width > 400


def test_heatmap_of_each_personal_model_of_a_heterogeneous_fedwsidd_run(two_tone_slide,
                                                                        tmp_path):
    """FedWSIDD keeps personal models only, one architecture per site (ABMIL, CLAM-SB,
    TransMIL): each is rebuilt from run.json's roster and gives a heatmap."""
    from histofed.config import config_from_dict
    from conftest import tiny_config_dict
    from test_fedwsidd import HETERO

    cfg = config_from_dict(tiny_config_dict(
        "fedwsidd", run={"rounds": 2}, train={"local_steps": 2, "optimizer": "adam"},
        algorithm={"ipc": 1, "nps": 3, "dm_steps": 2}), source="tiny")
    cfg = cfg.replace(federation=NamedConfig("synthetic-bags", {"num_clients": 3,
                                                               "bags_per_client": 6, "dim": 8}),
                      model=NamedConfig("abmil", {"hidden": 16, "clients": HETERO}))
    run = new_run_dir(tmp_path / "wsidd", "wsidd")
    run_experiment(cfg, data_root=None, run_dir=run)
    bag = slides.extract_features(two_tone_slide, phi(), tmp_path / "b.h5", tile_size=64,
                                  progress=False)
    with pytest.raises(ValueError, match="has no 'global' model"):
        attention_heatmap(run, two_tone_slide, tmp_path / "g.png", bag=bag)
    kinds = set()
    for site in ("client-0", "client-1", "client-2"):
        _, _, model = load_run_model(run, f"personal:{site}", task="mil")
        kinds.add(type(model).__name__)
        summary = attention_heatmap(run, two_tone_slide, tmp_path / f"{site}.png",
                                    which=f"personal:{site}", bag=bag, max_side=256)
        assert summary["tiles"] == 24 and (tmp_path / f"{site}.png").is_file()
    assert kinds == {"GatedABMIL", "CLAMSB", "TransMILLite"}


def test_heatmap_of_a_standardising_run_uses_the_sites_own_statistics(two_tone_slide, tmp_path):
    """slides-bags with standardize = true: each site scaled its bags with its own training
    statistics; the heatmap refits them from the site's data (global: a clear error)."""
    from histofed.config import config_from_dict
    from histofed.data.bags import Standardizer
    from conftest import tiny_config_dict

    rng = np.random.default_rng(0)
    (tmp_path / "h5").mkdir()
    rows, train_a = ["slide_id,label,site"], []
    for i, (site, label) in enumerate([("A", 0), ("A", 1)] * 3 + [("B", 0), ("B", 1)] * 3):
        x = rng.normal(3 * label + 10, 4.0, (5, 8)).astype(np.float32)
        write_bag(tmp_path / "h5" / f"s{i}.h5", x)
        rows.append(f"s{i},{label},{site}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = config_from_dict(tiny_config_dict(
        "fedwsidd", run={"rounds": 2}, train={"local_steps": 2, "optimizer": "adam"},
        algorithm={"ipc": 1, "nps": 2, "dm_steps": 2}), source="tiny")
    cfg = cfg.replace(federation=NamedConfig("slides-bags", {
        "bags_dir": "h5", "labels_csv": "labels.csv", "standardize": True}),
        model=NamedConfig("abmil", {"hidden": 8}))
    run = new_run_dir(tmp_path / "run", "run")
    run_experiment(cfg, data_root=tmp_path, run_dir=run)
    bag = slides.extract_features(two_tone_slide, phi(), tmp_path / "b.h5", tile_size=64,
                                  progress=False)
    from histofed.heatmap import _standardizer

    with pytest.raises(ValueError, match="global model has no single input scale"):
        _standardizer(run, cfg, "global", tmp_path)  # (FedWSIDD has no global model anyway)
    attention_heatmap(run, two_tone_slide, tmp_path / "a.png", which="personal:A", bag=bag,
                      max_side=256)
    from histofed.engine import load_federation

    site_a = load_federation(cfg, tmp_path).clients[0]
    assert site_a.name == "A" and isinstance(site_a.train.standardizer, Standardizer)
    _, _, model = load_run_model(run, "personal:A", task="mil")
    x = torch.from_numpy(site_a.train.standardizer(read_bag(bag).features))
    with open(tmp_path / "a.csv") as f:
        got = [float(r["attention"]) for r in csv.DictReader(f)]
    np.testing.assert_allclose(got, model.instance_attention(x).numpy(), rtol=1e-5)
