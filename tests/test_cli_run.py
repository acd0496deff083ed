"""`histofed run / evaluate / report` end to end through the CLI, on synthetic data."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from histofed.cli import app
from histofed.config import dump_toml
from conftest import tiny_config_dict

runner = CliRunner()


def _config(tmp_path, **tables):
    path = tmp_path / "exp.toml"
    path.write_text(dump_toml(tiny_config_dict("fedavg", **tables)))
    return path


def test_run_writes_a_trustworthy_run_directory(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", str(_config(tmp_path)), "--out", str(out),
                              "--set", "run.rounds=2"])
    assert res.exit_code == 0, res.output
    for name in ("config.toml", "run.json", "metrics.jsonl", "egress.jsonl", "report.html",
                 "summary.md", "final/global.npz"):
        assert (out / name).exists(), name
    assert len(list((out / "checkpoints").glob("round-*"))) == 2
    assert json.loads((out / "run.json").read_text())["rounds"] == 2
    assert "report:" in res.output


def test_run_refuses_existing_dir_and_bad_keys(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("keep me")
    res = runner.invoke(app, ["run", str(_config(tmp_path)), "--out", str(out)])
    assert res.exit_code == 2 and "never overwrites" in res.output
    assert (out / "x").read_text() == "keep me"
    res = runner.invoke(app, ["run", str(_config(tmp_path, train={"lrr": 0.1})), "--out",
                              str(tmp_path / "new")])
    assert res.exit_code == 2 and 'Did you mean "lr"' in res.output


def test_resume_through_cli_finishes_the_run(tmp_path):
    from histofed.config import config_from_dict
    from histofed.engine import run_experiment
    from histofed.engine.rundir import new_run_dir

    cfg = config_from_dict(tiny_config_dict(run={"rounds": 2}))
    out = new_run_dir(tmp_path / "r", "r")
    run_experiment(cfg, data_root=None, run_dir=out, stop_after=1)
    assert not (out / "final").exists()
    res = runner.invoke(app, ["run", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "global.npz").exists()


def test_evaluate_on_a_new_folder(tmp_path):
    from histofed.data.synthetic import write_synthetic_source

    out = tmp_path / "run"
    assert runner.invoke(app, ["run", str(_config(tmp_path)), "--out", str(out),
                               "--set", "run.rounds=1"]).exit_code == 0
    src = write_synthetic_source(tmp_path / "new", "newsite", 2, 64, np.random.default_rng(3))
    res = runner.invoke(app, ["evaluate", str(out), "--data", str(src)])
    assert res.exit_code == 0, res.output
    assert "newsite" in res.output and "dice" in res.output
    assert (out / "evaluate.csv").exists()
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "images" / "a.png")
    res = runner.invoke(app, ["evaluate", str(out), "--data", str(bad)])
    assert res.exit_code == 2 and "a.png" in res.output
