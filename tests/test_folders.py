"""The `folders` federation: a hospital's own image/mask folders, one site each (issue #14)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from histofed.cli import app
from histofed.config import config_from_dict, dump_toml
from histofed.data.federation import build_federation
from histofed.data.formats import DataFormatError
from histofed.data.synthetic import write_synthetic_source
from histofed.engine import run_experiment
from histofed.engine.rundir import new_run_dir
from conftest import REPO, tiny_config_dict

runner = CliRunner()


@pytest.fixture
def hospitals(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("site-a", "site-b"):
        write_synthetic_source(tmp_path / "hospitals", name, 3, 64, rng)
    return tmp_path / "hospitals"


def test_parent_folder_subfolders_are_sites(hospitals):
    (hospitals / "notes").mkdir()  # not a site: ignored with a warning
    with pytest.warns(UserWarning, match=r"without images/ are not sites.*notes"):
        fed = build_federation("folders", data_root=None, seed=0, root=str(hospitals),
                               crop_size=32)
    assert fed.client_names == ["site-a", "site-b"] and fed.task == "segmentation"
    assert all(c.info["n_train"] == 2 and c.info["n_test"] == 1 for c in fed.clients)
    assert fed.clients[0].info["root"] == str(hospitals / "site-a")


def test_sites_table_with_paths_under_the_data_root(hospitals):
    fed = build_federation("folders", data_root=hospitals, seed=0, crop_size=32,
                           sites={"north": "site-a", "south": str(hospitals / "site-b")})
    assert fed.client_names == ["north", "south"]
    again = build_federation("folders", data_root=hospitals, seed=0, crop_size=32,
                             sites={"north": "site-a", "south": "site-b"})
    assert again.clients[0].info["test_ids"] == fed.clients[0].info["test_ids"]  # seeded split


@pytest.mark.parametrize("options, error, message", [
    ({}, ValueError, r"needs either sites = \{name = folder"),
    ({"sites": {"a": "x"}, "root": "y"}, ValueError, "needs either"),
    ({"sites": ["site-a"]}, ValueError, r"must be a table \{site-name = folder\}"),
    ({"sites": {"../../ESCAPED": "site-a"}}, ValueError, r"'\.\./\.\./ESCAPED' cannot name a site"),
    ({"sites": {"a": "missing"}}, DataFormatError, r"site 'a': folder .*missing does not exist"),
    ({"sites": {"a": "notes"}}, DataFormatError, r"site 'a': .*notes has no images/ folder"),
    ({"root": "nowhere"}, DataFormatError, r"root = .*nowhere does not exist"),
])
def test_bad_site_options_name_the_site_and_the_fix(hospitals, options, error, message):
    (hospitals / "notes").mkdir()
    with pytest.raises(error, match=message):
        build_federation("folders", data_root=hospitals, seed=0, **options)


def test_a_site_with_a_broken_image_names_the_file(hospitals):
    (hospitals / "site-b" / "masks" / "site-b_001.png").unlink()
    with pytest.raises(DataFormatError, match=r"have no mask, e\.g\. site-b_001\.png"):
        build_federation("folders", data_root=None, seed=0, root=str(hospitals), crop_size=32)


def test_cli_run_on_your_own_folders(hospitals, tmp_path):
    """The README's first example, shrunk: configs/fedavg-folders.toml on two site folders."""
    out = tmp_path / "run"
    res = runner.invoke(app, [
        "run", str(REPO / "configs" / "fedavg-folders.toml"), "--data-root", str(hospitals.parent),
        "--out", str(out), "--set", "federation.root=hospitals", "--set", "run.rounds=1",
        "--set", "federation.crop_size=32", "--set", "model.channels=[4, 8]",
        "--set", "train.local_steps=1", "--set", "run.workers=1"])
    assert res.exit_code == 0, res.output
    assert "site-a" in (out / "summary.md").read_text()
    assert sorted(p.name for p in (out / "checkpoints" / "round-0001" / "clients").glob("*.npz")) \
        == ["site-a.npz", "site-b.npz"]


# ---- images too small for the evaluation window (was: a torch padding traceback) -------------
def test_test_image_smaller_than_half_the_window_names_client_and_image(hospitals, tmp_path):
    site = hospitals / "site-a"
    for sub in ("images", "masks"):  # every image of site-a becomes 10 x 12 px
        for p in (site / sub).glob("*.png"):
            with Image.open(p) as im:
                im.crop((0, 0, 12, 10)).save(p)
    data = tiny_config_dict()
    data["federation"] = {"name": "folders", "root": str(hospitals), "crop_size": 32}
    cfg = config_from_dict(data)
    with pytest.raises(DataFormatError, match=r"client 'site-a': test image 'site-a_00\d' in .*"
                                              r"site-a is 12 x 10 px, too small for the 32 px"):
        run_experiment(cfg, data_root=None, run_dir=new_run_dir(tmp_path / "r", "r"))
    res = runner.invoke(app, ["evaluate", str(tmp_path / "nope"), "--data", str(site)])
    assert res.exit_code == 2 and "run directory" in res.output and "does not exist" in res.output
    run = tmp_path / "finished"  # `histofed evaluate` checks image sizes before loading models
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(cfg.to_dict()))
    res = runner.invoke(app, ["evaluate", str(run), "--data", str(site)])
    assert res.exit_code == 2 and "is 12 x 10 px, too small for the run's 32 px" in res.output


def test_num_clients_has_a_sane_maximum():  # was: num_clients = 1000000 accepted
    with pytest.raises(ValueError, match=r"num_clients = 1000000 must be in 1\.\.1000"):
        build_federation("synthetic-nuclei", data_root=None, seed=0, num_clients=1_000_000)
    with pytest.raises(ValueError, match=r"num_clients = 0 must be in"):
        build_federation("synthetic-patches", data_root=None, seed=0, num_clients=0)
