"""`histofed predict` and `histofed evaluate` with instance scores: tile folders, generated
pyramidal slides, the two real slides, bad inputs (nothing half-written)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_config_dict
from histofed.cli import app
from histofed.predict import Predictor
from test_slides import write_pyramid

runner = CliRunner()
PINK, PURPLE = (230, 130, 190), (70, 30, 110)  # tissue, nucleus


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-round segmentation run on the synthetic federation (seconds)."""
    from histofed.config import config_from_dict
    from histofed.engine import run_experiment
    from histofed.engine.rundir import new_run_dir

    cfg = config_from_dict(tiny_config_dict(run={"rounds": 1}))
    out = new_run_dir(tmp_path_factory.mktemp("runs") / "tiny", "tiny")
    run_experiment(cfg, data_root=None, run_dir=out)
    return out


@pytest.fixture
def dark_is_nucleus(monkeypatch):
    """Replace the network by a rule with known answers: red channel < 128 is nucleus."""
    monkeypatch.setattr(Predictor, "probabilities",
                        lambda self, image: (image[..., 0] < 128).astype(np.float32))


def _discs(shape, centres, radius=6, background=PINK):
    rgb = np.full(shape + (3,), background, np.uint8)  # H x W x 3
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for cx, cy in centres:
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = PURPLE
    return rgb


def _no_leftovers(parent):
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


def _centre(feature):
    ring = np.asarray(feature["geometry"]["coordinates"][0])[:-1]  # K x 2 (x, y)
    return ring.mean(axis=0)


def test_nucleus_features_coordinates_by_hand():
    from histofed.overlays import nucleus_features

    labels = np.zeros((8, 8), np.int32)
    labels[1:4, 1:4] = 5  # pixels 1..3 cover [1, 4) in image space: centre (2.5, 2.5)
    (feat,) = nucleus_features(labels, origin=(100, 200), scale=2.0, tolerance=0)
    ring = np.asarray(feat["geometry"]["coordinates"][0])
    assert np.array_equal(ring[0], ring[-1])  # closed
    x, y = ring[:, 0], ring[:, 1]
    area = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    assert area == pytest.approx(8.5 * 4)  # marching squares cuts the 4 corners: 9 - 0.5, x 2^2
    assert np.allclose(_centre(feat), (100 + 2 * 2.5, 200 + 2 * 2.5))
    assert feat["properties"]["classification"]["name"] == "Nucleus"


def test_predict_tile_folder(tiny_run, tmp_path, dark_is_nucleus):
    folder = tmp_path / "tiles"
    folder.mkdir()
    centres = {"a": [(10, 10), (40, 20)], "b": [(30, 30)], "c": []}
    for name, cs in centres.items():
        Image.fromarray(_discs((48, 64), cs)).save(folder / f"{name}.png")
    out = tmp_path / "pred"
    res = runner.invoke(app, ["predict", str(tiny_run), "--images", str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    for name, cs in centres.items():
        mask = np.array(Image.open(out / "masks" / f"{name}.png"))
        assert mask.dtype == np.uint16 and mask.shape == (48, 64) and mask.max() == len(cs)
        assert int(rows[name]["nuclei"]) == len(cs)
        overlay = np.array(Image.open(out / "overlays" / f"{name}.png"))
        assert overlay.shape == (48, 64, 3)
        assert ((overlay == (0, 255, 0)).all(-1).any()) == bool(cs)  # contours drawn
        gj = json.loads((out / "geojson" / f"{name}.geojson").read_text())
        assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(cs)
        got = sorted(tuple(_centre(f)) for f in gj["features"])  # pixel (c, r) centre: c + .5
        assert np.allclose(got, sorted((cx + 0.5, cy + 0.5) for cx, cy in cs), atol=0.6)
    assert json.loads((out / "summary.json").read_text())["nuclei"] == 3
    assert "3 tile(s), 3 nuclei" in res.output


def test_predict_refuses_bad_inputs_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_discs((48, 64), [])).save(mixed / "a.png")
    Image.fromarray(_discs((32, 32), [])).save(mixed / "b.png")
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(tiny_run), "--images", str(mixed), "--out", str(out)])
    assert res.exit_code == 2 and "mixes image sizes" in res.output and "b.png" in res.output
    assert "--mixed-sizes" in res.output and not out.exists()
    gray = tmp_path / "gray"
    gray.mkdir()
    Image.fromarray(_discs((32, 32), [])).save(gray / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(gray / "b.png")
    res = runner.invoke(app, ["predict", str(tiny_run), "--images", str(gray), "--out", str(out),
                              "--mixed-sizes"])
    assert res.exit_code == 2 and "1 channel(s)" in res.output and not out.exists()
    # a failure on the second image leaves no output folder and no partial one
    calls = []

    def flaky(self, image):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return np.zeros(image.shape[:2], np.float32)

    monkeypatch.setattr(Predictor, "probabilities", flaky)
    good = tmp_path / "good"
    good.mkdir()
    for name in "ab":
        Image.fromarray(_discs((32, 32), [])).save(good / f"{name}.png")
    with pytest.raises(RuntimeError, match="disk full"):
        from histofed.predict import predict_tiles
        predict_tiles(tiny_run, good, out, progress=False)
    assert not out.exists() and _no_leftovers(tmp_path)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["predict", str(tiny_run), "--images", str(good), "--out", str(out)])
    assert res.exit_code == 2 and "never overwrites" in res.output
    assert (out / "keep.txt").read_text() == "mine"


