"""Engines: where clients run. ``run_experiment`` is the one entry point the CLI uses."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from histofed.algorithms.base import Payload
from histofed.config import Config, ConfigError, config_from_dict, dump_toml, load_config
from histofed.data.federation import Federation, build_federation
from histofed.engine import rundir


def data_root_from(arg: Path | str | None) -> Path | None:
    """--data-root wins, then $HISTOFED_DATA; no hidden defaults."""
    value = arg or os.environ.get("HISTOFED_DATA")
    return Path(value).expanduser() if value else None


def load_federation(config: Config, data_root: Path | None) -> Federation:
    return build_federation(config.federation.name, data_root=data_root, seed=config.run.seed,
                            **config.federation.options)


def too_small_to_evaluate(size: tuple[int, int], window: int) -> bool:
    """Sliding-window evaluation reflect-pads an image up to the window: impossible when a side
    is not larger than half the window."""
    return min(size) * 2 <= window


def check_eval_sizes(config: Config, federation: Federation) -> None:
    """Refuse, naming the client and image, val/test images too small for the eval window.

    Raises:
        DataFormatError: the first such image, with the fix.
    """
    from histofed.data.formats import DataFormatError
    from histofed.engine.runtime import crop_size_of

    if federation.task != "segmentation":
        return
    window = config.eval.window or crop_size_of(config, federation)
    for client in federation.clients:
        for split in ("val", "test"):
            dataset = getattr(client, split)
            ids = client.info.get(f"{split}_ids") or []
            for i, image in enumerate(getattr(dataset, "images", None) or []):
                if too_small_to_evaluate(image.shape[:2], window):
                    name = ids[i] if i < len(ids) else f"#{i}"
                    where = f" in {client.info['root']}" if client.info.get("root") else ""
                    h, w = image.shape[:2]
                    raise DataFormatError(
                        f"client {client.name!r}: {split} image {name!r}{where} is {w} x {h} px, "
                        f"too small for the {window} px evaluation window (sliding windows pad "
                        "at most half a window). Fix: remove the image, or set [eval].window "
                        f"to at most {2 * min(h, w) - 1} (or lower crop_size)")


def run_experiment(config: Config, *, data_root: Path | None, run_dir: Path,
                   resume: bool = False, federation: Federation | None = None,
                   stop_after: int | None = None, _resume_checked: bool = False) -> Payload:
    """Run ``config`` into ``run_dir`` with the configured engine; returns the final server state.

    With ``resume``, damaged checkpoints are set aside first (:func:`resume_point`).
    """
    if resume and not _resume_checked:
        resume_point(Path(run_dir))
    if config.run.engine == "flower":
        from histofed.engine.flower import run_flower_simulation

        return run_flower_simulation(config, data_root=data_root, run_dir=run_dir, resume=resume,
                                     stop_after=stop_after)
    from histofed.engine.inprocess import InProcessTransport
    from histofed.engine.loop import Experiment

    # the client side holds the data; the server side (Experiment) gets only the roster
    federation = federation or load_federation(config, data_root)
    check_eval_sizes(config, federation)
    transport = InProcessTransport(config, federation, config.run.workers)
    try:
        experiment = Experiment(config, transport.roster, run_dir)
        if not resume:
            experiment.write_header("inprocess")
            # pid + host: lets a later run with the same --out tell a dead early failure from a
            # run still in progress (rundir.new_run_dir)
            experiment._write_run_json(data_root=str(data_root) if data_root else None,
                                       pid=os.getpid(), host=socket.gethostname())
        return experiment.run(transport, resume=resume, engine="inprocess", stop_after=stop_after,
                              header_written=True)
    finally:
        transport.close()


# What a resume may change: results stay meaningful (lr: the NaN advice; workers and the data
# root do not change the numbers). Anything else would silently mix two experiments in one run.
RESUME_OVERRIDES = ("train.lr", "run.workers")


def resume_point(run_dir: Path) -> int:
    """The round to resume after: the newest intact checkpoint (0 = none, start afresh).

    Damaged checkpoints (truncated or empty files, checksum mismatch) are set aside as
    ``checkpoints/damaged-round-NNNN`` with a note naming the bad file; stale ``.tmp-*``
    folders are removed; logs are cut back to the resumed round.
    """
    rundir.clean_stale_temp(run_dir)
    done = 0
    for ckpt in reversed(rundir.list_checkpoints(run_dir)):
        problem = rundir.checkpoint_problem(ckpt)
        if problem is None:
            done = json.loads((ckpt / "meta.json").read_text())["round"]
            break
        moved = rundir.set_aside(ckpt)
        _note(f"{problem}; checkpoint set aside as {moved}")
    damaged = list((run_dir / "checkpoints").glob("damaged-*"))
    if done:
        _note(f"resuming {run_dir} after round {done} (checkpoints/round-{done:04d})")
    elif damaged:
        _note(f"no intact checkpoint in {run_dir}: starting again from round 1")
    for path in run_dir.glob("*.jsonl"):  # metrics, egress, timing, privacy...
        rundir.truncate_jsonl(path, done)
    return done


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def resume_experiment(run_dir: Path, *, data_root: Path | None = None,
                      overrides: dict[str, Any] | None = None) -> Payload:
    """Continue a run from its last intact checkpoint with the config it was started with.

    ``overrides`` may change only :data:`RESUME_OVERRIDES` (e.g. a lower ``train.lr`` after a
    NaN); a new ``data_root`` is allowed too. Each change is written to config.toml and
    recorded in run.json (``resumes``: the round it took effect from, old and new values).

    Raises:
        RunDirError: ``run_dir`` is missing or not a run directory.
        ConfigError: an override that a resume cannot apply (the message lists those it can).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise rundir.RunDirError(f"run directory {run_dir} does not exist; give the folder a "
                                 "run wrote (runs/<date>-<time>-<name>/ or its --out)")
    if not (run_dir / "config.toml").exists():
        raise rundir.RunDirError(f"{run_dir} is not a histofed run directory (no config.toml)")
    config = load_config(run_dir / "config.toml")
    refused = sorted(set(overrides or {}) - set(RESUME_OVERRIDES))
    if refused:
        raise ConfigError(
            f"--resume cannot change {', '.join(refused)}: a resumed run keeps its config so its "
            f"rounds stay comparable. It can change {', '.join(RESUME_OVERRIDES)} and "
            "--data-root; for anything else start a new run (histofed run CONFIG --out NEW)")
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    saved_root = info.get("data_root")
    if data_root is None:
        data_root = Path(saved_root) if saved_root else data_root_from(None)
    changes: dict[str, Any] = {}
    if overrides:  # validated before anything in the run directory changes
        data = config.to_dict()
        for dotted, value in overrides.items():
            table, _, key = dotted.partition(".")
            if data[table][key] != value:
                changes[dotted] = {"from": data[table][key], "to": value}
            data[table][key] = value
        config = config_from_dict(data, source=f"{run_dir / 'config.toml'} with --set")
    done = resume_point(run_dir)
    if data_root is not None and str(data_root) != (saved_root or ""):
        changes["data_root"] = {"from": saved_root, "to": str(data_root)}
        info["data_root"] = str(data_root)
    if changes:
        rundir.atomic_write_text(run_dir / "config.toml", dump_toml(config.to_dict()))
        for key, change in changes.items():
            _note(f"{key}: {change['from']!r} -> {change['to']!r} from round {done + 1} on "
                  "(recorded in run.json)")
    info.setdefault("resumes", []).append(
        {"from_round": done + 1, "time": time.time(), "changes": changes})
    info.update(pid=os.getpid(), host=socket.gethostname())  # who writes the run now
    if info_path.exists():
        rundir.atomic_write_text(info_path, json.dumps(info, indent=2))
    return run_experiment(config, data_root=data_root, run_dir=run_dir, resume=True,
                          _resume_checked=True)
