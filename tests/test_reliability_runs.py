"""Run directories under faults (issue #14): damaged checkpoints, unsafe site names, resume
overrides, --out reuse. Each case is the input that used to break."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from histofed.algorithms import ALGORITHMS
from histofed.algorithms.base import Payload
from histofed.cli import app
from histofed.config import ConfigError, config_from_dict, dump_toml
from histofed.data.bags import write_bag
from histofed.data.federation import ClientData, Federation, build_federation
from histofed.data.formats import DataFormatError
from histofed.engine import resume_experiment, run_experiment
from histofed.engine import rundir
from histofed.engine.rundir import RunDirError, new_run_dir, read_jsonl
from conftest import tiny_config_dict

runner = CliRunner()
ESCAPE = "../../../../ESCAPED"


def _same(a: Payload, b: Payload) -> None:
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)


# ---- site names are not paths -----------------------------------------------------------------
def _labels_csv(tmp_path, sites):
    for i in range(len(sites)):
        write_bag(tmp_path / f"s{i}.h5", np.ones((2, 3)))
    rows = [f"s{i},{i % 2},{site}" for i, site in enumerate(sites)]
    (tmp_path / "labels.csv").write_text("\n".join(["slide_id,label,site", *rows]) + "\n")
    return tmp_path / "labels.csv"


@pytest.mark.parametrize("bad", [ESCAPE, "hosp/A", "..", "a b", "C:\\x", ""])
def test_site_name_from_labels_csv_cannot_become_a_path(tmp_path, bad):
    sites = ["ok-1", "ok-1", bad, bad] if bad else ["ok-1", "ok-1", "", ""]
    _labels_csv(tmp_path, sites)
    with pytest.raises(DataFormatError, match=r"labels\.csv, line 4, column 'site': .* cannot "
                                              r"name a site"):
        build_federation("slides-bags", data_root=tmp_path, seed=0, bags_dir=".",
                         labels_csv="labels.csv")
    assert not list(tmp_path.parent.parent.glob("**/ESCAPED*"))


def test_federation_refuses_unsafe_or_case_duplicate_client_names():
    data = TensorDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    for bad in (ESCAPE, "hosp/A", "."):
        with pytest.raises(ValueError, match=r"cannot name a site.*e\.g\. '"):
            Federation("f", "classification", [ClientData(bad, data, data)], 2)
    with pytest.raises(ValueError, match="differ only in case"):
        Federation("f", "classification", [ClientData("Hosp", data, data),
                                            ClientData("hosp", data, data)], 2)
    assert Federation("f", "classification", [ClientData("site-a_1.x", data, data)], 2)


def test_checkpoint_never_writes_outside_the_run_directory(tmp_path):
    run = tmp_path / "a" / "b" / "c" / "run"
    run.mkdir(parents=True)
    state = Payload({"w": np.ones(2)}, {}, "state")
    with pytest.raises(RunDirError, match="cannot name a site"):
        rundir.save_checkpoint(run, 1, state, {ESCAPE: state}, keep=2)
    assert not list(tmp_path.rglob("ESCAPED*"))


# ---- checkpoints that a crash or a full disk damaged -------------------------------------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 3-round FedBN run (private client state) to compare resumes with."""
    cfg = config_from_dict(tiny_config_dict("fedbn", run={"rounds": 3}))
    out = tmp_path_factory.mktemp("full") / "run"
    return cfg, run_experiment(cfg, data_root=None, run_dir=new_run_dir(out, "full"))


def _crashed_after_round_2(cfg, tmp_path):
    out = new_run_dir(tmp_path / "crashed", "crashed")
    run_experiment(cfg, data_root=None, run_dir=out, stop_after=2)
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, bad_file", [
    (_truncate, "server.npz"),
    (lambda p: p.write_bytes(b""), "clients/synthetic-1.npz"),
    (lambda p: p.write_text(""), "meta.json"),
])
def test_resume_skips_a_damaged_newest_checkpoint(full_run, tmp_path, capsys, damage, bad_file):
    cfg, full = full_run
    out = _crashed_after_round_2(cfg, tmp_path)
    damage(out / "checkpoints" / "round-0002" / bad_file)
    (out / "checkpoints" / ".tmp-stale").mkdir()  # a checkpoint a kill left half-written
    resumed = resume_experiment(out)
    _same(full, resumed)  # round 2 was redone from round 1: same weights as never crashing
    err = capsys.readouterr().err
    assert f"round-0002/{bad_file}" in err and "resuming" in err and "after round 1" in err
    assert (out / "checkpoints" / "damaged-round-0002").is_dir()
    assert not list((out / "checkpoints").glob(".tmp-*"))
    rounds = [r["round"] for r in read_jsonl(out / "timing.jsonl")]
    assert rounds == [1, 2, 3]  # the logs of the redone round are not doubled


