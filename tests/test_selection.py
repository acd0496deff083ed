"""BestSnapshot (engine/selection.py): a crash at any point of replacing the best snapshot
leaves a complete snapshot on disk."""

import numpy as np

from histofed.algorithms.base import Payload
from histofed.engine.selection import BestSnapshot


def _state(value: float) -> Payload:
    return Payload({"w": np.full(3, value, np.float32)}, {}, kind="weights")


def test_better_rounds_replace_the_snapshot_and_worse_or_nan_do_not(tmp_path):
    best = BestSnapshot(tmp_path)
    assert best.offer(1, 0.5, _state(1.0), {"a": _state(10.0)})
    assert not best.offer(2, 0.4, _state(2.0), {})
    assert not best.offer(3, float("nan"), _state(3.0), {})
    assert best.offer(4, 0.6, _state(4.0), {"a": _state(40.0)})
    rnd, server, clients = BestSnapshot(tmp_path).load()  # reread from disk
    assert rnd == 4 and server.arrays["w"][0] == 4.0 and clients["a"].arrays["w"][0] == 40.0


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    best = BestSnapshot(tmp_path)
    best.offer(1, 0.5, _state(1.0), {})
    best.dir.rename(best.old)  # crash after the old snapshot moved aside, new one incomplete
    assert BestSnapshot(tmp_path).load()[0] == 1
    best = BestSnapshot(tmp_path)
    best.offer(2, 0.7, _state(2.0), {})
    best.dir.rename(best.tmp)  # crash with the new snapshot complete but not yet in place
    best.old.mkdir()
    rnd, server, _ = BestSnapshot(tmp_path).load()
    assert rnd == 2 and server.arrays["w"][0] == 2.0
    assert not best.tmp.exists() and not best.old.exists()


def test_finished_runs_are_reused_across_new_config_tables_but_not_other_settings(tiny_config,
                                                                                   tmp_path):
    """Benchmarks reuse a finished run (rundir.finished_with) when its config means the same
    experiment, even if the config schema gained a table with defaults since it was written."""
    from histofed.config import dump_toml
    from histofed.engine import run_experiment
    from histofed.engine.rundir import finished_with, new_run_dir

    cfg = tiny_config(run={"rounds": 1})
    out = new_run_dir(tmp_path / "r", "r")
    run_experiment(cfg, data_root=None, run_dir=out)
    text = dump_toml(cfg.to_dict())
    assert finished_with(out, text)
    assert "[server]" in text
    head, tail = text.split("[server]")
    older = head + tail[tail.index("\n["):]  # the table gone, as written before [server] existed
    (out / "config.toml").write_text(older)
    assert finished_with(out, text)
    assert not finished_with(out, dump_toml(tiny_config(run={"rounds": 1},
                                                        train={"lr": 0.02}).to_dict()))
