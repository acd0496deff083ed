"""Engines: where clients run. ``run_experiment`` is the one entry point the CLI uses."""

from __future__ import annotations

import json
import os
from pathlib import Path

from histofed.algorithms.base import Payload
from histofed.config import Config, load_config
from histofed.data.federation import Federation, build_federation
from histofed.engine import rundir


def data_root_from(arg: Path | str | None) -> Path | None:
    """--data-root wins, then $HISTOFED_DATA; no hidden defaults."""
    value = arg or os.environ.get("HISTOFED_DATA")
    return Path(value).expanduser() if value else None


def load_federation(config: Config, data_root: Path | None) -> Federation:
    return build_federation(config.federation.name, data_root=data_root, seed=config.run.seed,
                            **config.federation.options)


def run_experiment(config: Config, *, data_root: Path | None, run_dir: Path,
                   resume: bool = False, federation: Federation | None = None,
                   stop_after: int | None = None) -> Payload:
    """Run ``config`` into ``run_dir`` with the configured engine; returns the final server state."""
    if config.run.engine == "flower":
        from histofed.engine.flower import run_flower_simulation

        return run_flower_simulation(config, data_root=data_root, run_dir=run_dir, resume=resume,
                                     stop_after=stop_after)
    from histofed.engine.inprocess import InProcessTransport
    from histofed.engine.loop import Experiment

    # the client side holds the data; the server side (Experiment) gets only the roster
    federation = federation or load_federation(config, data_root)
    transport = InProcessTransport(config, federation, config.run.workers)
    try:
        experiment = Experiment(config, transport.roster, run_dir)
        if not resume:
            experiment.write_header("inprocess")
            experiment._write_run_json(data_root=str(data_root) if data_root else None)
        return experiment.run(transport, resume=resume, engine="inprocess", stop_after=stop_after,
                              header_written=True)
    finally:
        transport.close()


def resume_experiment(run_dir: Path, *, data_root: Path | None = None) -> Payload:
    """Continue a run from its last checkpoint with the config it was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise rundir.RunDirError(f"{run_dir} is not a histofed run directory (no config.toml)")
    config = load_config(run_dir / "config.toml")
    if data_root is None:
        info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
        data_root = Path(info["data_root"]) if info.get("data_root") else data_root_from(None)
    return run_experiment(config, data_root=data_root, run_dir=run_dir, resume=True)