def test_checkpoints_carry_checksums_that_catch_a_flipped_byte(full_run, tmp_path):
    cfg, _ = full_run
    out = _crashed_after_round_2(cfg, tmp_path)
    ckpt = out / "checkpoints" / "round-0002"
    assert "server.npz" in (ckpt / "SHA256SUMS").read_text()
    assert rundir.checkpoint_problem(ckpt) is None
    data = bytearray((ckpt / "server.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit flipped: still a loadable zip maybe
    (ckpt / "server.npz").write_bytes(bytes(data))
    assert "checksum differs" in rundir.checkpoint_problem(ckpt)


def test_resume_drops_a_partial_last_log_line(full_run, tmp_path):
    cfg, full = full_run
    out = _crashed_after_round_2(cfg, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "client": "synth')  # the crash hit mid-line
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: ignored an incomplete last line"):
        resumed = resume_experiment(out)
    _same(full, resumed)
    assert all("round" in r for r in read_jsonl(out / "metrics.jsonl"))


def test_a_bad_line_inside_a_log_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{oops\n{"round": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_jsonl(tmp_path / "metrics.jsonl")


# ---- resume semantics -------------------------------------------------------------------------
def test_resume_applies_lr_and_workers_and_records_them(full_run, tmp_path):
    cfg, full = full_run
    out = _crashed_after_round_2(cfg, tmp_path)
    resumed = resume_experiment(out, overrides={"train.lr": 0.002, "run.workers": 2})
    info = json.loads((out / "run.json").read_text())
    assert info["resumes"][-1]["from_round"] == 3
    assert info["resumes"][-1]["changes"]["train.lr"] == {"from": 0.01, "to": 0.002}
    assert "lr = 0.002" in (out / "config.toml").read_text()  # a second resume keeps it
    assert any(not np.array_equal(full.arrays[k], resumed.arrays[k]) for k in full.arrays)


def test_resume_refuses_what_it_cannot_change(full_run, tmp_path):
    cfg, _ = full_run
    out = _crashed_after_round_2(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"--resume cannot change algorithm.name, run.rounds.*"
                                          r"It can change train.lr, run.workers"):
        resume_experiment(out, overrides={"run.rounds": 9, "algorithm.name": "fedavg"})
    res = runner.invoke(app, ["run", "--resume", str(out), "--engine", "flower"])
    assert res.exit_code == 2 and "cannot change a resumed run" in res.output
    assert "resumes" not in json.loads((out / "run.json").read_text())  # nothing was changed


def test_resume_of_a_missing_directory_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "run directory" in res.output and "does not exist" in res.output


# ---- --out -------------------------------------------------------------------------------------
def _config_file(tmp_path, method="fedavg", **tables):
    path = tmp_path / "exp.toml"
    path.write_text(dump_toml(tiny_config_dict(method, **tables)))
    return path


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("keep me")
    res = runner.invoke(app, ["run", str(_config_file(tmp_path)), "--out", str(tmp_path / "taken")])
    assert res.exit_code == 2 and "is a file, not a folder" in res.output
    assert (tmp_path / "taken").read_text() == "keep me"


class _NaNAboveLr(ALGORITHMS.get("fedavg")):
    """FedAvg whose every client's loss is NaN when [train].lr > 0.05 (a learning rate too high)."""

    name = "nan-above-lr-test"

    def fit(self, ctx, payload):
        from histofed.algorithms.base import ClientTrainingError

        if ctx.train.lr > 0.05:
            raise ClientTrainingError(f"client {ctx.cid}: loss is nan (lower [train].lr)")
        return super().fit(ctx, payload)


if "nan-above-lr-test" not in ALGORITHMS:
    ALGORITHMS.add("nan-above-lr-test", _NaNAboveLr)


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_run_that_fails_before_round_1_can_be_resumed_or_its_out_reused(tmp_path):
    out = tmp_path / "run"
    config = _config_file(tmp_path, "nan-above-lr-test", train={"lr": 0.5}, run={"rounds": 1})
    res = runner.invoke(app, ["run", str(config), "--out", str(out)])
    assert res.exit_code == 2 and "every client failed" in res.output and "--resume" in res.output
    # the NaN message's advice works: resume with a lower learning rate
    res = runner.invoke(app, ["run", "--resume", str(out), "--set", "train.lr=0.01"])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "global.npz").exists()
    info = json.loads((out / "run.json").read_text())
    assert info["resumes"][-1]["changes"]["train.lr"] == {"from": 0.5, "to": 0.01}


def test_out_of_a_dead_run_that_never_checkpointed_is_reused_but_a_live_one_is_not(tmp_path):
    out = tmp_path / "run"
    config = _config_file(tmp_path, "nan-above-lr-test", train={"lr": 0.5}, run={"rounds": 1})
    assert runner.invoke(app, ["run", str(config), "--out", str(out)]).exit_code == 2
    info = json.loads((out / "run.json").read_text())
    assert info["pid"] == __import__("os").getpid()  # this process: still alive
    res = runner.invoke(app, ["run", str(config), "--out", str(out), "--set", "train.lr=0.01"])
    assert res.exit_code == 2 and "never overwrites" in res.output
    info["pid"] = _dead_pid()  # as if that run had been killed
    (out / "run.json").write_text(json.dumps(info))
    res = runner.invoke(app, ["run", str(config), "--out", str(out), "--set", "train.lr=0.01"])
    assert res.exit_code == 0, res.output
    assert "stopped before its first checkpoint" in res.output
    (out / "keep.txt").write_text("not a run file")  # anything unknown: never cleared
    with pytest.raises(RunDirError, match="never overwrites"):
        new_run_dir(out, "x")


def test_evaluate_with_an_empty_final_weights_file_names_it(tmp_path):  # was: bare "Aborted."
    from histofed.data.synthetic import write_synthetic_source

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.toml").write_text(dump_toml(tiny_config_dict("fedavg")))
    (run / "final" / "global.npz").write_bytes(b"")
    site = write_synthetic_source(tmp_path, "site-a", 2, 64, np.random.default_rng(0))
    res = runner.invoke(app, ["evaluate", str(run), "--data", str(site)])
    assert res.exit_code == 2, res.output
    assert "final/global.npz is truncated or damaged (0 bytes" in res.output
