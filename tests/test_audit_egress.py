"""Egress audit (issue 13, item 5): every egress.jsonl row carries the SHA-256 of the payload's
canonical bytes, and `histofed audit egress RUN_DIR` summarises and flags the log."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from histofed.algorithms.base import ClientInfo, Payload
from histofed.algorithms.weights import get_weights
from histofed.cli import app
from histofed.engine import run_experiment
from histofed.engine.loop import ServerModels
from histofed.engine.rundir import new_run_dir, read_jsonl

runner = CliRunner()


def test_sha256_is_canonical():
    a = Payload({"b": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2], "a": np.ones(())})
    b = Payload({"a": np.ones(()), "b": np.array([[0, 2], [3, 5]], np.float32)})  # same, reordered
    assert a.sha256() == b.sha256()
    assert a.sha256() != Payload({**b.arrays, "a": np.ones((1,))}).sha256()  # shape counts
    assert a.sha256() != Payload({**b.arrays, "a": np.ones((), np.float32)}).sha256()  # dtype
    assert Payload({}, {"x": 1, "n": 2}).sha256() == Payload({}, {"n": 2, "x": 1}).sha256()
    assert set(Payload({"w": np.zeros(1)}, {"n": 1}, kind="svd-factors").sha256()) == {
        "svd-factors", "scalars"}


def test_egress_rows_have_checksums_and_the_audit_summarises_them(tiny_config, tmp_path):
    cfg = tiny_config("fedavg", run={"rounds": 1})
    out = new_run_dir(tmp_path / "run", "run")
    run_experiment(cfg, data_root=None, run_dir=out)
    rows = read_jsonl(out / "egress.jsonl")
    assert rows and all(len(r["sha256"]) == 64 for r in rows)
    # the server sent every site the seeded initial model in round 1: its checksum is in the log
    roster = [ClientInfo(**c) for c in json.loads((out / "run.json").read_text())["roster"]]
    init = Payload(get_weights(ServerModels(cfg, roster)(None))).sha256()["weights"]
    down = [r for r in rows if r["direction"] == "down" and r["phase"] == "fit"]
    assert len(down) == 3 and {r["sha256"] for r in down} == {init}

    result = runner.invoke(app, ["audit", "egress", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["flags"] == [] and summary["rows"] == len(rows)
    weights = {s["site"]: s for s in summary["sites"] if s["kind"] == "weights"}
    assert sorted(weights) == ["synthetic-0", "synthetic-1", "synthetic-2"]
    site = weights["synthetic-0"]
    assert site["bytes_up"] == sum(r["bytes"] for r in rows if r["client"] == "synthetic-0"
                                   and r["kind"] == "weights" and r["direction"] == "up") > 0
    assert (site["payloads_up"], site["payloads_down"], site["rounds"]) == (1, 2, 1)  # fit + eval

    table = runner.invoke(app, ["audit", "egress", str(out)])
    assert table.exit_code == 0 and "synthetic-2" in table.output
    assert "nothing unexpected flagged" in table.output

    # an older log (no checksums), pooled raw data and a stranger: each flagged
    old = [{k: v for k, v in r.items() if k != "sha256"} for r in rows]
    old += [{"round": 1, "client": "synthetic-1", "direction": "up", "kind": "raw-data",
             "bytes": 5_000_000, "phase": "fit"},
            {"round": 1, "client": "intruder", "direction": "up", "kind": "weights", "bytes": 8,
             "phase": "fit", "sha256": "0" * 64}]
    (out / "egress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    result = runner.invoke(app, ["audit", "egress", str(out)])
    assert result.exit_code == 0, result.output
    assert "synthetic-1: raw training data left the site in round 1 (5.00 MB)" in result.output
    assert "synthetic-0: " in result.output and "rows without a checksum" in result.output
    assert "client 'intruder' is not in this run's roster" in result.output


def test_audit_egress_names_a_missing_log(tmp_path):
    result = runner.invoke(app, ["audit", "egress", str(tmp_path)])
    assert result.exit_code != 0 and "egress.jsonl not found" in result.output
