"""`histofed privacy budget` and `histofed audit invert` through the CLI."""

import json

from typer.testing import CliRunner

from histofed.cli import app
from histofed.config import dump_toml
from conftest import tiny_config_dict

runner = CliRunner()


def test_budget_table_pins_reference_values():
    res = runner.invoke(app, ["privacy", "budget", "--sigma", "1", "--q", "1", "--rounds", "150",
                              "--delta", "1e-5", "--accountant", "rdp", "--every", "50"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[1].split() == ["round", "rdp", "exact"]
    last = lines[-1].split()
    assert last[0] == "150" and last[1] == "131.688" and last[2] == "126.377"
    assert [ln.split()[0] for ln in lines[2:]] == ["50", "100", "150"]


def test_budget_target_epsilon_mode_and_json():
    res = runner.invoke(app, ["privacy", "budget", "--target-epsilon", "8", "--q", "1",
                              "--rounds", "20", "--accountant", "rdp", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert 2.8 < out["sigma"] < 2.9  # Opacus' get_noise_multiplier (sigma = 2.854)
    assert 7.99 <= out["rows"][-1]["rdp"] <= 8.0
    assert out["rows"][-1]["exact"] < out["rows"][-1]["rdp"]  # RDP is an upper bound
    res = runner.invoke(app, ["privacy", "budget", "--target-epsilon", "3", "--rounds", "10",
                              "--accountant", "rdp"])
    assert res.exit_code == 0 and res.output.startswith("sigma = ")
    assert "reaches epsilon <= 3" in res.output


def test_budget_bad_input_is_one_clear_line():
    cases = [
        (["--sigma", "-1", "--rounds", "3"], "sigma = -1.0: the noise multiplier must be >= 0"),
        (["--sigma", "1", "--q", "0", "--rounds", "3"], "q = 0.0: the sampling rate must be in"),
        (["--sigma", "1", "--rounds", "3", "--clients", "7", "--delta", "0.2"], "is >= 1/7"),
        (["--sigma", "1", "--target-epsilon", "3", "--rounds", "3"], "exactly one of --sigma"),
        (["--sigma", "1", "--rounds", "3", "--accountant", "gdp"], 'choose "rdp" or "prv"'),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["privacy", "budget", *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output


def test_audit_invert_writes_table_json_and_grid(tmp_path):
    cfg = tmp_path / "dp.toml"
    cfg.write_text(dump_toml(tiny_config_dict(
        "feddp", model={"norm": "instance"}, algorithm={"sigma": 0.05, "clip": 0.5})))
    out = tmp_path / "audit"
    res = runner.invoke(app, ["audit", "invert", str(cfg), "--tiles", "1", "--size", "16",
                              "--iterations", "5", "--restarts", "2", "--known-mask",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"invert.md", "invert.json", "invert.png"}
    report = json.loads((out / "invert.json").read_text())
    assert set(report["models"]) == {"probe", "run"}
    labels = [s["defence"] for s in report["models"]["probe"]["summary"]]
    assert labels == ["none", "clip only", "clip + noise sigma=0.05"]
    assert "C = 0.5, sigma = 0.05" in report["defence_source"]
    md = (out / "invert.md").read_text()
    assert "| defence | PSNR raw (flat) | PSNR affine (flat) |" in md
    assert "5 attack iterations x 2 restart(s)" in md and "known to the attacker" in md
    assert len(report["models"]["run"]["rows"][0]["restart_losses"]) == 2
    assert "not a guarantee" in (out / "invert.md").read_text()
    again = runner.invoke(app, ["audit", "invert", str(cfg), "--tiles", "1", "--out", str(out)])
    assert again.exit_code == 2 and "never overwrites" in again.output


def test_budget_with_infinite_noise_costs_nothing():  # was: RuntimeError traceback from PRV
    res = runner.invoke(app, ["privacy", "budget", "--sigma", "inf", "--q", "1", "--rounds", "3",
                              "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    assert all(r["rdp"] == 0 and r["prv"] == 0 and r["exact"] == 0 for r in rows)


def test_budget_falls_back_to_rdp_where_prv_would_need_petabytes():
    from histofed.privacy.accountant import PRV_MAX_POINTS, prv_grid_points

    assert prv_grid_points([(1e-6, 0.01, 10)], 1e-5) > 1e14 > PRV_MAX_POINTS
    res = runner.invoke(app, ["privacy", "budget", "--sigma", "1e-6", "--q", "0.01", "--rounds",
                              "10", "--every", "5", "--json"])
    assert res.exit_code == 0, res.output
    assert "note: PRV accountant would need" in res.output and "RDP bound" in res.output
    rows = json.loads(res.output.splitlines()[-1])["rows"]
    assert all(r["prv"] == r["rdp"] > 1e11 for r in rows)


def test_budget_every_zero_is_a_clear_error():  # was: "range() arg 3 must not be zero"
    res = runner.invoke(app, ["privacy", "budget", "--sigma", "1", "--rounds", "10", "--every", "0"])
    assert res.exit_code == 2 and "--every must be >= 1" in res.output