def test_predict_refuses_a_classification_run(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "cls"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "task": "classification",
                                              "federation": "crc-points"}))
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(_discs((32, 32), [])).save(tiles / "a.png")
    res = runner.invoke(app, ["predict", str(run), "--images", str(tiles), "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2 and "classification" in res.output and "segmentation" in res.output
    assert not (tmp_path / "o").exists()


def test_predict_slide_counts_border_nuclei_once(tiny_run, tmp_path, dark_is_nucleus):
    # 512 x 512 tissue (white 16 px frame), 128 px tiles: discs on tile corners and edges
    centres = [(128, 128), (256, 200), (200, 256), (300, 300), (64, 400), (383, 440)]
    rgb = _discs((512, 512), centres)
    rgb[:16], rgb[-16:], rgb[:, :16], rgb[:, -16:] = 255, 255, 255, 255
    slide = write_pyramid(tmp_path / "s.tif", rgb, mpp=0.5, levels=2)
    out = tmp_path / "pred"
    res = runner.invoke(app, ["predict", str(tiny_run), "--images", str(slide), "--out", str(out),
                              "--tile-size", "128", "--margin", "16"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] == summary["tissue_tiles"] == 16
    feats = json.loads((out / "s.geojson").read_text())["features"]
    assert len(feats) == summary["nuclei"] == len(centres)  # each border nucleus once, whole
    got = sorted(tuple(_centre(f)) for f in feats)
    assert np.allclose(got, sorted((cx + 0.5, cy + 0.5) for cx, cy in centres), atol=0.6)
    tiles = list(csv.DictReader(open(out / "s-tiles.csv")))
    assert sum(int(t["nuclei"]) for t in tiles) == len(centres)
    assert Image.open(out / "s-overlay.png").size == (512, 512)


def test_predict_blank_slide_is_a_clear_error(tiny_run, tmp_path):
    slide = write_pyramid(tmp_path / "blank.tif", np.full((256, 256, 3), 255, np.uint8), levels=1)
    out = tmp_path / "pred"
    res = runner.invoke(app, ["predict", str(tiny_run), "--images", str(slide), "--out", str(out)])
    assert res.exit_code == 2 and "no tissue" in res.output and "blank.tif" in res.output
    assert not out.exists() and _no_leftovers(tmp_path)


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_predict_real_slides(shared_data, tiny_run, tmp_path, name):
    from histofed.predict_slide import predict_slide

    path = shared_data / "wsi" / name
    summary = predict_slide(tiny_run, path, tmp_path / "p", max_tiles=2, progress=False)
    assert summary["tiles"] == 2 and summary["tissue_tiles"] > 20
    w, h = summary["dimensions"]
    feats = json.loads((tmp_path / "p" / f"{path.stem}.geojson").read_text())["features"]
    assert len(feats) == summary["nuclei"]
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in feats] or
                        [np.zeros((0, 2))])
    assert ((xy >= -32) & (xy <= np.array([w, h]) + 32)).all()  # slide coordinates
    assert (tmp_path / "p" / f"{path.stem}-overlay.png").exists()


def test_evaluate_reports_instance_scores_grids_and_report(tiny_run, tmp_path):
    from histofed.data.synthetic import write_synthetic_source

    ids_src = write_synthetic_source(tmp_path / "d", "inst", 2, 64, np.random.default_rng(3))
    bin_src = tmp_path / "d" / "binary"
    (bin_src / "masks").mkdir(parents=True)
    import shutil

    shutil.copytree(ids_src / "images", bin_src / "images")
    for p in (ids_src / "masks").glob("*.png"):
        Image.fromarray(((np.array(Image.open(p)) > 0) * 255).astype(np.uint8)).save(
            bin_src / "masks" / p.name)
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--data", str(ids_src), "--data",
                              str(bin_src), "--grid-images", "2"])
    assert res.exit_code == 0, res.output
    rows = {r["data"]: r for r in csv.DictReader(open(tiny_run / "evaluate.csv"))}
    assert rows["inst"]["reference"] == "instance ids"
    assert rows["binary"]["reference"].startswith("connected components")
    assert rows["inst"]["dice"] == rows["binary"]["dice"]  # same pixels
    for r in rows.values():
        assert 0 <= float(r["aji"]) <= 1 and 0 <= float(r["pq"]) <= 1
    assert int(rows["inst"]["nuclei_ref"]) >= int(rows["binary"]["nuclei_ref"])  # merges
    grids = sorted(p.name for p in (tiny_run / "evaluate-grids").glob("*.png"))
    assert grids == ["global__binary.png", "global__inst.png"]
    assert runner.invoke(app, ["report", str(tiny_run)]).exit_code == 0
    html = (tiny_run / "report.html").read_text()
    assert "evaluate-grids/global__inst.png" in html and "instance ids" in html


def test_evaluate_clients_gives_one_row_and_grid_per_client(tiny_run, tmp_path):
    out = tmp_path / "ev"
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--clients", "--out", str(out),
                              "--grid-images", "1"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["data"] for r in rows] == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert all(r["reference"] == "instance ids" and r["images"] == "1" for r in rows)
    assert len(list((tmp_path / "ev-grids").glob("global__synthetic-*.png"))) == 3
    res = runner.invoke(app, ["evaluate", str(tiny_run)])
    assert res.exit_code == 2 and "--clients" in res.output
